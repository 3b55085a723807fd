"""SparseGPT's column loop over one lazy block as one Triton kernel.

In :func:`sparsewise.solvers.sparsegpt.sparsegpt_prune` each lazy block of B columns is processed
column by column: err_c = w_c * pruned_c / U_cc, then every later column j of the block gets
w_j -= U_cj * err_c. Rows are independent of each other, so one program can own a tile of rows
and keep the whole [B, rows_tile] block in registers for all B steps: one launch per lazy block
instead of two to six small kernels per column (35,600 columns per LLaMA-7B block, where the
launches, not the arithmetic, set SparseGPT's time on an H200; benchmarks/notes/oneshot_scale.md).

N:M masks are chosen inside the kernel at every group start, from the saliency w^2 / U_cc^2 of the
group's columns as updated so far (the N largest kept, ties to the earlier column, as
``patterns.nm_mask``). Unstructured masks are decided per lazy block before the loop, as in the
torch path, and passed in.

Status: the torch loop's masks exactly in Triton's CPU interpreter (CI); on an H200 as close to a
float64 run as the fp32 torch loop (tests/test_kernels.py, benchmarks/probes/sparsegpt_kernel_drift.py)
and 1.7x faster at LLaMA-7B, so ``sparsegpt_prune``'s default ``kernel="auto"`` takes it on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lazy_block_kernel(block_ptr, keep_ptr, upper_ptr, errors_ptr, rows, width, stride_block, stride_upper,
                       NM: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rs = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.arange(0, BLOCK_W)
    r_ok = rs < rows
    c_ok = cs < width
    inside = c_ok[:, None] & r_ok[None, :]
    offsets = cs[:, None].to(tl.int64) * stride_block + rs[None, :]
    tile = tl.load(block_ptr + offsets, mask=inside, other=0.0).to(tl.float32)  # [W, R]: W^T rows = columns
    diag = tl.load(upper_ptr + cs.to(tl.int64) * stride_upper + cs, mask=c_ok, other=1.0).to(tl.float32)
    if NM:
        keep = tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.int1)
    else:
        keep = tl.load(keep_ptr + offsets, mask=inside, other=1) != 0
    errors = tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.float32)
    for c in tl.range(0, width):
        if NM:
            if c % M == 0:
                group = (cs >= c) & (cs < c + M)
                saliency = tile * tile / (diag * diag)[:, None]
                rank = tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.int32)
                for k in tl.static_range(M):
                    on_k = (cs == c + k)[:, None]
                    s_k = tl.sum(tl.where(on_k, saliency, 0.0), axis=0)[None, :]
                    beats = (s_k > saliency) | ((s_k == saliency) & (c + k < cs[:, None]))
                    rank += tl.where(beats, 1, 0)
                keep = tl.where(group[:, None], rank < N, keep)
        on_c = (cs == c)[:, None]
        w = tl.sum(tl.where(on_c, tile, 0.0), axis=0)  # column c of every row of the tile
        kept = tl.sum(tl.where(on_c & keep, 1, 0), axis=0) > 0
        d = tl.sum(tl.where(cs == c, diag, 0.0), axis=0)
        err = tl.where(kept, 0.0, w / d)
        u_row = tl.load(upper_ptr + c * stride_upper + cs, mask=c_ok & (cs > c), other=0.0).to(tl.float32)
        tile = tile - u_row[:, None] * err[None, :]
        errors = tl.where(on_c, err[None, :], errors)
    tile = tl.where(keep, tile, 0.0)
    tl.store(block_ptr + offsets, tile.to(block_ptr.dtype.element_ty), mask=inside)
    tl.store(errors_ptr + offsets, errors.to(errors_ptr.dtype.element_ty), mask=inside)
    if NM:
        tl.store(keep_ptr + offsets, keep.to(tl.int8), mask=inside)


def lazy_block(block: torch.Tensor, keep: torch.Tensor, upper: torch.Tensor, errors: torch.Tensor,
               nm: tuple[int, int] | None = None, rows_per_program: int = 16) -> None:
    """Process one lazy block in place: ``block`` [width, rows] (W^T's rows = columns), ``keep``
    [width, rows] bool (read for unstructured, written for N:M), ``upper`` [width, width] the block's
    upper Cholesky factor of H^-1, ``errors`` [width, rows] written (err per column, as the torch
    loop's). Rows must be contiguous (unit stride along dim 1)."""
    width, rows = block.shape
    if block.stride(1) != 1 or errors.stride() != block.stride() or keep.stride() != block.stride():
        raise ValueError("lazy_block needs block, keep and errors with one layout, unit stride along rows.")
    if upper.stride(1) != 1:
        raise ValueError("lazy_block needs the factor with unit stride along its rows.")
    keep_bytes = keep.view(torch.int8)  # bool and int8 share one byte per entry
    n, m = nm if nm is not None else (0, 1)
    grid = (triton.cdiv(rows, rows_per_program),)
    _lazy_block_kernel[grid](block, keep_bytes, upper, errors, rows, width, block.stride(0), upper.stride(0),
                             NM=nm is not None, N=n, M=m, BLOCK_W=triton.next_power_of_2(width),
                             BLOCK_R=rows_per_program, num_warps=4)
