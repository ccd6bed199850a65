"""The disk tier: versions written by one rename, the newest complete one current, deletes and leftovers."""

from __future__ import annotations

import json

from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME
from adapters.tiers.store import AdapterStore, file_sha256


def scratch_with_files(store: AdapterStore, payload: bytes) -> object:
    d = store.scratch_dir()
    (d / CONFIG_NAME).write_text(json.dumps({"r": 4}))
    (d / WEIGHTS_NAME).write_bytes(payload)
    return d


def test_versions_prune_delete_and_restart(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    first = store.save("a", scratch_with_files(store, b"one"), version=1)
    assert first.path == tmp_path / "adapters" / "a" / "1" and first.sha256 == file_sha256(first.path / WEIGHTS_NAME)
    assert first.size_bytes == len(b"one") + len(json.dumps({"r": 4}))
    second = store.save("a", scratch_with_files(store, b"two"), version=2)
    store.save("b", scratch_with_files(store, b"bee"), version=1)
    assert [(s.name, s.version) for s in AdapterStore(tmp_path / "adapters").load_all()] == [("a", 2), ("b", 1)]
    store.prune("a", keep=2)
    assert sorted(p.name for p in (tmp_path / "adapters" / "a").iterdir()) == ["2"]
    assert (second.path / WEIGHTS_NAME).read_bytes() == b"two"
    store.delete("a")
    assert not (tmp_path / "adapters" / "a").exists()
    assert [s.name for s in store.load_all()] == ["b"]


def test_half_written_versions_and_scratch_leftovers_are_not_loaded(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("a", scratch_with_files(store, b"one"), version=1)
    (tmp_path / "a" / "2").mkdir()  # a version without meta.json: a write cut short
    (tmp_path / "a" / "2" / WEIGHTS_NAME).write_bytes(b"partial")
    leftover = scratch_with_files(store, b"upload in progress")
    reopened = AdapterStore(tmp_path)
    assert [(s.name, s.version) for s in reopened.load_all()] == [("a", 1)]
    assert not leftover.exists()  # the scratch area is emptied at start-up
