"""Calibration across processes: each rank runs its own share of the samples, statistics are summed.

Launched with ``torchrun`` (NCCL on GPUs, gloo on CPU), every rank holds the whole model but
only ``1 / world_size`` of the calibration samples. The layer statistics are float sums
(:class:`~sparsewise.calibration.stats.LayerStats`), so all-reducing them before each pruning
decision gives every rank the statistics of *all* samples: the deterministic methods then pick
the same masks on every rank, and the same masks as one process (up to float summation order).
Hidden states never leave their rank.

Everything here is a no-op when ``torch.distributed`` is not initialized (one process).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .stats import LayerStats


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sample_count(samples: Mapping[str, Any]) -> int:
    counts = {key: value.shape[0] for key, value in samples.items() if isinstance(value, torch.Tensor)}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"calibration tensors disagree on the number of samples (first dim): {counts}.")
    return next(iter(counts.values()), 0)


def shard_samples(samples: Mapping[str, Any], rank: int | None = None,
                  world_size: int | None = None) -> dict[str, Any]:
    """This rank's contiguous share of the samples (first dim of every tensor; other values kept).

    Rank ``r`` of ``W`` takes samples ``[r*n//W, (r+1)*n//W)``: deterministic, balanced to one
    sample, and every sample goes to exactly one rank. ``rank``/``world_size`` default to
    :func:`world`.
    """
    if rank is None or world_size is None:
        current_rank, current_size = world()
        rank = current_rank if rank is None else rank
        world_size = current_size if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    n = _sample_count(samples)
    if n < world_size:
        raise ConfigError(
            f"calibration has {n} samples for {world_size} processes: every rank needs at least one; "
            "use more calibration samples or launch fewer processes."
        )
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return {key: value[start:stop] if isinstance(value, torch.Tensor) else value for key, value in samples.items()}


def _comm_device(device: torch.device) -> torch.device:
    """Where a tensor on ``device`` can be all-reduced: NCCL takes only CUDA tensors, gloo CPU (and CUDA)."""
    supported = {pair.split(":")[0] for pair in dist.get_backend_config().split(",")}
    if device.type in supported:
        return device
    if "cpu" in supported:
        return torch.device("cpu")
    if "cuda" in supported:
        # the current device, so that torchrun ranks bound to their GPU with set_device each use their own
        return torch.device("cuda", torch.cuda.current_device())
    raise ConfigError(f"the process group's backend ({dist.get_backend_config()}) cannot reduce {device} tensors.")


def _all_reduce_(tensor: torch.Tensor, op=None) -> None:
    """Sum (or ``op``) ``tensor`` across ranks in place, staging it on a device the backend supports."""
    op = dist.ReduceOp.SUM if op is None else op
    target = _comm_device(tensor.device)
    if target == tensor.device:
        dist.all_reduce(tensor, op=op)
        return
    staged = tensor.to(target)
    dist.all_reduce(staged, op=op)
    tensor.copy_(staged)


def sum_across_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (returned); unchanged on one process."""
    if world()[1] > 1:
        _all_reduce_(tensor)
    return tensor


# Sums larger than this are reduced in place instead of being copied into the shared buffer:
# X^T X of a 11008-wide layer is 480 MB, and a copy of it would double the peak.
_IN_PLACE_NUMEL = 1 << 20


@torch.no_grad()
def all_reduce_stats(stats: LayerStats, device: torch.device | str | None = None) -> None:
    """Sum ``stats`` (token count and every raw sum) across ranks, in place; no-op on one process.

    Every rank must call this for the same layers in the same order (it is a collective). A rank
    that saw no tokens of the layer still takes part: its zero sums are created on ``device``
    (default: CPU). The token count and the small sums travel in one float64 buffer (exact
    counts beyond float32's 2^24); large sums (X^T X) are reduced in place in float32.
    """
    _, world_size = world()
    if world_size == 1:
        return
    if not stats.tensors():
        # nothing seen on this rank: join with zeros of the right shapes (an empty update allocates them)
        stats.update(torch.empty(0, stats.in_features, device=device or "cpu"))
    small = {name: value for name, value in stats.tensors().items() if value.numel() < _IN_PLACE_NUMEL}
    home = next((value.device for value in stats.tensors().values()), torch.device(device or "cpu"))
    buffer = torch.cat([
        torch.tensor([float(stats.tokens)], dtype=torch.float64, device=home),
        *(value.reshape(-1).to(torch.float64) for value in small.values()),
    ])
    _all_reduce_(buffer)
    stats.tokens = int(round(buffer[0].item()))
    offset = 1
    for value in small.values():
        value.copy_(buffer[offset : offset + value.numel()].view_as(value))
        offset += value.numel()
    for name, value in stats.tensors().items():
        if name not in small:
            _all_reduce_(value)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any: lets all ranks raise together instead of some hanging."""
    _, world_size = world()
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(torch.device("cpu")))
    _all_reduce_(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL with
    each rank on GPU LOCAL_RANK when CUDA is available, else gloo. True when this call joined
    (the caller then calls ``dist.destroy_process_group()`` at the end)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
