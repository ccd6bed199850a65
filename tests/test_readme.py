"""The README works as written: every command in it is walked by `tests/readme_walk.py` or skipped there with a
reason; the walk itself (the real default model, two default training runs: minutes) runs with
LORAPLEX_WALK_README=1."""

from __future__ import annotations

import os

import pytest

from tests.readme_walk import README, commands, skipped


def test_every_readme_command_is_walked_or_skipped_with_a_reason():
    found = commands(README.read_text())
    walked = [c for lang, c in found if not skipped(c)]
    assert any(c.startswith("curl") and '"temperature": 0' in c for c in walked)  # a good answer as written
    for wanted in ("loraplex adapters upload", "loraplex adapters pull", "loraplex adapters download",
                   "loraplex jobs create facts.jsonl", "loraplex train facts.jsonl", "from client import"):  # fmt: skip
        assert any(wanted in c for c in walked), wanted
    assert [c for lang, c in found if skipped(c)]  # and the skips are the listed ones (make serve, docker, ...)


@pytest.mark.skipif(os.environ.get("LORAPLEX_WALK_README") != "1", reason="minutes: LORAPLEX_WALK_README=1 walks it")
@pytest.mark.timeout(1800)  # two default training runs and a server on the real model: past the suite's 600 s
def test_the_readme_walks():
    from tests.readme_walk import walk

    walk()
