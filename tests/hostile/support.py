"""What the hostile corpus shares: a liveness probe that runs while a request is processed, and a check that a
connection outlives an error."""

from __future__ import annotations

import http.client
import json
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx


@contextmanager
def live_latency(url: str):
    """Poll `/health/live` on a connection of its own while the block runs; yields a list that holds, after the
    block, the slowest answer in seconds (the first element)."""
    worst: list[float] = [0.0]
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get("/health/live").status_code == 200
                worst[0] = max(worst[0], time.perf_counter() - t)
                time.sleep(0.01)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    time.sleep(0.1)
    try:
        yield worst
    finally:
        stop.set()
        t.join(30)


def same_connection(url: str, first: tuple[str, str, bytes], then: tuple[str, str, bytes],
                    headers: dict | None = None) -> tuple[int, int]:  # fmt: skip
    """Send `first` then `then` ((method, path, body)) on one keep-alive connection; their statuses. Fails if the
    server closed the connection after the first."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    h = {"content-type": "application/json"} | (headers or {})
    try:
        conn.request(first[0], first[1], body=first[2], headers=h)
        r1 = conn.getresponse()
        r1.read()
        sock = conn.sock
        assert sock is not None and r1.getheader("connection", "").lower() != "close", "the server closed it"
        conn.request(then[0], then[1], body=then[2], headers=h)
        r2 = conn.getresponse()
        r2.read()
        assert conn.sock is sock, "the connection was reopened"
        return r1.status, r2.status
    finally:
        conn.close()


def envelope(r: httpx.Response, status: int) -> dict:
    """The error envelope of `r`, which must have `status`."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"]
    return err


def body(**kw) -> bytes:
    return json.dumps(kw).encode()
