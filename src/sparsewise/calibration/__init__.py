"""Calibration: the run context (device, batching of the calibration samples in any accepted form,
:func:`sparsewise.data.as_calibration`, memory gauges), the walk over blocks with per-layer input
statistics, and memory checks ahead of predictable passes."""

from .engine import (
    BlockCall,
    BlockStep,
    BlockWalk,
    InsufficientMemoryError,
    available_memory,
    capture_block_inputs,
    check_memory,
    collect_block_stats,
    model_inputs,
    run_block,
    sequential_calibration,
)
from .run import calibration_batches, gpu_peak_mb, peak_rss_mb, pick_device, start_gpu_peak
from .stats import KNOWN_STATS, STAT_HESSIAN, STAT_MOMENTS, STAT_NORMS, LayerStats

__all__ = [
    "KNOWN_STATS", "STAT_HESSIAN", "STAT_MOMENTS", "STAT_NORMS", "BlockCall", "BlockStep", "BlockWalk",
    "InsufficientMemoryError", "LayerStats", "available_memory", "calibration_batches", "capture_block_inputs",
    "check_memory", "collect_block_stats", "gpu_peak_mb", "model_inputs", "peak_rss_mb", "pick_device", "run_block",
    "sequential_calibration", "start_gpu_peak",
]
