"""Time to ready: `python -m server` with the defaults, from launch to `/health/ready` 200, cold and warm.

    fresh: no converted model (the GGUF is converted first) and an empty inductor cache
    cold:  the converted model, an empty inductor cache (a new machine after `make serve` once)
    warm:  the converted model and the inductor cache of an earlier start

For each it reports the time to ready, the time until the compiled backend's background warm-up is done (the
server serves eagerly until then; `/health/ready` shows its progress) and the first request's latency right at
ready. `--no-background` measures the old behaviour (every graph compiled before ready) for comparison. The
caches live in a temporary directory (TORCHINDUCTOR_CACHE_DIR, --cache-dir): the machine's own are untouched.

Usage: `python benchmarks/startup.py [--cases fresh,cold,warm] [--no-background]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/startup.py` from anywhere

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    RESULTS_DIR,
    free_port,
    launch_server,
    print_table,
    stop_server,
    write_json,
)


def start_once(root: Path, cache_dir: Path, inductor: Path, background: bool, timeout: float) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "server.log"
    url = f"http://127.0.0.1:{port}"
    env = {"LORAPLEX_DATA_DIR": str(root / "data"), "LORAPLEX_CACHE_DIR": str(cache_dir),
           "LORAPLEX_COMPILE_IN_BACKGROUND": str(background).lower()}  # fmt: skip
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    t0 = time.monotonic()
    proc = launch_server(port, log, None, env)
    result: dict = {}
    try:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{url}/health/ready", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if r.status_code == 200 and "ready_s" not in result:
                result["ready_s"] = time.monotonic() - t0
                t1 = time.monotonic()
                body = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 8,
                        "temperature": 0}  # fmt: skip
                httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()
                result["first_request_s"] = time.monotonic() - t1
            if "ready_s" in result and "compiling" not in r.json():
                result["compiled_s"] = time.monotonic() - t0
                return result
            time.sleep(0.2)
        raise RuntimeError(f"not ready and compiled within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="fresh,cold,warm")
    ap.add_argument("--no-background", action="store_true", help="compile every graph before ready (the old way)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    background = not args.no_background
    results = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-startup-") as tmp:
        root = Path(tmp)
        models = root / "models-cache"
        inductor = root / "inductor"
        for case in args.cases.split(","):
            if case == "fresh":
                shutil.rmtree(models, ignore_errors=True)
                shutil.rmtree(inductor, ignore_errors=True)
            elif case == "cold":
                shutil.rmtree(inductor, ignore_errors=True)
                if not (models / "models").exists():  # the converted model, copied from this checkout's cache
                    shutil.copytree(DEFAULT_CACHE_DIR / "models", models / "models")
            print(f"{case}...", flush=True)
            results[case] = start_once(root / case, models, inductor, background, args.timeout)
            print(f"{case}: {results[case]}", flush=True)
    print(f"\ntime to ready, `python -m server` with the defaults (background compile: {background})")
    print_table(["case", "ready s", "first request s", "compiled s"],
                [[c, r["ready_s"], r["first_request_s"], r["compiled_s"]] for c, r in results.items()])
    out = args.out or RESULTS_DIR / ("startup.json" if background else "startup_no_background.json")
    write_json(out, {"background": background, "results": results})


if __name__ == "__main__":
    main()
