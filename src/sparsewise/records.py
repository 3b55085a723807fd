"""The one contract between finding sparsity and using it.

Everything that *finds* sparsity (pruners, allocators, trainers) leaves the model's prunable
weights holding zeros and hands over one :class:`LayerRecord` per pruned tensor. Everything
that *uses* sparsity (formats, reports, kernels, runtime) starts from these records.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, asdict, dataclass, field
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
               Held packed to bits in CPU memory (1/8 of a bool tensor: at 7B scale 0.8 GB instead
               of 6.5 GB, and the device-to-host copy of each layer's mask 8x smaller).
    """

    name: str
    pattern: str
    sparsity: float
    achieved: float
    method: str
    shape: tuple[int, int]
    info: dict[str, Any] = field(default_factory=dict)
    mask: InitVar[torch.Tensor | None] = None
    _mask_bits: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _mask_shape: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, mask: torch.Tensor | None) -> None:
        self._set_mask(mask)

    def _get_mask(self) -> torch.Tensor | None:
        if self._mask_bits is None:
            return None
        from .formats.compressed import unpack_bits  # the checkpoint's 1-bit layout (formats imports records)

        return unpack_bits(self._mask_bits, 1, math.prod(self._mask_shape)).bool().reshape(self._mask_shape)

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None or isinstance(mask, property):  # the dataclass default seen before the property below
            self._mask_bits = self._mask_shape = None
            return
        from .formats.compressed import pack_bits

        self._mask_bits = pack_bits(mask, 1).cpu()  # packed on the mask's own device: the copy is 8x smaller
        self._mask_shape = tuple(mask.shape)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_mask_bits")
        data.pop("_mask_shape")
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


LayerRecord.mask = property(LayerRecord._get_mask, LayerRecord._set_mask)  # after @dataclass: init keeps mask=None


def get_records(model: torch.nn.Module) -> dict[str, LayerRecord]:
    """Mask records attached to a model by pruning or loading (empty dict if none)."""
    return getattr(model, RECORDS_ATTR, {})


def set_records(model: torch.nn.Module, records: dict[str, LayerRecord]) -> None:
    # Plain attribute (not a buffer): records are metadata, the zeros live in the weights.
    object.__setattr__(model, RECORDS_ATTR, dict(records))
