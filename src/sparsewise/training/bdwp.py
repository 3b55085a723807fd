"""BDWP: bidirectional N:M weight pruning for training (Fang et al. 2023, "Efficient N:M Sparse
DNN Training Using Algorithm, Architecture, and Dataflow Co-Design").

For a Linear y = x W^T + b with dense master weights W [out, in], every iteration::

    forward   y  = x (W ⊙ M_fwd)^T + b     M_fwd: top-N |w| of every M consecutive *inputs* of each row
    backward  dx = dy (W ⊙ M_bwd)          M_bwd: top-N |w| of every M consecutive *outputs* of each column
              dW = dy^T x                  dense (straight-through to the master weights)
              db = sum over tokens of dy

Each of the two activation matmuls is then an N:M sparse GEMM along the dimension it reduces
(in for the forward, out for dx), which is what the paper's SAT accelerator exploits; here the
algorithm only (accuracy), the FPGA dataflow is out of scope. Both masks come from |W| at every
forward. The paper gives the pruning dimensions in its abstract only: partly unverified.

Installed by overriding ``module.forward`` (an instance attribute) at init; ``finalize`` restores
the module's own forward and leaves W hard-pruned with the forward mask M_fwd. nn.Linear only:
out_features must be divisible by M too, for the backward groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..patterns import nm_mask
from .base import MethodBase, register
from .controller import MASK_BUFFER
from .ste import require_nm

if TYPE_CHECKING:
    from .controller import SparseTraining

_NO_FORWARD = object()


def bidirectional_masks(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_fwd, M_bwd) of a [out, in] weight: N:M by |w| along in-features, and along out-features."""
    score = weight.detach().abs()
    return nm_mask(score, n, m), nm_mask(score.T, n, m).T


class BidirectionalNMLinear(torch.autograd.Function):
    """y = x (W ⊙ M_fwd)^T + b; dx = dy (W ⊙ M_bwd); dW = dy^T x dense; db = sum dy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                forward_mask: torch.Tensor, backward_mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, backward_mask)
        ctx.has_bias = bias is not None
        return F.linear(x, weight * forward_mask, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, backward_mask = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        # under autocast dy arrives in the low-precision dtype: compute in it, autograd casts back
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight * backward_mask).to(grad_out.dtype)
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = flat.T @ x.reshape(-1, x.shape[-1]).to(flat.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0)
        return grad_x, grad_weight, grad_bias, None, None


def bdwp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, m: int,
                mask_out: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear under BDWP; the forward mask is also copied into ``mask_out`` when given."""
    with torch.no_grad():
        forward_mask, backward_mask = bidirectional_masks(weight, n, m)
        if mask_out is not None:
            mask_out.copy_(forward_mask)
    return BidirectionalNMLinear.apply(x, weight, bias, forward_mask, backward_mask)


@register
class BidirectionalWeightPruning(MethodBase):
    """BDWP (see the module docstring). No options: the pattern comes from ``attach(pattern=...)``."""
    supports_sharding: ClassVar[bool] = False

    name: ClassVar[str] = "bdwp"
    masks_gradients: ClassVar[bool] = False  # dense master weights receive dense dW

    def __init__(self) -> None:
        self.n = self.m = 0
        self._saved_forward: dict[str, Any] = {}

    def init(self, run: SparseTraining) -> None:
        self.n, self.m = require_nm(self.name, run)
        for item in run.layers.values():
            if type(item.module) is not nn.Linear:  # a subclass may change forward: do not override it
                raise ConfigError(f"bdwp replaces nn.Linear's forward; {item.name} is a {type(item.module).__name__}. "
                                  "Exclude it (exclude=[...]) or use 'srste' for Conv1D/Conv2d layers.")
            if item.layer.out_features % self.m:
                raise ConfigError(f"bdwp also prunes along out-features in the backward pass: {item.name} has "
                                  f"{item.layer.out_features} outputs, not divisible by M={self.m}; exclude it.")
        for name, item in run.layers.items():
            self._install(name, item.module)
            with torch.no_grad():
                item.mask.copy_(bidirectional_masks(item.module.weight, self.n, self.m)[0])

    def _install(self, name: str, module: nn.Linear) -> None:
        self._saved_forward[name] = module.__dict__.get("forward", _NO_FORWARD)
        n, m = self.n, self.m

        def forward(x: torch.Tensor) -> torch.Tensor:
            return bdwp_linear(x, module.weight, module.bias, n, m, module._buffers.get(MASK_BUFFER))

        module.forward = forward

    def finalize(self, run: SparseTraining) -> None:
        for name, item in run.layers.items():
            saved = self._saved_forward.pop(name, _NO_FORWARD)
            if saved is _NO_FORWARD:
                item.module.__dict__.pop("forward", None)
            else:
                item.module.forward = saved
            with torch.no_grad():
                item.mask.copy_(bidirectional_masks(item.module.weight, self.n, self.m)[0])
