"""SparseDictionaryLinear: y = D (C x) + bias, what the CoSpaDi method puts in place of a linear.

The factorization is :func:`sparsewise.solvers.cospadi.cospadi_factorize` (Shmalko et al. 2025).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..solvers.cospadi import DictionaryFactors
from .registry import register_module


@register_module("cospadi")
class SparseDictionaryLinear(nn.Module):
    """y = D (C x) + bias with D [out, atoms] dense and C [atoms, in] column-sparse.

    ``codes`` is a bias-free ``nn.Linear`` holding C (``nonzeros`` per input column), so whatever
    serves pruned Linears (sparse checkpoints, bit-plane kernels, sparsity reports) applies to it;
    ``dictionary`` is a plain ``nn.Linear`` holding D and the original bias.
    """

    def __init__(self, in_features: int, out_features: int, atoms: int, *, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codes = nn.Linear(in_features, atoms, bias=False, device=device, dtype=dtype)
        self.dictionary = nn.Linear(atoms, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def atoms(self) -> int:
        return self.codes.out_features

    @classmethod
    def from_factors(cls, factors: DictionaryFactors, bias: torch.Tensor | None = None, *,
                     dtype=None) -> SparseDictionaryLinear:
        dtype = dtype or factors.dictionary.dtype
        out_features, atoms = factors.dictionary.shape
        module = cls(int(factors.codes.shape[1]), int(out_features), int(atoms), bias=bias is not None,
                     device=factors.dictionary.device, dtype=dtype)
        with torch.no_grad():
            module.codes.weight.copy_(factors.codes)
            module.dictionary.weight.copy_(factors.dictionary)
            if bias is not None:
                module.dictionary.bias.copy_(bias.detach())
        return module

    def dense_weight(self) -> torch.Tensor:
        """D C as a dense [out, in] matrix (for checks; the forward never builds it)."""
        return self.dictionary.weight @ self.codes.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dictionary(self.codes(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}"

    def checkpoint_spec(self) -> dict[str, Any]:
        return {"type": "cospadi", "in_features": self.in_features, "out_features": self.out_features,
                "atoms": self.atoms, "bias": self.dictionary.bias is not None}

    @classmethod
    def from_checkpoint_spec(cls, spec: dict[str, Any]) -> SparseDictionaryLinear:
        return cls(int(spec["in_features"]), int(spec["out_features"]), int(spec["atoms"]), bias=bool(spec["bias"]))
