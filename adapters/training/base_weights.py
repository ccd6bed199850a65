"""The original base weights of adapted layers, read from a model's safetensors files.

SwitchLoRA folds switched vectors into its training copies of the weights, so its export (ΔW = W_trained + s·B·A
− W0) needs W0 as it was: these functions find each layer's weight among the model's files before training (so
a model that cannot be exported fails at once) and read just those tensors after it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def model_directory(model: str) -> Path:
    """The local directory of a model given as a directory or a hub id (already in the HF cache)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))


def locate_base_weights(model: str, layers: dict[str, nn.Module]) -> dict[str, tuple[Path, str]]:
    """{module path: (safetensors file, key)} of each layer's original weight, checking shapes.

    Keys may carry a different prefix than the loaded model's module paths (`h.0.attn.c_attn`
    in a GPT-2 file, `transformer.h.0.attn.c_attn` in the model): a key matches a path when one
    is a dotted suffix of the other, and must match exactly one key. Raises ValueError naming
    every layer that cannot be found, before any training.
    """
    directory = model_directory(model)
    keys: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight"):
                    keys[key.removesuffix(".weight")] = (file, tuple(f.get_slice(key).get_shape()))
    found, problems = {}, []
    for name, layer in layers.items():
        base = getattr(layer, "base_layer", layer)
        matches = [k for k in keys if k == name or name.endswith("." + k) or k.endswith("." + name)]
        if len(matches) != 1:
            problems.append(f"{name}: {'no' if not matches else len(matches)} matching weights in {directory}")
        elif keys[matches[0]][1] != tuple(base.weight.shape):
            problems.append(f"{name}: the stored weight has shape {list(keys[matches[0]][1])}")
        else:
            found[name] = (keys[matches[0]][0], matches[0] + ".weight")
    if problems:
        raise ValueError("the original base weights must be read from the model's safetensors: " + "; ".join(problems))
    return found


def read_base_weights(locations: dict[str, tuple[Path, str]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only the located weights (memory-mapped, one tensor at a time), as `dtype`."""
    weights = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key) in locations.items():
        by_file.setdefault(file, []).append((name, key))
    for file, entries in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, key in entries:
                weights[name] = f.get_tensor(key).to(dtype)
    return weights
