"""Trainable LoRA on a frozen model: the layer, its injection, and its export as a PEFT adapter.

LoRA (Hu et al. 2021) as PEFT's `lora.Linear` trains it: `h = W0·x + scaling·B·A·dropout(x)`
with A kaiming-uniform (a=√5), B = 0 so training starts at the base model, and scaling α/r; the
term itself is `adapters.ops.lora_linear`, the math the server serves. Layers are nn.Linear or
GPT-2's Conv1D (weight stored (in, out)); A is (r, in) and B (out, r) for both, as PEFT stores
them. Also here: finding the original base weights in a model's safetensors, which SwitchLoRA's
export needs after training has folded switched vectors into the layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.dense import frozen_linear, uses_onednn
from adapters.layers import layer_shape
from adapters.ops import lora_linear
from adapters.peft_io import LoraModule, LoraWeights


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D of `model` by module path, except the output embeddings (lm_head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, Conv1D)) and mod is not head and name.rsplit(".", 1)[-1] != "lm_head"
    }


def select_targets(model: nn.Module, target_modules: list[str] | None) -> dict[str, nn.Module]:
    """The adaptable layers whose leaf name is in `target_modules` (None = all of them)."""
    layers = adaptable_layers(model)
    if target_modules is None:
        return layers
    leaves = {name.rsplit(".", 1)[-1] for name in layers}
    unknown = sorted(set(target_modules) - leaves)
    if unknown:
        raise ValueError(
            f"target_modules {unknown} name no adaptable linear layer of the model (choose from {sorted(leaves)})"
        )
    return {name: mod for name, mod in layers.items() if name.rsplit(".", 1)[-1] in target_modules}


class LoraLinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus one trainable LoRA term (float32 A and B, like PEFT's
    `autocast_adapter_dtype`, whatever the base dtype)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.onednn = isinstance(base_layer, nn.Linear) and uses_onednn(base_layer.weight)  # adapters.dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(x, self.base_layer, self.onednn)
        return y + lora_linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling).to(
            y.dtype
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(
    model: nn.Module, target_modules: list[str] | None, r: int, alpha: float, dropout: float, seed: int
) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap its target layers in place; returns {original module path: wrapper}.

    A is drawn from a generator seeded with `seed`, layer by layer in module order, so the
    initial adapter depends on the seed alone.
    """
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in select_targets(model, target_modules).items():
        layers[name] = LoraLinear(mod, r, alpha, dropout, generator)
        replace_module(model, name, layers[name])
    return layers


def adapter_config(layers: dict[str, nn.Module], r: int, alpha: float) -> dict:
    """The config keys of an exported adapter that shape its math (the rest are PEFT's defaults)."""
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        # PEFT sets it for Conv1D targets on load anyway; saying so spares its warning
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
    }


def export_lora(layers: dict[str, LoraLinear], r: int, alpha: float) -> LoraWeights:
    """The trained adapter as host float32 tensors, ready for `save_peft_adapter`."""
    modules = {
        name: LoraModule(
            lora_a=layer.lora_A.detach().float().cpu().contiguous(),
            lora_b=layer.lora_B.detach().float().cpu().contiguous(),
            scaling=layer.scaling,
        )
        for name, layer in layers.items()
    }
    return LoraWeights(config=adapter_config(layers, r, alpha), modules=modules)


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
