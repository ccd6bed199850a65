"""Shared fixtures: tiny random models, real PEFT adapters, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model_dir, make_peft_adapter  # noqa: E402

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(arch, root / arch) for arch in ("llama", "gpt2", "qwen2")}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, llama_dir) -> Path:
    """Two real PEFT adapters for the tiny Llama: `alpha` (all linears, r=4) and `beta` (q,v, r=8)."""
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(llama_dir, root / "alpha", "llama", r=4, alpha=8, seed=1)
    make_peft_adapter(llama_dir, root / "beta", "llama", r=8, alpha=16, seed=2, targets=["q_proj", "v_proj"])
    return root


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
    defaults = dict(model=str(model_dir), data_dir=data_dir, max_model_len=128, max_num_seqs=8, lora_pages=16,
                    lora_page_size=8, max_lora_rank=16, lora_backend="eager")
    return Settings(**(defaults | overrides))


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, llama_dir, adapter_dir) -> Iterator[LiveServer]:
    """The tiny Llama with adapters alpha and beta."""
    live = start_server(tiny_settings(llama_dir, tmp_path_factory.mktemp("data"), adapter_dir=adapter_dir, max_waiting=64))
    yield live
    live.stop()


@pytest.fixture
def http(live_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        yield c
