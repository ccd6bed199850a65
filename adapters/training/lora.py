"""Trainable LoRA on a frozen model: the layer, its injection, and its export as a PEFT adapter.

LoRA (Hu et al. 2021) as PEFT's `lora.Linear` trains it: `h = W0·x + scaling·B·A·dropout(x)`
with A kaiming-uniform (a=√5), B = 0 so training starts at the base model, and scaling α/r; the
term itself is `adapters.ops.lora_linear`, the math the server serves. Layers are nn.Linear or
GPT-2's Conv1D (weight stored (in, out)); A is (r, in) and B (out, r) for both, as PEFT stores
them. The frozen layer runs through what `adapters.cpu.onednn.cpu_linear` chose for it at injection.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.cpu.onednn import cpu_linear
from adapters.ops import lora_linear
from adapters.peft_io import LoraModule, LoraWeights
from adapters.targets import layer_shape, wrap_layers


class LoraLinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus one trainable LoRA term (float32 A and B, like PEFT's
    `autocast_adapter_dtype`, whatever the base dtype)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = layer_shape(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.base_layer = cpu_linear(base_layer)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + lora_linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling).to(
            y.dtype
        )


def inject_lora(
    model: nn.Module, targets: dict[str, nn.Module], r: int, alpha: float, dropout: float, seed: int
) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap its `targets` (adapters.targets.select_targets) in place; returns {module path:
    wrapper}. A is drawn from a generator seeded with `seed`, layer by layer in module order, so the initial
    adapter depends on the seed alone."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    return wrap_layers(model, targets, lambda layer: LoraLinear(layer, r, alpha, dropout, generator))


def adapter_config(layers: dict[str, nn.Module], r: int, alpha: float) -> dict:
    """The config keys of an exported adapter that shape its math (the rest are PEFT's defaults)."""
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        # PEFT sets it for Conv1D targets on load anyway; saying so spares its warning
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
    }


def export_lora(layers: dict[str, LoraLinear], r: int, alpha: float) -> LoraWeights:
    """The trained adapter as host float32 tensors, ready for `save_peft_adapter`."""
    modules = {
        name: LoraModule(
            lora_A=layer.lora_A.detach().float().cpu().contiguous(),
            lora_B=layer.lora_B.detach().float().cpu().contiguous(),
            scaling=layer.scaling,
        )
        for name, layer in layers.items()
    }
    return LoraWeights(config=adapter_config(layers, r, alpha), modules=modules)
