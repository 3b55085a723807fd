"""SparseGPT: one-shot OBS pruning with lazy column blocks.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot".
For a layer W [out, in] and H = X^T X (scaled), it minimizes ||X W^T - X W_new^T||^2 subject to
the mask, column by column: pruning column j of a row adds error e = w_j / U_jj, which is fed back
to the not-yet-processed columns as W[:, k] -= e * U_jk (k > j), where U is the upper Cholesky
factor of H^-1. U_jj^2 = [H_F^-1]_jj is the inverse-Hessian diagonal after earlier columns were
eliminated, so the OBS saliency of an entry is w^2 / U_jj^2.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, NumericalError
from ..patterns import Pattern, check_ratio, lowest_mask, nm_mask, prune_count


def _damped_inverse_factor(
    hessian: torch.Tensor, damp_ratio: float, max_damp_tries: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = ratio * mean(diag H).

    The ratio is raised tenfold until both factorizations succeed; a Hessian that stays
    indefinite raises rather than falling back to the identity, which would silently turn
    SparseGPT into magnitude pruning.
    """
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    ratio = damp_ratio
    for attempt in range(1, max_damp_tries + 1):
        lower, status = torch.linalg.cholesky_ex(hessian + (ratio * mean_diag) * eye)
        if int(status) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, status = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(status) == 0 and bool(torch.isfinite(upper).all()):
                return upper, {"damp_ratio": ratio, "damp_raised": attempt > 1, "damp_tries": attempt}
        if attempt < max_damp_tries:
            ratio *= 10.0
    raise NumericalError(
        f"the Hessian of the layer is not positive definite even with damp_ratio {ratio:g} "
        f"({max_damp_tries} tries); calibrate on more tokens or raise damp_ratio."
    )


def _column_loop(block: torch.Tensor, keep: torch.Tensor, upper: torch.Tensor, errors: torch.Tensor,
                 nm: tuple[int, int] | None) -> None:
    """One lazy block, column by column, in place: ``block`` [width, rows] (columns of W as rows),
    ``keep`` [width, rows] (given for unstructured, chosen here per N:M group), ``upper`` the block's
    [width, width] factor, ``errors`` [width, rows] filled with err_c = w_c * pruned_c / U_cc.

    With pruned / U_cc precomputed, each column costs two kernels (the multiply and the rank-1
    update), which bounds the loop where launches dominate (GPU); pruned entries are zeroed once at
    the end, since a processed column is never read again.
    """
    diagonal = upper.diagonal().unsqueeze(1)
    prune_scale = torch.empty_like(block)
    if nm is None:
        torch.div((~keep).to(block.dtype), diagonal, out=prune_scale)
    for col in range(block.shape[0]):
        if nm is not None and col % nm[1] == 0:
            group = slice(col, col + nm[1])
            saliency = block[group].square() / diagonal[group].square()
            keep[group] = nm_mask(saliency.T, *nm).T
            torch.div((~keep[group]).to(block.dtype), diagonal[group], out=prune_scale[group])
        torch.mul(block[col], prune_scale[col], out=errors[col])
        block[col + 1 :].addr_(upper[col, col + 1 :], errors[col], alpha=-1.0)
    block.masked_fill_(~keep, 0.0)


TRITON_MAX_BLOCK = 256  # the kernel holds a [block, rows-tile] fp32 tile in registers; wider ones spill


