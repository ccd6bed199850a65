"""SwitchLoRA: low-rank training that keeps switching its rank directions, so the base weights learn full rank.

Zhou, Wang & Xu, "SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information", arXiv 2406.06564,
following the authors' code (github.com/asfsdsf/SwitchLoRA: `switchlora/switch_lora.py`, `optimizer.py`,
`lora_utils.py`).

Each target layer computes h = W·x + scaling·B·A·x and keeps two banks of C = min(in, out) candidate vectors, for
A's rows and for B's columns. Every optimizer step a few rows of A, and as many columns of B, are replaced by the
next candidates of their bank after folding the old direction into W, so the layer's function is unchanged:

    A row i → candidate c:     W += scaling · B[:, i] ⊗ (A[i] − c);    A[i] = c
    B column j → candidate c:  W += scaling · (B[:, j] − c) ⊗ A[j];    B[:, j] = c

W is the training copy and accumulates full-rank information. The trained vector goes back into its candidate slot.
Its counterpart (B[:, i] for an A row) gets its Adam state reset and its gradient zeroed for `warm_steps` steps.
`StepAdamW` keeps one Adam step count per row of A and per column of B, so a reset vector gets a fresh bias
correction. Switching is "continuous": both sides advance through their r vectors in lock-step, B half a turn
(r//2) ahead of A so that the two sides never touch the same index. A single cursor k per layer (the number of
vectors switched per side so far) then gives every position:

    A row (k + j) mod r and B column (k + r//2 + j) mod r hold candidate slot (k − r + j) mod C,  for j = 0..r−1

Switching n vectors writes them back to slots k−r .. k−r+n−1, loads slots k .. k+n−1, and advances k by n.
Per step and side, n = r / interval(t) is rounded stochastically, where
interval(t) = interval0 / 0.3^((t+1) / (ratio·T)). n is capped at r//2 minus the number of vectors still frozen,
so a frozen vector is never switched again and no A row / B column pair is ever frozen on both sides. As in the
authors' code, a layer with r = 1 or with no spare candidate (r = C) never switches.

At injection W absorbs −scaling·B·A (the authors' `layer2lora`), so the model starts as the base model; a switch
never changes the function either, only training does. A run yields new base weights, not an adapter.
`export_switchlora` turns ΔW = W + scaling·B·A − W0 into a rank-k PEFT LoRA by truncated SVD. The export is lossy and
reports the energy it kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.cpu.onednn import cpu_linear
from adapters.targets import layer_shape, wrap_layers
from adapters.training.config import SwitchInit

# ΔW up to this many elements is decomposed in float64 on the CPU; larger ones in float32 on their own device
_FLOAT64_SVD_NUMEL = 1 << 20


def init_bounds(in_features: int, out_features: int, r: int, init: SwitchInit = "switchlora") -> tuple[float, float]:
    """Uniform bounds of A's and B's candidates (the authors' `get_init_lora_bound`). "switchlora": B·A has a
    Kaiming-like output scale, and a step on A has the same size as a step on B; "lora" (their `origin_lora`): A
    Kaiming-uniform, B zero (the bank of B then fills with trained columns as they are switched out)."""
    m, n = out_features, in_features
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    if init == "lora":
        return math.sqrt(3) * gain / math.sqrt(n), 0.0
    if init != "switchlora":
        raise ValueError(f"init must be 'switchlora' or 'lora', got {init!r}")
    std_a = ((math.sqrt(m) * r) / n**1.5) ** 0.25 * math.sqrt(gain)
    std_b = (r / math.sqrt(m * n)) ** 0.25 * math.sqrt(gain)
    return math.sqrt(3) * std_a, math.sqrt(3) * std_b


class SwitchLoraLinear(nn.Module):
    """Wraps a base nn.Linear or transformers Conv1D. base_layer.weight is the TRAINING COPY and is
    mutated in place, at injection and by switches (requires_grad False)."""

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, generator: torch.Generator, init: SwitchInit = "switchlora"
    ):
        super().__init__()
        self.in_features, self.out_features = layer_shape(base_layer)
        self.n_candidates = min(self.in_features, self.out_features)
        if not 1 <= r <= self.n_candidates:
            raise ValueError(f"r must be in [1, min(in, out) = {self.n_candidates}], got {r}")
        self.base_layer = cpu_linear(base_layer.requires_grad_(False))  # oneDNN for an fp32 nn.Linear on the CPU
        self.r, self.scaling = r, alpha / r
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight stored (in, out)
        w = base_layer.weight
        bound_a, bound_b = init_bounds(self.in_features, self.out_features, r, init)
        bank_a = torch.empty(self.n_candidates, self.in_features).uniform_(-bound_a, bound_a, generator=generator)
        bank_b = torch.empty(self.n_candidates, self.out_features).uniform_(-bound_b, bound_b, generator=generator)
        self.register_buffer("cand_A", bank_a.to(w))  # (C, in)
        self.register_buffer("cand_B", bank_b.to(w))  # (C, out)
        # the layout of cursor k = 0 (module docstring): A row j and B column (r//2 + j) mod r hold slot C − r + j
        slots = torch.arange(self.n_candidates - r, self.n_candidates, device=w.device)
        self.lora_A = nn.Parameter(self.cand_A[slots].clone())  # (r, in)
        self.lora_B = nn.Parameter(self.cand_B[slots.roll(r // 2)].T.contiguous())  # (out, r)
        # A and B start non-zero; the training copy of W absorbs −scaling·B·A (the authors' `layer2lora`), so the
        # layer starts as the base layer's function and ΔW = W + scaling·B·A − W0 starts at zero
        with torch.no_grad():
            self.weight_oi().sub_((self.lora_B.float() @ self.lora_A.float()).mul_(self.scaling).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def weight_oi(self) -> torch.Tensor:
        """The base weight as an (out, in) view: in-place changes reach base_layer.weight."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The current effective weight W + scaling·B·A, (out, in), computed in `dtype` (default: the weight's)."""
        w, a, b = (t.to(dtype or t.dtype) for t in (self.weight_oi(), self.lora_A, self.lora_B))
        return w + self.scaling * (b @ a)

    @torch.no_grad()
    def switch_a_rows(self, rows: torch.Tensor, old_slots: torch.Tensor, new_slots: torch.Tensor) -> None:
        """A[rows] ← cand_A[new_slots]. The trained rows go back to cand_A[old_slots]. W absorbs the difference."""
        new = self.cand_A[new_slots].clone()  # (n, in); read before the write-back, which may hit the same slots
        old = self.lora_A[rows]
        self.weight_oi().add_((self.lora_B[:, rows] @ (old - new)).mul_(self.scaling).to(self.base_layer.weight))
        self.cand_A[old_slots] = old
        self.lora_A[rows] = new

    @torch.no_grad()
    def switch_b_columns(self, cols: torch.Tensor, old_slots: torch.Tensor, new_slots: torch.Tensor) -> None:
        """B[:, cols] ← cand_B[new_slots]ᵀ. The trained columns go back to cand_B[old_slots]. W absorbs the difference."""
        new = self.cand_B[new_slots].T.clone()  # (out, n)
        old = self.lora_B[:, cols]
        self.weight_oi().add_(((old - new) @ self.lora_A[cols]).mul_(self.scaling).to(self.base_layer.weight))
        self.cand_B[old_slots] = old.T
        self.lora_B[:, cols] = new


def inject_switchlora(
    model: nn.Module, targets: dict[str, nn.Module], r: int, alpha: float, seed: int, init: SwitchInit = "switchlora"
) -> dict[str, SwitchLoraLinear]:
    """Freeze `model` and replace its `targets` (adapters.targets.select_targets) by SwitchLoraLinear layers in
    place; returns {module path of the original layer, e.g. 'model.layers.0.self_attn.q_proj': wrapper}. The
    candidate banks are drawn from one generator seeded with `seed`, in module order."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    return wrap_layers(model, targets, lambda layer: SwitchLoraLinear(layer, r, alpha, generator, init))


def switchlora_param_groups(layers: dict[str, SwitchLoraLinear], weight_decay: float = 0.0) -> list[dict]:
    """StepAdamW groups: every lora_A with a step count per row, every lora_B with one per column."""
    return [
        {"params": [layer.lora_A for layer in layers.values()], "vector_dim": 0, "weight_decay": weight_decay},
        {"params": [layer.lora_B for layer in layers.values()], "vector_dim": 1, "weight_decay": weight_decay},
    ]


class StepAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose bias correction uses one step count per vector of a LoRA matrix.

    Group key `vector_dim`: 0 gives a step per row (lora_A, step shape (r, 1)), 1 a step per column (lora_B,
    shape (1, r)), and None (the default) gives plain per-tensor AdamW. Build the groups with
    `switchlora_param_groups` and add any other trainable parameters as groups without `vector_dim`. Weight decay
    also shrinks frozen vectors, as in the authors' code: only their gradient and moments are zero.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid StepAdamW hyperparameters: {lr=} {betas=} {eps=} {weight_decay=}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, vector_dim=None))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, dim = group["betas"], group["lr"], group["vector_dim"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    shape = () if dim is None else (p.shape[0], 1) if dim == 0 else (1, p.shape[1])
                    state["step"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != p.device:  # a checkpoint loaded with map_location="cpu"
                    state["step"] = state["step"].to(p.device)
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                step += 1
                p.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                # bias corrections per vector, in float64 like torch's Python-float ones
                step_size = (lr / (1 - beta1 ** step.double())).to(p.dtype)
                bc2_sqrt = (1 - beta2 ** step.double()).sqrt().to(p.dtype)
                denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
                p.sub_(exp_avg / denom * step_size)
        return loss

    @torch.no_grad()
    def reset_vectors(self, param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
        """Zero exp_avg, exp_avg_sq and step of rows (dim 0) or columns (dim 1) `index` of `param`."""
        state = self.state.get(param)
        if not state:  # no step taken yet: nothing to reset
            return
        if state["step"].ndim != 2 or state["step"].shape[dim] != param.shape[dim]:
            raise ValueError(f"reset_vectors(dim={dim}) needs a parameter of a group with vector_dim={dim}")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state[key].index_fill_(dim, index.to(state[key].device), 0)


class SwitchScheduler:
    """When and which vectors switch: the interval schedule, the cursors and the frozen counters of every layer.

    Call `step(t)` at every optimizer step t (0-based) after backward (and gradient clipping) and before
    `optimizer.step()`.
    """

    def __init__(
        self,
        layers: dict[str, SwitchLoraLinear],
        optimizer: StepAdamW,
        total_steps: int,
        interval0: float = 40,
        ratio: float = 0.1,
        warm_steps: int = 5,
        seed: int = 0,
    ):
        if interval0 < 2 * warm_steps:  # at most one of each A row / B column pair may be frozen
            raise ValueError(f"interval0 ({interval0}) must be >= 2 * warm_steps ({2 * warm_steps})")
        if total_steps < 1 or ratio <= 0 or warm_steps < 0:
            raise ValueError(
                f"need total_steps >= 1, ratio > 0, warm_steps >= 0: {total_steps=} {ratio=} {warm_steps=}"
            )
        self.layers, self.optimizer = layers, optimizer
        self.total_steps, self.interval0, self.ratio, self.warm_steps = total_steps, interval0, ratio, warm_steps
        self.generator = torch.Generator().manual_seed(seed)  # the stochastic rounding of n
        self.cursor = dict.fromkeys(layers, 0)  # k of the module docstring
        # steps each A row / B column stays frozen, (r,) on the CPU
        self.frozen_a = {name: torch.zeros(layer.r, dtype=torch.long) for name, layer in layers.items()}
        self.frozen_b = {name: torch.zeros(layer.r, dtype=torch.long) for name, layer in layers.items()}

    def interval(self, t: int) -> float:
        """interval0 / 0.3^((t+1) / (ratio·T)): one third of the switching rate at t + 1 = ratio·T."""
        rate = max(0.3 ** ((t + 1) / (self.ratio * self.total_steps)), 1e-8)
        return self.interval0 / rate

    @torch.no_grad()
    def step(self, t: int) -> int:
        """Switch this step's vectors in every layer and zero the gradients of the frozen ones.

        Returns the number of vectors switched, A rows plus B columns."""
        interval = self.interval(t)
        draws = torch.rand(len(self.layers), generator=self.generator, dtype=torch.float64).tolist()
        switched = 0
        for (name, layer), u in zip(self.layers.items(), draws):
            frozen_a, frozen_b = self.frozen_a[name], self.frozen_b[name]
            rate = layer.r / interval
            n = int(rate) + int(u < rate - int(rate))  # stochastic rounding: E[n] = rate
            room = layer.r // 2 - max(int((frozen_a > 0).sum()), int((frozen_b > 0).sum()))
            n = min(n, room) if layer.n_candidates > layer.r else 0
            if n > 0:
                self._switch(name, layer, n)
                switched += 2 * n
            if layer.lora_A.grad is not None:
                layer.lora_A.grad[(frozen_a > 0).to(layer.lora_A.device)] = 0
            if layer.lora_B.grad is not None:
                layer.lora_B.grad[:, (frozen_b > 0).to(layer.lora_B.device)] = 0
            frozen_a.sub_(1).clamp_(min=0)
            frozen_b.sub_(1).clamp_(min=0)
        return switched

    def _switch(self, name: str, layer: SwitchLoraLinear, n: int) -> None:
        k, r, c = self.cursor[name], layer.r, layer.n_candidates
        j = torch.arange(n, device=layer.lora_A.device)
        rows_a, cols_b = (k + j) % r, (k + r // 2 + j) % r
        old_slots, new_slots = (k - r + j) % c, (k + j) % c
        layer.switch_a_rows(rows_a, old_slots, new_slots)
        self.optimizer.reset_vectors(layer.lora_B, rows_a, dim=1)
        self.frozen_b[name][rows_a.cpu()] = self.warm_steps
        layer.switch_b_columns(cols_b, old_slots, new_slots)
        self.optimizer.reset_vectors(layer.lora_A, cols_b, dim=0)
        self.frozen_a[name][cols_b.cpu()] = self.warm_steps
        self.cursor[name] = k + n

    def state_dict(self) -> dict:
        """Cursors, frozen counters and generator state: with the layers' and the optimizer's state dicts, all a
        bit-exact resume needs."""
        return {
            "generator": self.generator.get_state(),
            "cursor": dict(self.cursor),
            "frozen_a": {name: f.clone() for name, f in self.frozen_a.items()},
            "frozen_b": {name: f.clone() for name, f in self.frozen_b.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["cursor"]) != set(self.layers):
            raise ValueError("scheduler state is for different layers")
        self.generator.set_state(state["generator"])
        self.cursor = dict(state["cursor"])
        self.frozen_a = {name: f.clone().long().cpu() for name, f in state["frozen_a"].items()}
        self.frozen_b = {name: f.clone().long().cpu() for name, f in state["frozen_b"].items()}


@torch.no_grad()
def export_switchlora(
    layers: dict[str, SwitchLoraLinear], original_weights: dict[str, torch.Tensor], export_rank: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """For each layer name: ΔW = W_trained + scaling·B·A − W0 in (out, in) orientation (original_weights[name] is
    W0 in the layer's own stored orientation, i.e. (in, out) for Conv1D), truncated SVD to export_rank, returned as
    float32 CPU tensors (lora_A (k, in), lora_B (out, k)) with the singular values split as sqrt between them, so
    that B @ A ≈ ΔW with scaling 1 (a PEFT config with r = lora_alpha = k). k = export_rank for every layer: a layer
    with min(in, out) < export_rank is zero-padded. Returns also the fraction of ΔW's energy retained, sum over all
    layers of kept σ² / sum of all σ² (1.0 when ΔW is zero)."""
    if export_rank < 1:
        raise ValueError(f"export_rank must be >= 1, got {export_rank}")
    exported, kept, total = {}, 0.0, 0.0
    for name, layer in layers.items():
        w0 = original_weights[name].T if layer.fan_in_fan_out else original_weights[name]
        small = w0.numel() <= _FLOAT64_SVD_NUMEL
        dtype, device = (torch.float64, torch.device("cpu")) if small else (torch.float32, w0.device)
        delta = layer.delta_weight(dtype).to(device) - w0.to(device, dtype)  # (out, in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(export_rank, s.numel())
        root = s[:k].sqrt()
        lora_A = torch.zeros(export_rank, layer.in_features)
        lora_B = torch.zeros(layer.out_features, export_rank)
        lora_A[:k] = (root[:, None] * vh[:k]).float().cpu()
        lora_B[:, :k] = (u[:, :k] * root).float().cpu()
        exported[name] = (lora_A, lora_B)
        kept += float(s[:k].double().square().sum())
        total += float(s.double().square().sum())
    return exported, (kept / total if total > 0 else 1.0)
