"""A real uvicorn server on 127.0.0.1 for tests (httpx's ASGI transport buffers whole responses, so streaming,
disconnects and shutdown need a real one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from server.http.app import create_app
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: object

    @property
    def state(self):
        return self.app.state.loraplex

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(settings: Settings, timeout: float = 120) -> LiveServer:
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", server, thread, app)
    while httpx.get(f"{live.url}/health/ready").status_code != 200:
        if time.monotonic() > deadline or live.state.load_error:
            live.stop()
            raise RuntimeError(f"server not ready: {live.state.load_error}")
        time.sleep(0.05)
    return live


def tiny_settings(model_dir: Path, data_dir: Path, **overrides) -> Settings:
    """Small limits for a tiny model: eager LoRA backend, 8 rows of 128 tokens, 16 pages of 8 rank rows."""
    defaults = dict(
        model=str(model_dir),
        data_dir=data_dir,
        max_model_len=128,
        max_num_seqs=8,
        lora_pages=16,
        lora_page_size=8,
        max_lora_rank=16,
        lora_backend="eager",
    )
    return Settings(**(defaults | overrides))


def spawn_server(env: dict[str, str], timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`python -m server` in a process of its own (signals reach it as they reach a real server), configured by `env`
    (LORAPLEX_* variables, on top of the environment's others); (process, url) once it is ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout)
    except RuntimeError:
        proc.kill()
        raise
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Until the server process `proc` at `url` answers /health/ready with 200; RuntimeError if it exits first or
    the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        try:
            if httpx.get(f"{url}/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list[str], threading.Event]:
    """POST `body` to /v1/completions as a stream in a thread: (thread, the `data:` payloads so far, set at the first)."""
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    return t, events, first
