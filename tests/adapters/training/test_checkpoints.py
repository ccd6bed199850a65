"""Checkpoint directories: written whole or not at all, only the latest kept, read back as written."""

from __future__ import annotations

import torch

from adapters.training.checkpoints import latest_checkpoint, read_checkpoint, remove_checkpoints, write_checkpoint


def test_write_read_keep_latest_and_remove(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None and latest_checkpoint(None) is None
    tensors = {"layers": {"q.lora_A": torch.arange(6.0).view(2, 3)}, "best": {"q.lora_A": torch.ones(2, 3)}}
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}, "rng": {"cpu": torch.get_rng_state()}}
    write_checkpoint(tmp_path, 10, tensors, state, {"progress": {"step": 10}})
    path = write_checkpoint(tmp_path, 20, tensors, state, {"progress": {"step": 20}})
    assert latest_checkpoint(tmp_path) == path and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020"]
    got_tensors, got_state, meta = read_checkpoint(path)
    assert meta == {"progress": {"step": 20}}
    assert torch.equal(got_tensors["layers"]["q.lora_A"], tensors["layers"]["q.lora_A"])
    assert torch.equal(got_state["rng"]["cpu"], state["rng"]["cpu"]) and set(got_tensors) == {"layers", "best"}
    remove_checkpoints(tmp_path)
    assert latest_checkpoint(tmp_path) is None and tmp_path.is_dir()


def test_a_checkpoint_cut_short_is_never_the_latest(tmp_path):
    done = write_checkpoint(tmp_path, 5, {"layers": {"w": torch.zeros(1)}}, {}, {"progress": {}})
    (tmp_path / ".step-00000009.tmp").mkdir()  # a crash while writing step 9: the rename never happened
    (tmp_path / "step-00000007").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(tmp_path) == done
    write_checkpoint(tmp_path, 10, {"layers": {"w": torch.zeros(1)}}, {}, {"progress": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]  # leftovers cleared too
