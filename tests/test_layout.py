"""The layers keep their promises: what each imports (and does not), and module sizes (README, "Layout")."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.live import REPO


def loaded_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after `statement`."""
    program = f"{statement}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import server.settings", {"torch", "transformers", "fastapi"}),
        ("import adapters.training.config", {"torch", "transformers"}),
        ("import server.engine.engine, server.engine.async_engine, server.catalog", {"fastapi", "starlette"}),
        ("import server.jobs.service", {"fastapi", "starlette"}),
        ("import adapters.layers, adapters.tiers.pool, adapters.training.trainer", {"fastapi", "starlette", "server"}),
        ("import client", {"torch", "server", "adapters"}),
        ("import server.cli", {"torch", "client"}),
        # `loraplex serve` without --replicas: Ray is only imported on the Ray Serve path (server/ray/app.py)
        ("import server.cli.serve, server.http.app, server.settings", {"ray"}),
        ("import server.ray.config, server.ray.catalog", {"ray"}),
    ],
)
def test_imports_point_one_way(statement, absent):
    assert not (loaded_after(statement) & absent)


def test_no_module_is_past_400_lines():
    sizes = {p.relative_to(REPO): len(p.read_text().splitlines()) for d in ("server", "adapters", "client")
             for p in (REPO / d).rglob("*.py")}  # fmt: skip
    assert not {p: n for p, n in sizes.items() if n > 400}
