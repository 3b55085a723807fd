"""The mask-refiner protocol and its name registry.

A refiner runs after a pruner on one layer: it takes the layer's *dense* weight (laid out
[out, in], float32), the pruner's keep-mask and the layer's calibration statistics, and returns a
better keep-mask with the same sparsity pattern. Training-free refiners (DSnoT) change no weight
value: the refined weight is the dense weight times the new mask. Which layers get refined is the
caller's choice (``oneshot``); a refiner only sees one layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..calibration.stats import LayerStats
from ..errors import ConfigError, DataError, NumericalError
from ..patterns import Pattern
from ..registry import Registry


@dataclass
class RefineTask:
    """Everything a refiner may use to improve one layer's mask."""

    name: str
    dense_weight: torch.Tensor  # [out, in] float32, the weight BEFORE pruning; do not modify in place
    mask: torch.Tensor  # bool [out, in], True = kept: the pruner's mask
    pattern: Pattern  # the pattern the mask obeys; a refiner must keep obeying it
    stats: LayerStats | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefineResult:
    weight: torch.Tensor  # [out, in], zeros where mask is False
    mask: torch.Tensor  # bool [out, in], True = kept
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class MaskRefiner(Protocol):
    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]  # subset of calibration.stats.KNOWN_STATS

    def refine(self, task: RefineTask) -> RefineResult: ...


_REFINERS = Registry("mask refiner")
register = _REFINERS.register


def get_refiner(name: str | MaskRefiner, **options: Any) -> MaskRefiner:
    """Instantiate a registered refiner by name (or pass an instance through)."""
    return _REFINERS.get(name, **options)


def available_refiners() -> list[str]:
    return _REFINERS.names()


def require_refine_stats(task: RefineTask, refiner: str, attributes: dict[str, str]) -> LayerStats:
    """The task's statistics, checked to hold every ``attribute -> stat name`` pair, over >= 1
    token, and to be finite."""
    stats = task.stats
    if stats is not None and stats.tokens == 0:
        raise DataError(
            f"{task.name}: no calibration token reached this layer, so {refiner} has nothing to go on; "
            "check that the calibration set is non-empty."
        )
    missing = [stat for attribute, stat in attributes.items() if stats is None or getattr(stats, attribute) is None]
    if missing:
        raise ConfigError(
            f"{task.name}: {refiner} needs the calibration statistic(s) {sorted(set(missing))}; collect them "
            f"(LayerStats(..., wanted={{{', '.join(repr(s) for s in sorted(set(attributes.values())))}}}) "
            "or prune through sw.prune(...) with calibration=...)."
        )
    if not stats.is_finite():
        raise NumericalError(
            f"{task.name}: calibration statistics hold NaN/Inf (activations overflowed); calibrate in "
            "float32/bfloat16 rather than float16, or check the checkpoint."
        )
    return stats
