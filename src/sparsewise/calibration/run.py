"""The context of a calibration run, shared by every pass over calibration data.

Where a run computes (:func:`pick_device`), its calibration samples cut into model-input
batches (:func:`calibration_batches`) and the memory it used (:func:`peak_rss_mb`,
:func:`start_gpu_peak`, :func:`gpu_peak_mb`). Pruning, allocation, activation sparsity and
ARMOR all take these from here; progress bars live in :mod:`.progress`, the walk over blocks in
:mod:`.engine`.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from ..data import as_calibration
from ..errors import ConfigError
from .distributed import shard_samples, world


def pick_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """'auto'/None: CUDA when present, else where the model is; otherwise the named device (checked)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked but CUDA is not available; use device='cpu'.")
    return device


def calibration_batches(calibration, batch_size: int | None) -> list[dict]:
    """Calibration as model-input dicts of at most ``batch_size`` samples; None = everything in one batch.

    ``calibration`` may come in any form :func:`sparsewise.data.as_calibration` accepts (a
    CalibrationSet, a tensor of token ids, one dict holding all samples, a list of tensors or of
    dicts): the samples are re-batched by ``batch_size`` whatever batches they came in, so
    passes that need micro-batches (block-mode statistics, gradients) never run one huge batch.

    Under torch.distributed (torchrun) each rank keeps only its share of the samples
    (:func:`~sparsewise.calibration.distributed.shard_samples`), re-batched by ``batch_size``:
    the engine all-reduces the statistics, so together the ranks calibrate on every sample once.
    """
    calibration = as_calibration(calibration)
    world_size = world()[1]
    join = batch_size is None or world_size > 1
    batches = list(calibration.batches(max(len(calibration), 1) if join else batch_size))
    if join and len(batches) > 1:
        batches = [_join_batches(batches)]
    if world_size > 1:
        share = shard_samples(batches[0] if batches else {})
        count = next(value.shape[0] for value in share.values() if isinstance(value, torch.Tensor))
        step = batch_size or count
        batches = [{key: value[start : start + step] if isinstance(value, torch.Tensor) else value
                    for key, value in share.items()} for start in range(0, count, step)]
    return batches


def _join_batches(batches: list[dict]) -> dict:
    """One batch of all samples (sequential='layer', or before sharding across ranks)."""
    keys = batches[0].keys()
    if any(batch.keys() != keys for batch in batches):
        raise ConfigError("calibration batches must all hold the same inputs to be joined into one batch.")
    joined = {}
    for key in keys:
        values = [batch[key] for batch in batches]
        if not all(isinstance(value, torch.Tensor) for value in values):
            if any(value is not values[0] and value != values[0] for value in values):
                raise ConfigError(f"calibration input {key!r} differs between batches and is not a tensor: "
                                  "it cannot be joined into one batch; use sequential='block'.")
            joined[key] = values[0]
            continue
        if len({tuple(value.shape[1:]) for value in values}) != 1:
            raise ConfigError(
                f"calibration samples of different shapes ({key!r}: "
                f"{sorted({tuple(value.shape[1:]) for value in values})}) cannot run as one batch: use "
                "sequential='block' (batches of batch_size), or give samples of one seqlen."
            )
        joined[key] = torch.cat(values)
    return joined


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (getrusage reports bytes on macOS, KB elsewhere)."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / (1024 * 1024) if sys.platform == "darwin" else usage / 1024


def start_gpu_peak(device: torch.device) -> None:
    """Zero the peak-memory gauge of ``device`` when it is a GPU. CUDA is initialized first: in a
    fresh process the allocator has no per-device state yet and the reset would raise."""
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak memory PyTorch allocated on ``device`` since :func:`start_gpu_peak`, in MB; None off the GPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