def _pick_column_loop(kernel: str, device: torch.device, compute_dtype: torch.dtype, block_size: int):
    """The lazy-block loop to run: "auto" takes the Triton kernel on CUDA when it applies (fp32, a
    block it keeps in registers, triton importable; 1.7x faster at LLaMA-7B, masks as close to a
    float64 run as the torch loop's: benchmarks/RESULTS.md), else the torch loop."""
    from ..kernels.interpreter import INTERPRETED

    if kernel not in ("auto", "torch", "triton"):
        raise ConfigError(f"sparsegpt kernel must be 'auto', 'torch' or 'triton', got {kernel!r}.")
    if kernel == "torch":
        return _column_loop
    fits = compute_dtype == torch.float32 and block_size <= TRITON_MAX_BLOCK
    if kernel == "auto" and (device.type != "cuda" or not fits):
        return _column_loop
    if kernel == "triton" and device.type != "cuda" and not INTERPRETED:
        raise ConfigError("sparsegpt kernel='triton' runs on CUDA tensors (or under TRITON_INTERPRET=1); use "
                          "kernel='torch' or 'auto' here.")
    if not fits:
        raise ConfigError(f"sparsegpt kernel='triton' computes in float32 with block_size <= {TRITON_MAX_BLOCK}, "
                          f"got {compute_dtype} and {block_size}; use kernel='torch'.")
    try:
        from ..kernels.triton_sparsegpt import lazy_block
    except ImportError as error:
        if kernel == "auto":
            return _column_loop
        raise ConfigError(f"sparsegpt kernel='triton' needs triton ({error}); use kernel='torch'.") from error
    return lazy_block


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ConfigError(f"sparsegpt needs a 2-D weight [out, in], got shape {tuple(weight.shape)}.")
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features):
        raise ConfigError(
            f"sparsegpt needs a Hessian of shape ({in_features}, {in_features}) for a weight of shape "
            f"{tuple(weight.shape)}, got {tuple(hessian.shape)}; the statistics belong to another layer."
        )
    if not bool(torch.isfinite(weight).all()):
        raise NumericalError("weight holds NaN/Inf entries; check the checkpoint before pruning.")
    if not bool(torch.isfinite(hessian).all()):
        raise NumericalError(
            "the Hessian X^T X holds NaN/Inf: activations overflowed during calibration; calibrate in "
            "float32/bfloat16 rather than float16, or check the checkpoint."
        )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern | str,
    *,
    block_size: int = 128,
    damp_ratio: float = 0.01,
    max_damp_tries: int = 6,
    kernel: str = "auto",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune ``weight`` [out, in] with SparseGPT given ``hessian`` [in, in] (X^T X up to scale).

    Unstructured: each lazy block of ``block_size`` columns prunes its lowest-saliency entries over
    all rows (as the paper does); per-block counts are rounded cumulatively so the whole layer
    prunes exactly floor(sparsity * numel). N:M (``sparsity`` is ignored, it is 1 - N/M): at every
    column j with j % M == 0 the N entries to keep among columns j..j+M-1 are chosen by saliency of
    the weights as updated so far. The ``scope`` of an unstructured pattern does not apply.

    ``kernel``: "torch" runs each lazy block column by column (two kernels per column), "triton" as
    one Triton kernel per block (:mod:`sparsewise.kernels.triton_sparsegpt`: CUDA, or Triton's CPU
    interpreter), "auto" (default) the Triton one on CUDA where it applies, else torch.

    ``compute_dtype`` float64 gives a reference run of the same algorithm (tests, drift probes).

    Returns (new_weight, keep_mask, info): new_weight has exact zeros where keep_mask is False and
    the input dtype; info holds damp_ratio, damp_raised, damp_tries, dead_inputs, block_size and
    recon_error = trace((W - W_new) H (W - W_new)^T), the error the method minimizes.
    """
    pattern = Pattern.parse(pattern)
    if pattern.kind == "block":
        raise ConfigError(
            f"sparsegpt supports unstructured and N:M patterns, not {pattern}; use magnitude or wanda for blocks."
        )
    if pattern.kind == "unstructured" and pattern.scope == "global":
        raise ConfigError(
            "global ranking is only for data-free methods (magnitude/random); use 'unstructured' with sparsegpt."
        )
    if int(block_size) < 1 or not damp_ratio > 0 or int(max_damp_tries) < 1:
        raise ConfigError(
            f"sparsegpt needs block_size >= 1, damp_ratio > 0 and max_damp_tries >= 1, got {block_size}, "
            f"{damp_ratio}, {max_damp_tries}; the defaults are 128, 0.01 and 6."
        )
    _check_inputs(weight, hessian)
    if pattern.kind == "nm":
        pattern.check_shape(tuple(weight.shape))
        # blocks must start on group boundaries so every N:M group lies inside one block
        block_size = max(pattern.m, int(block_size) - int(block_size) % pattern.m)
    else:
        sparsity = check_ratio(sparsity)
    block_size = int(block_size)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"sparsegpt computes in float32 or float64, got {compute_dtype}.")
    column_loop = _pick_column_loop(kernel, weight.device, compute_dtype, block_size)

    original = weight.detach().to(compute_dtype)
    hessian_in = hessian.detach().to(device=original.device, dtype=compute_dtype)
    rows, cols = original.shape
    if bool((hessian_in.diagonal() < 0).any()):
        raise NumericalError(
            "the Hessian has negative diagonal entries, so it is not X^T X of any input; recompute the "
            "calibration statistics (calibrate on more tokens, in float32)."
        )

    W = original.clone()
    H = hessian_in.clone()
    # inputs that were always zero carry no information: decouple them (H_jj = 1) and drop their weights
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    upper, info = _damped_inverse_factor(H, float(damp_ratio), int(max_damp_tries))
    upper = upper.contiguous()  # the loop reads rows of the factor; LAPACK returns it column-major
    del H

    # work on W^T so each column is a contiguous row: the per-column updates stay cache-friendly
    weight_t = W.T.contiguous()
    keep_t = torch.ones(cols, rows, dtype=torch.bool, device=W.device)
    nm = (pattern.n, pattern.m) if pattern.kind == "nm" else None
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = weight_t[start:end]  # view [width, rows]
        block_keep = keep_t[start:end]
        block_upper = upper[start:end, start:end]
        errors = torch.empty_like(block)
        if nm is None:
            n_prune = prune_count(rows * end, sparsity) - prune_count(rows * start, sparsity)
            if n_prune > 0:
                saliency = block.square() / block_upper.diagonal().square().unsqueeze(1)
                block_keep.view(-1).masked_fill_(lowest_mask(saliency.reshape(-1), n_prune), False)
        column_loop(block, block_keep, block_upper, errors, nm)
        if end < cols:
            weight_t[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1.0)

    W = weight_t.T.contiguous()
    keep = keep_t.T.contiguous()
    delta = original - W
    info["recon_error"] = float(((delta @ hessian_in) * delta).sum())
    info["dead_inputs"] = int(dead.sum())
    info["block_size"] = block_size
    return W.to(weight.dtype), keep, info
