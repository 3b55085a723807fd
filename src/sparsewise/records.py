"""The one contract between finding sparsity and using it.

Everything that *finds* sparsity (pruners, allocators, trainers) leaves the model's prunable
weights holding zeros and hands over one :class:`LayerRecord` per pruned tensor. Everything
that *uses* sparsity (formats, reports, kernels, runtime) starts from these records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

RECORDS_ATTR = "_sparsewise_records"


@dataclass
class LayerRecord:
    """What was done to one weight tensor.

    name:      fully qualified module name (``model.layers.0.mlp.down_proj``)
    pattern:   pattern string, ``"unstructured"`` or ``"N:M"`` (groups along the input dim)
    sparsity:  requested fraction of zeros
    achieved:  measured fraction of zeros after pruning
    method:    method registry name
    shape:     weight shape as [out_features, in_features]
    info:      method-specific facts worth reporting (e.g. the damping SparseGPT needed)
    mask:      bool tensor [out, in], True = weight kept. Not saved in JSON; derivable from weights.
    """

    name: str
    pattern: str
    sparsity: float
    achieved: float
    method: str
    shape: tuple[int, int]
    info: dict[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("mask")
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerRecord:
        return cls(
            name=data["name"],
            pattern=data["pattern"],
            sparsity=float(data["sparsity"]),
            achieved=float(data["achieved"]),
            method=data["method"],
            shape=tuple(data["shape"]),
            info=dict(data.get("info", {})),
        )


def get_records(model: torch.nn.Module) -> dict[str, LayerRecord]:
    """Mask records attached to a model by pruning or loading (empty dict if none)."""
    return getattr(model, RECORDS_ATTR, {})


def set_records(model: torch.nn.Module, records: dict[str, LayerRecord]) -> None:
    # Plain attribute (not a buffer): records are metadata, the zeros live in the weights.
    object.__setattr__(model, RECORDS_ATTR, dict(records))
