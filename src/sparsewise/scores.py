"""Importance scores for the entries of a weight laid out [out_features, in_features].

Pure functions over tensors: higher score = more important, same shape and device as the weight,
float32. Turning scores into a keep-mask is :mod:`sparsewise.patterns`' job.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, NumericalError


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"scores need a 2-D weight laid out [out, in], got {shape}; reshape conv kernels first.")
    if not weight.is_floating_point():
        raise ConfigError(f"scores need a floating-point weight, got dtype {weight.dtype}; dequantize it first.")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise NumericalError(
            f"weight of shape {tuple(weight.shape)} holds {bad} NaN/Inf entries; check the checkpoint "
            "(a corrupt or overflowed file) before pruning."
        )


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| (magnitude pruning)."""
    _check_weight(weight)
    return weight.detach().abs().to(torch.float32)


def random_scores(weight: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """S_ij ~ U[0, 1), i.i.d. from ``generator`` (random pruning baseline).

    Drawn on the generator's device (normally the CPU) and then moved to the weight's device, so
    a CPU generator with a given seed yields the same scores whether the weight is on CPU or CUDA.
    """
    _check_weight(weight)
    if generator is None:
        raise ConfigError("random scores need a seeded torch.Generator; pass seed=... so runs are reproducible.")
    draw = torch.rand(weight.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.to(weight.device)


def wanda_scores(weight: torch.Tensor, channel_norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2, X_j = input feature j over all calibration tokens.

    Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models" (Wanda).
    """
    _check_weight(weight)
    if not isinstance(channel_norms, torch.Tensor) or channel_norms.shape != (weight.shape[1],):
        shape = tuple(channel_norms.shape) if isinstance(channel_norms, torch.Tensor) else channel_norms
        raise ConfigError(
            f"wanda needs one input-channel norm per input feature: weight is {tuple(weight.shape)} "
            f"but channel_norms has shape {shape}; the statistics belong to another layer."
        )
    if not bool(torch.isfinite(channel_norms).all()):
        raise NumericalError(
            "input-channel norms hold NaN/Inf: activations overflowed during calibration; "
            "calibrate in float32/bfloat16 rather than float16, or check the checkpoint."
        )
    if bool((channel_norms < 0).any()):
        raise NumericalError("input-channel norms must be >= 0; pass sqrt(sum_t x_tj^2), not a signed statistic.")
    norms = channel_norms.detach().to(device=weight.device, dtype=torch.float32)
    return weight.detach().abs().to(torch.float32) * norms.unsqueeze(0)


def snip_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij * dL/dW_ij| on a data batch at initialization (connection sensitivity).

    Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity".
    """
    _check_weight(weight)
    if not isinstance(grad, torch.Tensor) or grad.shape != weight.shape:
        shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ConfigError(f"snip needs the loss gradient shaped like the weight {tuple(weight.shape)}, got {shape}; "
                          "run a backward pass on a batch first.")
    return (weight.detach().float() * grad.detach().float()).abs()
