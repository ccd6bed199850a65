"""Shared fixtures: tiny random models, real PEFT adapters, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.live import LiveServer, start_server, tiny_settings
from tests.tiny import make_model_dir, make_peft_adapter


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs `loraplex serve` in process configures the root logger (server.logs) for the whole process:
    undo it, so that later tests' CLI output does not carry other libraries' log lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, llama_dir) -> Iterator[LiveServer]:
    """A server of the tiny Llama for one test module; the module's `SERVER_SETTINGS` override `tiny_settings`."""
    overrides = getattr(request.module, "SERVER_SETTINGS", {})
    live = start_server(tiny_settings(llama_dir, tmp_path_factory.mktemp("data"), **overrides))
    yield live
    live.stop()


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device this machine has: the CPU always, CUDA when present."""
    return torch.device(request.param)
