"""Which layers of a model take LoRA: one rule for serving and for both trainers.

A target is an `nn.Linear` or a GPT-2 `Conv1D` (weight stored (in, out)), named by its module path in the
unwrapped model, which is how PEFT names it in its keys (`model.layers.0.self_attn.q_proj`). The output
embeddings (`lm_head`) are never a target: PEFT could adapt them, but their rank rows would be as wide as the
vocabulary, and the engine runs the vocabulary projection apart from the decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (or a module with those attributes) or a Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D of `model` by module path, except the output embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, Conv1D)) and mod is not head and name.rsplit(".", 1)[-1] != "lm_head"
    }


def select_targets(model: nn.Module, target_modules: list[str] | None) -> dict[str, nn.Module]:
    """The adaptable layers whose leaf name is in `target_modules` (None = all of them); ValueError for a name
    that matches none."""
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


def wrap_layers(
    model: nn.Module, layers: dict[str, nn.Module], wrap: Callable[[nn.Module], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each of `layers` {module path: layer} in `model` by `wrap(layer)`; returns {module path: wrapper}."""
    wrapped = {}
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        wrapped[name] = wrap(layer)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped[name])
    return wrapped
