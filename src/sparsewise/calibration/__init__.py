"""Calibration: sequential block-by-block capture and per-layer input statistics."""

from .engine import BlockCall, capture_block_inputs, collect_block_stats, sequential_calibration
from .stats import KNOWN_STATS, STAT_HESSIAN, STAT_MOMENTS, STAT_NORMS, LayerStats

__all__ = [
    "KNOWN_STATS", "STAT_HESSIAN", "STAT_MOMENTS", "STAT_NORMS", "BlockCall", "LayerStats",
    "capture_block_inputs", "collect_block_stats", "sequential_calibration",
]
