"""Upload-to-servable latency: POST a rank-16 adapter for the default model, then use it.

Starts a real server (`python -m server`, no adapters), then for each of N fresh rank-16 adapters
on q,k,v,o,gate,up,down measures (1) the time from sending the multipart upload to its 201 —
transfer over loopback, validation, atomic store, registration — and (2) the time from sending
the upload to the first token of a completion that names the adapter (the device-pool load
included). Prints p50 / max of both and writes benchmarks/results/upload_latency.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    add_server_args,
    make_random_adapters,
    print_table,
    resolve_model_path,  # noqa: E402
    write_json,
    write_peft_adapters,
)
from benchmarks.http_load import adapter_shapes, free_port, start_server, stop_server, wait_ready  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_server_args(ap)
    ap.add_argument("--uploads", type=int, default=10)
    args = ap.parse_args()
    args.concurrency, args.requests, args.adapters = 4, 0, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "none").mkdir()
        shapes = adapter_shapes(resolve_model_path(args.model, args.cache_dir))
        paths = write_peft_adapters(make_random_adapters(shapes, args.uploads, seed=1000), tmp / "up")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, tmp / "none", tmp / "data", port, tmp / "server.log")
        try:
            wait_ready(proc, url, 600, tmp / "server.log")
            base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            to_201, to_token = [], []
            with httpx.Client(base_url=url, timeout=120) as c:
                for i, p in enumerate(paths):
                    files = {f: (f, (p / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
                    t0 = time.perf_counter()
                    r = c.post("/v1/adapters", data={"name": f"up-{i}"}, files=files)
                    t1 = time.perf_counter()
                    assert r.status_code == 201, r.text
                    r = c.post("/v1/completions", json={"model": f"up-{i}", "prompt": "Hi", "max_tokens": 1})
                    t2 = time.perf_counter()
                    assert r.status_code == 200, r.text
                    to_201.append((t1 - t0) * 1000)
                    to_token.append((t2 - t0) * 1000)
                size = sum((paths[0] / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))
        finally:
            stop_server(proc)
    rows = [
        ["upload → 201 (servable)", f"{statistics.median(to_201):.0f}", f"{max(to_201):.0f}"],
        ["upload → first token", f"{statistics.median(to_token):.0f}", f"{max(to_token):.0f}"],
    ]
    print(f"{args.uploads} uploads of a rank-16 adapter ({size / 2**20:.1f} MiB) for {base}, ms")
    print_table(["what", "p50 ms", "max ms"], rows)
    write_json(RESULTS_DIR / "upload_latency.json", {"to_201_ms": to_201, "to_first_token_ms": to_token, "bytes": size})


if __name__ == "__main__":
    main()
