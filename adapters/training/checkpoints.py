"""Training checkpoints on disk: one directory per step, written atomically, only the latest kept.

As HF Trainer's `checkpoint-N/` folders (optimizer.pt, scheduler.pt, rng_state.pth,
trainer_state.json) with `save_total_limit=1`, and a rename as the commit point: a crash leaves
either the previous checkpoint or the new one, never half of one. `<root>/step-00000040/` holds
`<group>.safetensors` per group of named tensors (adapter layers, best state), `state.pt` (the
optimizer's, schedulers' and RNG states: nested dicts of tensors and numbers, read back with
`torch.load(weights_only=True)`, which unpickles no code) and `trainer_state.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

META_NAME = "trainer_state.json"
STATE_NAME = "state.pt"


def write_checkpoint(
    root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, meta: dict
) -> Path:
    """Write `<root>/step-N` (temp dir, fsync, rename), then remove older checkpoints."""
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for group, named in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, tmp / f"{group}.safetensors")
    torch.save(state, tmp / STATE_NAME)
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in [*root.glob("step-*"), *root.glob(".step-*.tmp")]:  # older ones, and any a crash left
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path | None) -> Path | None:
    """The newest complete checkpoint under `root` (None when there is none)."""
    if root is None or not root.is_dir():
        return None
    done = sorted(meta.parent for meta in root.glob(f"step-*/{META_NAME}"))
    return done[-1] if done else None


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(tensor groups, state, meta) of a checkpoint directory, on the CPU."""
    tensors = {f.stem: load_file(f) for f in path.glob("*.safetensors")}
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    return tensors, state, json.loads((path / META_NAME).read_text())


def remove_checkpoints(root: Path) -> None:
    """Drop every checkpoint (and leftover temp dir) under `root`, leaving `root` itself."""
    for old in [*root.glob("step-*"), *root.glob(".step-*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)
