"""The engine harness, shared: `make_harness(...)` builds one (stopped at the test's end), `harness` is one per
backend for a whole module, `engine_adapters` two real PEFT adapters of the tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.engine.support import Harness
from tests.tiny import make_peft_adapter


@pytest.fixture(scope="session")
def engine_adapters(tmp_path_factory, llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    return {
        "a": make_peft_adapter(llama_dir, root / "a", "llama", r=4, alpha=8, seed=11),
        "b": make_peft_adapter(llama_dir, root / "b", "llama", r=12, alpha=12, seed=12,
                               targets=["q_proj", "v_proj", "down_proj"]),  # fmt: skip
    }


@pytest.fixture
def make_harness():
    """Harness(...) for this test, its engine stopped at the end."""
    made: list[Harness] = []

    def make(*args, **kwargs) -> Harness:
        made.append(Harness(*args, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.engine.stop()


@pytest.fixture(scope="module", params=["eager", "compiled"])
def harness(request, llama_dir, engine_adapters):
    h = Harness(llama_dir, engine_adapters, request.param, max_num_seqs=4, auto_merge=False)
    yield h
    h.engine.stop()
