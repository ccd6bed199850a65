"""The frozen base's dense layers on CPU through oneDNN instead of MKL.

PyTorch sends an fp32 `F.linear` on the CPU to MKL's sgemm. On non-Intel CPUs (this project's
AMD EPYC: AVX-512 with full-width units) MKL takes a generic code path: measured here, 130 GFLOP/s
for a decode batch of 16 rows (576 → 1536) and 215 GFLOP/s at 2048³, where oneDNN's JIT kernels
reach 270-420 and 490 on the same weights. PyTorch already uses oneDNN for bf16 matmuls, and
inductor uses it (`mkldnn._linear_pointwise`) for frozen graphs. Its lowering wants the weight to
be a graph constant, which the engine's one compiled decoder layer, reused with every layer's
weights as inputs, cannot give it. So `onednn_linear` is a custom op: compiled graphs call it as an
opaque kernel, with the weight as an ordinary input. Same values as `F.linear` to fp32 rounding;
forward only (the frozen base in inference).

Which layers use it is decided once, when the engine wraps them (`uses_onednn`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("loraplex::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in), bias (out,) or None."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


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
    """Whether a frozen nn.Linear weight (out, in) should go through `onednn_linear`: fp32 on the CPU.

    (bf16 and fp16 matmuls already go to oneDNN in PyTorch; CUDA has its own kernels.)
    """
    global _AVAILABLE
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def frozen_linear(x: torch.Tensor, layer: torch.nn.Linear, onednn: bool) -> torch.Tensor:
    """`layer(x)` for a frozen nn.Linear, through oneDNN when `onednn` (see `uses_onednn`)."""
    return onednn_linear(x, layer.weight, layer.bias) if onednn else layer(x)
