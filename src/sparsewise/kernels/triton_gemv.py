"""Triton GEMV kernels for decode (M <= 8 tokens): CUDA-core FMAs over compressed weights.

At M <= 8 a tile rebuilt for the tensor cores costs more register shuffling than it saves, so
these kernels never rebuild dense tiles. 2:4: every stored value w[n, j] meets the activation
of its own input column, found from its 2-bit position: out[m, n] = sum_j w[n, j] x[m, 4*(j//2)
+ pos[n, j]]. Bitmask: each kept bit's rank in its tile (an exclusive prefix sum) indexes the
row's packed values. Bytes read per weight: 1.125 (fp16 2:4) / ~1.16 (fp16 bitmask, 50%).

Output rows are split over programs; when that gives too few programs to fill the GPU, K is
split too and partial sums are added with fp32 atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layouts import NM24, Bitmask

MAX_M = 8


def _configs():
    # Few on purpose: each compiles once per (BLOCK_M, SPLIT_K) on the first call of a shape.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w, num_stages=3)
            for bn in (16, 32) for bv in (128, 256) for w in (4, 8)]


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M", "SPLIT_K"], reset_to_zero=["out_ptr"])
@triton.jit
def _gemv_24_kernel(x_ptr, values_ptr, meta_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    values_per_row = K // 2
    per_split = values_per_row // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for v0 in range(pid_k * per_split, (pid_k + 1) * per_split, BLOCK_V):
        j = v0 + tl.arange(0, BLOCK_V)
        j_ok = j < (pid_k + 1) * per_split
        ok = row_ok[:, None] & j_ok[None, :]
        vals = tl.load(values_ptr + rows[:, None] * values_per_row + j[None, :], mask=ok, other=0.0)
        words = tl.load(meta_ptr + rows[:, None] * (K // 32) + (j // 16)[None, :], mask=ok, other=0)
        pos = (words >> ((j % 16) * 2)[None, :]) & 3
        cols = 4 * (j // 2)[None, :] + pos
        xg = tl.load(x_ptr + ms[:, None, None] * stride_xm + cols[None, :, :],
                     mask=m_ok[:, None, None] & ok[None, :, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * vals.to(tl.float32)[None, :, :], axis=2)
    out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
    out_mask = m_ok[:, None] & row_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.autotune(configs=[c for c in _configs() if c.kwargs["BLOCK_V"] == 128],
                 key=["N", "K", "BLOCK_M", "SPLIT_K"], reset_to_zero=["out_ptr"])
@triton.jit
def _gemv_bitmask_kernel(x_ptr, values_ptr, bits_ptr, offsets_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                         TILE_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    # BLOCK_V is unused here (tiles are TILE_K wide); it stays a config key for one config list.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    tiles = K // TILE_K
    per_split = tiles // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c = tl.arange(0, TILE_K)
    for tile in range(pid_k * per_split, (pid_k + 1) * per_split):
        words = tl.load(bits_ptr + rows[:, None] * (K // 32) + (tile * (TILE_K // 32) + c // 32)[None, :],
                        mask=row_ok[:, None], other=0)
        kept = (words >> (c % 32)[None, :]) & 1
        rank = tl.cumsum(kept, axis=1) - kept
        start = tl.load(offsets_ptr + rows * tiles + tile, mask=row_ok, other=0)
        w = tl.load(values_ptr + start[:, None] + rank, mask=(kept != 0) & row_ok[:, None], other=0.0)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + (tile * TILE_K + c)[None, :], mask=m_ok[:, None], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
    out_mask = m_ok[:, None] & row_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(n: int, k_units: int, device: torch.device) -> int:
    """Enough programs for ~2 waves over the SMs, with whole K units per split (16-row tiles assumed)."""
    programs = triton.cdiv(n, 32)
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while programs * split < target and k_units % (split * 2) == 0 and split < 16:
        split *= 2
    return split


def gemv(x: torch.Tensor, layout: NM24 | Bitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a compressed W and at most 8 rows of x (any leading shape)."""
    n, k = layout.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"the GEMV kernel serves M <= {MAX_M} rows, got {m}")
    block_m = max(1, triton.next_power_of_2(m))
    is_24 = isinstance(layout, NM24)
    split = _split_k(n, k // 256 if is_24 else k // layout.tile_k, x.device) if k >= 1024 else 1
    out = (torch.empty(m, n, device=x.device, dtype=x.dtype) if split == 1
           else torch.zeros(m, n, device=x.device, dtype=torch.float32))
    bias_arg = bias if bias is not None else out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    if is_24:
        _gemv_24_kernel[grid](x2, layout.values, layout.meta, bias_arg, out, m, n, k, x2.stride(0), out.stride(0),
                              HAS_BIAS=bias is not None, BLOCK_M=block_m, SPLIT_K=split)
    else:
        _gemv_bitmask_kernel[grid](x2, layout.values, layout.bits, layout.tile_offsets, bias_arg, out, m, n, k,
                                   x2.stride(0), out.stride(0), TILE_K=layout.tile_k, HAS_BIAS=bias is not None,
                                   BLOCK_M=block_m, SPLIT_K=split)
    if split > 1:
        if bias is not None:
            out += bias
        out = out.to(x.dtype)
    return out.reshape(*lead, n)
