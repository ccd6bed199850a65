"""Training methods as objects: what the trainer asks of LoRA and of SwitchLoRA.

A method wraps the target layers of the frozen model in its trainable layers, builds their optimizer, takes part
in every optimizer step (SwitchLoRA switches rank directions there), names the layer state that a checkpoint keeps
and the state that makes the adapter, and exports the trained layers as a PEFT adapter. The trainer holds one and
never asks which method it is.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.peft_io import LoraModule, LoraWeights
from adapters.training.base_weights import locate_base_weights, read_base_weights
from adapters.training.config import TrainConfig
from adapters.training.lora import adapter_config, export_lora, inject_lora
from adapters.training.switchlora import (
    StepAdamW,
    SwitchScheduler,
    export_switchlora,
    inject_switchlora,
    switchlora_param_groups,
)


class LoraMethod:
    """The LoRA method (Hu et al. 2021): A and B train under AdamW; the adapter is A and B as they end."""

    state_keys: tuple[str, ...] | None = ("lora_A", "lora_B")
    """The layer state a checkpoint keeps (None: all of it)."""
    best_keys: tuple[str, ...] = ("lora_A", "lora_B")
    """The layer state the adapter is made of (kept as the best one with early stopping)."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps

    def inject(self, model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Freeze `model` and wrap `targets` in trainable layers; returns {module path: layer}."""
        c = self.cfg
        return inject_lora(model, targets, c.rank, c.alpha, c.dropout, c.seed)

    def optimizer(self, layers: dict[str, nn.Module]) -> torch.optim.Optimizer:
        params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
        return torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward (and clipping) and before `optimizer.step()` of optimizer step `step` (0-based)."""

    def state_dict(self) -> dict | None:
        """The method's own state beyond the layers and the optimizer (for a checkpoint)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def export(self, layers: dict[str, nn.Module]) -> tuple[LoraWeights, float | None]:
        """(the adapter, the share of the weight change's energy it keeps where it is an approximation)."""
        return export_lora(layers, self.cfg.rank, self.cfg.alpha), None


class SwitchLoraMethod(LoraMethod):
    """SwitchLoRA (arXiv 2406.06564): the training copies of W, A, B and the candidate banks are all state; the
    adapter is W + s·B·A − W0, exported at `export_rank` by truncated SVD."""

    state_keys = None
    best_keys = ("lora_A", "lora_B", "base_layer.weight")

    def inject(self, model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        c = self.cfg
        self.base_weights = locate_base_weights(c.model, targets)  # fails now rather than after training
        return inject_switchlora(model, targets, c.rank, c.alpha, c.seed, c.switch_init)

    def optimizer(self, layers: dict[str, nn.Module]) -> torch.optim.Optimizer:
        c = self.cfg
        optimizer = StepAdamW(switchlora_param_groups(layers, c.weight_decay), lr=c.learning_rate,
                              weight_decay=c.weight_decay)  # fmt: skip
        self.switch = SwitchScheduler(
            layers, optimizer, self.total_steps, interval0=c.switch_interval, ratio=c.switch_ratio,
            warm_steps=c.switch_warm_steps, seed=c.seed,
        )  # fmt: skip
        return optimizer

    def before_optimizer_step(self, step: int) -> None:
        self.switch.step(step)

    def state_dict(self) -> dict | None:
        return self.switch.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.switch.load_state_dict(state)

    def export(self, layers: dict[str, nn.Module]) -> tuple[LoraWeights, float | None]:
        rank = self.cfg.export_rank or self.cfg.rank
        pairs, energy = export_switchlora(layers, read_base_weights(self.base_weights, torch.float32), rank)
        modules = {name: LoraModule(a.contiguous(), b.contiguous(), 1.0) for name, (a, b) in pairs.items()}
        # scaling 1: r = lora_alpha = the exported rank
        return LoraWeights(config=adapter_config(layers, rank, rank), modules=modules), energy


METHODS: dict[str, type[LoraMethod]] = {"lora": LoraMethod, "switchlora": SwitchLoraMethod}
