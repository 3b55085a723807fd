"""ARMORLinear: y = A (S (B x)) + bias, what the ARMOR method puts in place of a linear.

The factorization itself is :func:`sparsewise.solvers.armor.armor_factorize` (Liu et al. 2025).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..solvers.armor import ARMORFactors, _block_sizes, _left, _right, armor_factorize, block_diag_apply
from .registry import register_module


@register_module("armor")
class ARMORLinear(nn.Module):
    """y = A (S (B x)) + bias, with S a 2:4 sparse [out, in] matrix and A, B block diagonal.

    ``sparse`` is a bias-free ``nn.Linear`` holding S (norms folded in), so whatever serves
    pruned Linears (2:4 kernels, sparsity reports) applies to it; ``a_blocks`` [out/bo, bo, bo]
    and ``b_blocks`` [in/bi, bi, bi] are applied through reshapes, never as dense matrices.
    """

    def __init__(
        self, in_features: int, out_features: int, *, block_size: int | tuple[int, int] = 32, bias: bool = True,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        out_block, in_block = _block_sizes(block_size, out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        kwargs = {"device": device, "dtype": dtype}
        self.sparse = nn.Linear(in_features, out_features, bias=False, **kwargs)
        self.a_blocks = nn.Parameter(torch.eye(out_block, **kwargs).repeat(out_features // out_block, 1, 1))
        self.b_blocks = nn.Parameter(torch.eye(in_block, **kwargs).repeat(in_features // in_block, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_features, **kwargs)) if bias else None

    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.a_blocks.shape[1]), int(self.b_blocks.shape[1])

    @classmethod
    def from_factors(cls, factors: ARMORFactors, bias: torch.Tensor | None = None, *, dtype=None) -> ARMORLinear:
        """The module of :func:`armor_factorize`'s result (``dtype`` defaults to the factors')."""
        core = factors.core()
        dtype = dtype or core.dtype
        out_features, in_features = core.shape
        module = cls(
            in_features, out_features, block_size=(factors.a_blocks.shape[1], factors.b_blocks.shape[1]),
            bias=bias is not None, device=core.device, dtype=dtype,
        )
        with torch.no_grad():
            module.sparse.weight.copy_(core)
            module.a_blocks.copy_(factors.a_blocks)
            module.b_blocks.copy_(factors.b_blocks)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, energy: torch.Tensor, **options: Any) -> tuple[ARMORLinear, ARMORFactors]:
        """Factorize an ``nn.Linear`` (or transformers' Conv1D) with :func:`armor_factorize` options.

        Returns the new module (in the linear's dtype and device) and the factors.
        """
        from ..models.adapters import PrunableLayer, is_prunable_module

        if not is_prunable_module(linear):
            raise ConfigError(f"ARMORLinear.from_linear needs an nn.Linear or Conv1D, got {type(linear).__name__}.")
        weight = PrunableLayer(name="layer", module=linear).get_weight()
        factors = armor_factorize(weight, energy.to(weight.device), **options)
        bias = getattr(linear, "bias", None)
        return cls.from_factors(factors, bias, dtype=weight.dtype), factors

    def dense_weight(self) -> torch.Tensor:
        """A S B as a dense [out, in] matrix (for checks; the forward never builds it)."""
        return _right(_left(self.a_blocks, self.sparse.weight), self.b_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = block_diag_apply(self.a_blocks, self.sparse(block_diag_apply(self.b_blocks, x)))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, bias={self.bias is not None}")

    def checkpoint_spec(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this module before loading its tensors."""
        return {"type": "armor", "in_features": self.in_features, "out_features": self.out_features,
                "block_size": list(self.block_size), "bias": self.bias is not None}

    @classmethod
    def from_checkpoint_spec(cls, spec: dict[str, Any]) -> ARMORLinear:
        return cls(int(spec["in_features"]), int(spec["out_features"]), block_size=tuple(spec["block_size"]),
                   bias=bool(spec["bias"]))
