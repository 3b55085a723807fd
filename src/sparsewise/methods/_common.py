"""Checks shared by the method modules (kept apart so each method file stays small)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..calibration.stats import LayerStats
from ..errors import ConfigError, DataError
from .base import LayerTask


def check_options(task: LayerTask | Any, method: str, allowed: Iterable[str]) -> dict[str, Any]:
    """The task's options (any task with ``.options``: a method's LayerTask, a refiner's
    RefineTask), refusing names this method does not know (catches typos)."""
    allowed = set(allowed)
    unknown = sorted(set(task.options) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(f"{method} does not take option(s) {unknown}; its options are: {known}.")
    return dict(task.options)


def require_stats(task: LayerTask, method: str, attribute: str, stat: str) -> LayerStats:
    """The task's statistics, checked to hold ``attribute`` accumulated over at least one token."""
    stats = task.stats
    if stats is not None and stats.tokens == 0:
        raise DataError(
            f"{task.name}: no calibration token reached this layer, so {method} has nothing to go on; "
            "check that the calibration set is non-empty."
        )
    if stats is None or getattr(stats, attribute) is None:
        raise ConfigError(
            f"{task.name}: {method} needs the {stat!r} calibration statistic; prune through sw.prune(...) "
            "with calibration=... so it is collected."
        )
    return stats
