"""The frozen base's dense layers on the CPU through oneDNN instead of MKL.

PyTorch sends an fp32 `F.linear` on the CPU to MKL's sgemm, which takes a generic code path on non-Intel CPUs
(this project's AMD EPYC); oneDNN's JIT kernels run the same matmuls 2-3× faster (benchmarks/RESULTS.md).
PyTorch already uses oneDNN for bf16 matmuls, and inductor uses it (`mkldnn._linear_pointwise`) for frozen
graphs, but its lowering wants the weight to be a graph constant, which the engine's one compiled decoder layer,
reused with every layer's weights as inputs, cannot give it. So `onednn_linear` is a custom op: compiled graphs
call it as an opaque kernel, with the weight as an ordinary input. Same values as `F.linear` to fp32 rounding, with
gradients (the trainers' frozen layers and their vocabulary projection use it too; oneDNN takes a transposed view
of a weight at full speed, so backward needs no copies).

The choice is made once per layer: `cpu_linear` puts a `OneDnnLinear` in place of a frozen nn.Linear where oneDNN
serves it (fp32 on the CPU) and leaves every other layer as it is. For serving, a `OneDnnLinear` also keeps its
weight reordered into oneDNN's blocked layout (`pack_weight`, what inductor's freezing does for a constant weight):
a decode step streams every weight from memory, and the packed layout streams fastest. The packed copy costs the
weight's memory again and is made anew (`repack`) whenever the weight changes (a merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("loraplex::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in) or `pack_weight` of it, bias (out,) or None."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def pack_weight(weight: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """`weight` (out, in) reordered for oneDNN (an opaque mkldnn tensor of the same shape); `rows` is the
    batch size its layout is chosen for (any batch size works)."""
    # always an inference tensor, wherever it is made (a merge repacks on the engine thread, in inference mode):
    # compiled graphs guard on the dispatch keys of their inputs, so a repacked weight must look like the first
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x if weight.requires_grad else None, weight)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None)  # grad @ weight
    g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
    if ctx.needs_input_grad[1]:
        grad_w = onednn_linear(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # gradᵀ @ x: (out, in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g2.sum(0)
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def _probe() -> bool:
    """True if this torch build has the oneDNN op and it computes F.linear."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((2, 3, 8), (4, 8), (4,)))
        return torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    except RuntimeError:
        return False


_AVAILABLE: bool | None = None


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether the matmuls with a frozen weight (out, in) should go through `onednn_linear`: fp32 on the CPU.

    (bf16 and fp16 matmuls already go to oneDNN in PyTorch; CUDA has its own kernels.)
    """
    global _AVAILABLE
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def linear_for(weight: torch.Tensor):
    """`F.linear`, or `onednn_linear` where `uses_onednn(weight)`: the kernel for the matmuls with `weight`."""
    return onednn_linear if uses_onednn(weight) else F.linear


class OneDnnLinear(nn.Module):
    """A frozen nn.Linear computed by oneDNN, on a packed copy of its weight when `pack`.

    It holds the replaced layer's own `weight` and `bias` parameters, so state dicts keep their keys and an
    in-place change of the weight reaches it; after one, `repack()` renews the packed copy.
    """

    def __init__(self, linear: nn.Linear, pack: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.pack = pack
        # a plain attribute, not a buffer: no state of the model, and no second copy in its state dict
        self.packed = pack_weight(self.weight) if pack else None

    def repack(self) -> None:
        """Pack the weight anew after it changed (a no-op without packing)."""
        if self.pack:
            self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight if self.packed is None else self.packed, self.bias)


def cpu_linear(layer: nn.Module, pack: bool = False) -> nn.Module:
    """`layer` itself, or a `OneDnnLinear` in its place for a frozen fp32 nn.Linear on the CPU."""
    if isinstance(layer, nn.Linear) and uses_onednn(layer.weight):
        return OneDnnLinear(layer, pack)
    return layer
