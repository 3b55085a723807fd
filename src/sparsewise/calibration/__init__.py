"""Calibration: sequential block-by-block capture, per-layer input statistics, batching of the
calibration samples (any accepted form, :func:`sparsewise.data.as_calibration`) and memory checks
ahead of predictable passes."""

from .engine import (
    BlockCall,
    InsufficientMemoryError,
    available_memory,
    calibration_batches,
    capture_block_inputs,
    check_memory,
    collect_block_stats,
    sequential_calibration,
)
from .stats import KNOWN_STATS, STAT_HESSIAN, STAT_MOMENTS, STAT_NORMS, LayerStats

__all__ = [
    "KNOWN_STATS", "STAT_HESSIAN", "STAT_MOMENTS", "STAT_NORMS", "BlockCall", "InsufficientMemoryError", "LayerStats",
    "available_memory", "calibration_batches", "capture_block_inputs", "check_memory", "collect_block_stats",
    "sequential_calibration",
]
