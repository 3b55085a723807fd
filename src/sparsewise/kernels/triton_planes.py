"""Triton kernels over the planes layouts (decode and small-batch shapes, M <= 64).

Per tile of ``32 * W`` inputs a program loads its rows' W meta words once and walks the 8
nibble positions with constant shifts (see kernels/layouts.py). Three ways to consume a step:
  * 2:4, CUDA cores (M <= 4), "x-select": each kept weight meets its own input,
    out[m, n] += v0 * x[m, 4g + i0] + v1 * x[m, 4g + i1], picked among the group's 4 inputs by
    selects (i0 < i1, so 2 selects each); 2 FMAs per group instead of 4 on a rebuilt tile;
  * bitmask, CUDA cores (M <= 4): four weight planes (input c of W groups) from masked loads at
    popcount-derived addresses, FMA'd against the matching x planes; its own kernel, oriented
    [W, BLOCK_N] so the gathers share the layout of everything else;
  * tensor cores (M 2..64, both kinds): the planes joined in registers into the dense
    [BLOCK_N, 4W] tile, then x[BLOCK_M, 4W] @ tile^T.
CUDA-core paths read x as fp32 planes (plane c = input c of every group) made once per call by
:func:`linear`, so no thread converts or strides through x per row. Only compressed weight bytes
come from memory. When the rows alone are too few programs for the GPU, K is split over programs
and the fp32 partial sums are added afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .interpreter import INTERPRETED
from .layouts import NM24, Bitmask

MAX_M = 64
BITMASK_DOT_ROWS = 32


@triton.jit
def _popcount(words, PORTABLE: tl.constexpr):
    if PORTABLE:
        bits = words.to(tl.uint32, bitcast=True)
        bits = bits - ((bits >> 1) & 0x55555555)
        bits = (bits & 0x33333333) + ((bits >> 2) & 0x33333333)
        bits = (bits + (bits >> 4)) & 0x0F0F0F0F
        return ((bits * 0x01010101) >> 24).to(tl.int32)
    else:
        return libdevice.popc(words)


def _configs():
    # Few on purpose: every config compiles on the first call of each (shape, M bucket).
    return [triton.Config({"BLOCK_N": bn, "STAGES": s}, num_warps=w, num_stages=s)
            for bn, w, s in ((16, 4, 1), (32, 4, 2), (32, 8, 1), (16, 4, 3), (32, 4, 3), (32, 8, 3))]


@triton.jit
def _x_plane(planes_ptr, groups, GROUP_AXIS: tl.constexpr):
    """One fp32 x plane, broadcast along the rows of a [rows, W] (GROUP_AXIS 1) or [W, rows] tile."""
    plane = tl.load(planes_ptr + groups)
    if GROUP_AXIS == 1:
        return plane[None, :]
    else:
        return plane[:, None]


@triton.jit
def _select_fma(acc, v0, v1, i0, i1, planes_ptr, groups, plane_stride):
    """acc += v0 * x[4g + i0] + v1 * x[4g + i1]: the two kept weights of each group meet their own
    inputs, picked among the group's 4 by selects (i0 in 0..2, i1 in 1..3). x comes as fp32
    planes (plane c holds input c of every group, zero-padded), so each load is contiguous and
    lands in the weights' own layout: no conversion of x per row, no shuffles."""
    x0 = _x_plane(planes_ptr, groups, 1)
    x1 = _x_plane(planes_ptr + plane_stride, groups, 1)
    x2 = _x_plane(planes_ptr + 2 * plane_stride, groups, 1)
    x3 = _x_plane(planes_ptr + 3 * plane_stride, groups, 1)
    first = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
    second = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
    return acc + v0 * first + v1 * second


@triton.jit
def _planes_fma(acc, w0, w1, w2, w3, planes_ptr, groups, plane_stride, GROUP_AXIS: tl.constexpr):
    """acc += sum_c w_c * x_c: the four weight planes against the four fp32 x planes."""
    acc += w0.to(tl.float32) * _x_plane(planes_ptr, groups, GROUP_AXIS)
    acc += w1.to(tl.float32) * _x_plane(planes_ptr + plane_stride, groups, GROUP_AXIS)
    acc += w2.to(tl.float32) * _x_plane(planes_ptr + 2 * plane_stride, groups, GROUP_AXIS)
    return acc + w3.to(tl.float32) * _x_plane(planes_ptr + 3 * plane_stride, groups, GROUP_AXIS)


@triton.jit
def _select_fma_rows(acc0, acc1, acc2, acc3, v0, v1, i0, i1, x_ptr, groups, plane_stride, BLOCK_M: tl.constexpr):
    """:func:`_select_fma` for each of up to 4 activation rows (row m's planes start at 4m planes)."""
    acc0 = _select_fma(acc0, v0, v1, i0, i1, x_ptr, groups, plane_stride)
    if BLOCK_M > 1:
        acc1 = _select_fma(acc1, v0, v1, i0, i1, x_ptr + 4 * plane_stride, groups, plane_stride)
    if BLOCK_M > 2:
        acc2 = _select_fma(acc2, v0, v1, i0, i1, x_ptr + 8 * plane_stride, groups, plane_stride)
        acc3 = _select_fma(acc3, v0, v1, i0, i1, x_ptr + 12 * plane_stride, groups, plane_stride)
    return acc0, acc1, acc2, acc3


@triton.jit
def _planes_fma_rows(acc0, acc1, acc2, acc3, w0, w1, w2, w3, x_ptr, groups, plane_stride, GROUP_AXIS: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """:func:`_planes_fma` for each of up to 4 activation rows."""
    acc0 = _planes_fma(acc0, w0, w1, w2, w3, x_ptr, groups, plane_stride, GROUP_AXIS)
    if BLOCK_M > 1:
        acc1 = _planes_fma(acc1, w0, w1, w2, w3, x_ptr + 4 * plane_stride, groups, plane_stride, GROUP_AXIS)
    if BLOCK_M > 2:
        acc2 = _planes_fma(acc2, w0, w1, w2, w3, x_ptr + 8 * plane_stride, groups, plane_stride, GROUP_AXIS)
        acc3 = _planes_fma(acc3, w0, w1, w2, w3, x_ptr + 12 * plane_stride, groups, plane_stride, GROUP_AXIS)
    return acc0, acc1, acc2, acc3


@triton.jit
def _word_starts(words, tile_start, GROUP_AXIS: tl.constexpr, PORTABLE_POPCOUNT: tl.constexpr):
    """Index in the values of each word's first kept entry: the tile's offset (already broadcast)
    plus the kept entries of the earlier words of the tile (an exclusive prefix of popcounts)."""
    counts = _popcount(words, PORTABLE_POPCOUNT)
    return tile_start + tl.cumsum(counts, axis=GROUP_AXIS) - counts


@triton.jit
def _bitmask_planes(words, word_start, values_ptr, J, PORTABLE_POPCOUNT: tl.constexpr):
    """The four weight planes of nibble position J: masked loads at popcount-derived addresses
    (word start + kept entries of earlier nibbles of the word + rank inside the group). J is a
    constant in the unrolled kernels here, a program index in the column-skipping one."""
    nib = (words >> (4 * J)) & 15
    if J == 0:
        start = word_start
    else:
        start = word_start + _popcount(words & ((1 << (4 * J)) - 1), PORTABLE_POPCOUNT)
    b0 = nib & 1
    b1 = (nib >> 1) & 1
    b2 = (nib >> 2) & 1
    b3 = nib >> 3
    first = values_ptr + start
    w0 = tl.load(first, mask=b0 != 0, other=0.0)
    w1 = tl.load(first + b0, mask=b1 != 0, other=0.0)
    w2 = tl.load(first + b0 + b1, mask=b2 != 0, other=0.0)
    w3 = tl.load(first + b0 + b1 + b2, mask=b3 != 0, other=0.0)
    return w0, w1, w2, w3


@triton.jit
def _nm24_step(words, values_rows, t, j: tl.constexpr, W: tl.constexpr, ws, row_ok):
    """Step j of 2:4 tile t: the kept values (v0 block then v1 block) and their positions in the
    group (i0 < i1, the nibble's two 2-bit fields)."""
    nib = (words >> (4 * j)) & 15
    pair = values_rows + t * 16 * W + j * 2 * W + ws[None, :]
    v0 = tl.load(pair, mask=row_ok[:, None], other=0.0)
    v1 = tl.load(pair + W, mask=row_ok[:, None], other=0.0)
    return v0, v1, nib & 3, nib >> 2


@triton.jit
def _nm24_planes(v0, v1, i0, i1):
    """The four weight planes of a 2:4 step: input c of each group holds v0 if i0 == c, v1 if i1 == c."""
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, zero)
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i1 == 3, v1, zero)
    return w0, w1, w2, w3


@triton.jit
def _dense_tile(w0, w1, w2, w3, BLOCK_N: tl.constexpr, W: tl.constexpr):
    """Planes -> the dense [BLOCK_N, 4W] tile in input order (4w + c), by register joins."""
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, 4 * W))


@triton.jit
def _row_sums(acc0, acc1, acc2, acc3, ms, GROUP_AXIS: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, BLOCK_N] outputs from the per-activation-row accumulators (summed over groups)."""
    result = tl.sum(acc0, axis=GROUP_AXIS)[None, :]
    if BLOCK_M > 1:
        result = tl.where(ms[:, None] == 1, tl.sum(acc1, axis=GROUP_AXIS)[None, :], result)
    if BLOCK_M > 2:
        result = tl.where(ms[:, None] == 2, tl.sum(acc2, axis=GROUP_AXIS)[None, :], result)
        result = tl.where(ms[:, None] == 3, tl.sum(acc3, axis=GROUP_AXIS)[None, :], result)
    return result


@triton.jit
def _store(result, out_ptr, partial_ptr, counter_ptr, bias_ptr, rows, row_ok, ms, M, N, pid_n, pid_k, stride_om,
           HAS_BIAS: tl.constexpr, split_k):
    """Bias, cast, masked store. With split-K each program first stores its fp32 partial sums; the
    last program of a row block to arrive (a counter per row block) adds all partials in split
    order, so the sum is deterministic and the whole linear stays one launch. It then resets
    its counter to 0 for the next call (the counters persist, CUDA graphs replay them)."""
    mask = (ms < M)[:, None] & row_ok[None, :]
    offsets = ms[:, None] * N + rows[None, :]
    if split_k > 1:
        tl.store(partial_ptr + pid_k * M * N + offsets, result, mask=mask)
        # every thread's partial is written before one thread publishes the arrival (release);
        # the winner's acquire orders its reads after all other programs' partial stores
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            result = tl.load(partial_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            for split in range(1, split_k):
                result += tl.load(partial_ptr + split * M * N + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                result += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + ms[:, None] * stride_om + rows[None, :], result.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + ms[:, None] * stride_om + rows[None, :], result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _program_indices(N, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row block and K split, its weight rows (and which exist), the word and
    activation-row index vectors."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, pid_k, rows, rows < N, rows.to(tl.int64), tl.arange(0, W), tl.arange(0, BLOCK_M)


@triton.jit
def _planes_kernel(x_ptr, values_ptr, meta_ptr, offsets_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                   M, N, K, tiles, stride_xm, stride_om, tiles_per_split, split_k,
                   BITMASK: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   USE_DOT: tl.constexpr, PORTABLE_POPCOUNT: tl.constexpr, XSELECT: tl.constexpr,
                   EVEN_K: tl.constexpr, STAGES: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_k, rows, row_ok, rows64, ws, ms = _program_indices(N, W, BLOCK_M, BLOCK_N)
    m_ok = ms < M
    meta_rows = meta_ptr + rows64[:, None] * (tiles * W)
    values_rows = values_ptr + rows64[:, None] * (tiles * 16 * W)  # 2:4 only: K/2 values per row
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # CUDA cores: one [BLOCK_N, W] accumulator per activation row (BLOCK_M <= 4), x read from
        # fp32 planes prepared by linear() (plane c = input c of every group, zero-padded)
        acc0 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    ks = tl.arange(0, 4 * W)
    t_start = pid_k * tiles_per_split
    # an explicit stage count: Triton software-pipelines (cp.async) only loops that carry one when
    # no load feeds a tl.dot; STAGES 1 = plain loads, each tile waits for its own bytes
    for step in tl.range(0, tiles_per_split, num_stages=STAGES):
        t = t_start + step
        words = tl.load(meta_rows + t * W + ws[None, :], mask=row_ok[:, None], other=0)
        if BITMASK:
            tile_start = tl.load(offsets_ptr + rows64 * tiles + t, mask=row_ok, other=0)
            word_start = _word_starts(words, tile_start[:, None], 1, PORTABLE_POPCOUNT)
        for j in tl.static_range(8):
            if BITMASK:
                w0, w1, w2, w3 = _bitmask_planes(words, word_start, values_ptr, j, PORTABLE_POPCOUNT)
            else:
                v0, v1, i0, i1 = _nm24_step(words, values_rows, t, j, W, ws, row_ok)
                if not XSELECT:
                    w0, w1, w2, w3 = _nm24_planes(v0, v1, i0, i1)
            if USE_DOT:
                tile = _dense_tile(w0, w1, w2, w3, BLOCK_N, W)
                cols = 4 * (t * 8 * W + j * W) + ks
                # x rows are contiguous along K: load [BLOCK_M, 4W] with vector loads, weights as B
                if EVEN_K:  # no padded columns: a row mask only, so the loads stay 16 bytes wide
                    xs = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None], other=0.0)
                else:
                    xs = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :],
                                 mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
                acc = tl.dot(xs, tl.trans(tile), acc)
            else:
                groups = t * 8 * W + j * W + ws
                plane_stride = tiles * 8 * W
                if XSELECT:
                    acc0, acc1, acc2, acc3 = _select_fma_rows(acc0, acc1, acc2, acc3, v0.to(tl.float32),
                                                              v1.to(tl.float32), i0, i1, x_ptr, groups,
                                                              plane_stride, BLOCK_M)
                else:
                    acc0, acc1, acc2, acc3 = _planes_fma_rows(acc0, acc1, acc2, acc3, w0, w1, w2, w3, x_ptr, groups,
                                                              plane_stride, 1, BLOCK_M)
    if USE_DOT:
        result = acc
    else:
        result = _row_sums(acc0, acc1, acc2, acc3, ms, 1, BLOCK_M)
    _store(result, out_ptr, partial_ptr, counter_ptr, bias_ptr, rows, row_ok, ms, M, N, pid_n, pid_k, stride_om,
           HAS_BIAS, split_k)


@triton.jit
def _bitmask_fma_kernel(x_ptr, values_ptr, meta_ptr, offsets_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M, N,
                        tiles, stride_om, tiles_per_split, split_k,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, PORTABLE_POPCOUNT: tl.constexpr, STAGES: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Bitmask planes on CUDA cores (M <= 4), with tensors oriented [W, BLOCK_N].

    Same arithmetic as the planes kernel, transposed: Triton lays out the value gathers (no
    provable contiguity) along dim 0, so with the words also contiguous along dim 0 every
    tensor shares one layout and no gather result is shuffled through shared memory (65
    conversions per tile in the [BLOCK_N, W] orientation). x comes as fp32 planes."""
    pid_n, pid_k, rows, row_ok, rows64, ws, ms = _program_indices(N, W, BLOCK_M, BLOCK_N)
    plane_stride = tiles * 8 * W
    acc0 = tl.zeros((W, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((W, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((W, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((W, BLOCK_N), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    # an explicit stage count: Triton software-pipelines (cp.async) only loops that carry one when
    # no load feeds a tl.dot; STAGES 1 = plain loads, each tile waits for its own bytes
    for step in tl.range(0, tiles_per_split, num_stages=STAGES):
        t = t_start + step
        words = tl.load(meta_ptr + rows64[None, :] * (tiles * W) + t * W + ws[:, None], mask=row_ok[None, :], other=0)
        tile_start = tl.load(offsets_ptr + rows64 * tiles + t, mask=row_ok, other=0)
        word_start = _word_starts(words, tile_start[None, :], 0, PORTABLE_POPCOUNT)
        for j in tl.static_range(8):
            w0, w1, w2, w3 = _bitmask_planes(words, word_start, values_ptr, j, PORTABLE_POPCOUNT)
            groups = t * 8 * W + j * W + ws
            acc0, acc1, acc2, acc3 = _planes_fma_rows(acc0, acc1, acc2, acc3, w0, w1, w2, w3, x_ptr, groups,
                                                      plane_stride, 0, BLOCK_M)
    result = _row_sums(acc0, acc1, acc2, acc3, ms, 0, BLOCK_M)
    _store(result, out_ptr, partial_ptr, counter_ptr, bias_ptr, rows, row_ok, ms, M, N, pid_n, pid_k, stride_om,
           HAS_BIAS, split_k)


@triton.jit
def _unpack_kernel(values_ptr, meta_ptr, offsets_ptr, out_ptr, N, K, tiles, stride_out, BITMASK: tl.constexpr,
                   W: tl.constexpr, PORTABLE_POPCOUNT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense weight from either planes layout, one (row block, tile) per program: the same
    register decode as the kernels above, stored instead of multiplied (prefill fallback: decode
    once per call, then a dense GEMM)."""
    _, t, rows, row_ok, rows64, ws, _ = _program_indices(N, W, 1, BLOCK_N)  # grid axis 1: the tile
    ks = tl.arange(0, 4 * W)
    words = tl.load(meta_ptr + rows64[:, None] * (tiles * W) + t * W + ws[None, :], mask=row_ok[:, None], other=0)
    if BITMASK:
        tile_start = tl.load(offsets_ptr + rows64 * tiles + t, mask=row_ok, other=0)
        word_start = _word_starts(words, tile_start[:, None], 1, PORTABLE_POPCOUNT)
    values_rows = values_ptr + rows64[:, None] * (tiles * 16 * W)  # 2:4 only
    for j in tl.static_range(8):
        if BITMASK:
            w0, w1, w2, w3 = _bitmask_planes(words, word_start, values_ptr, j, PORTABLE_POPCOUNT)
        else:
            v0, v1, i0, i1 = _nm24_step(words, values_rows, t, j, W, ws, row_ok)
            w0, w1, w2, w3 = _nm24_planes(v0, v1, i0, i1)
        cols = 4 * (t * 8 * W + j * W) + ks
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], _dense_tile(w0, w1, w2, w3, BLOCK_N, W),
                 mask=row_ok[:, None] & (cols < K)[None, :])


def unpack(layout: NM24 | Bitmask) -> torch.Tensor:
    """The dense [N, K] weight (values' dtype) decoded by :func:`_unpack_kernel`: one read of the
    compressed bytes, one write of the dense ones."""
    n, k = layout.shape
    width = layout.width
    tiles = layout.meta.shape[1] // width
    out = torch.empty(n, k, device=layout.values.device, dtype=layout.values.dtype)
    bitmask = isinstance(layout, Bitmask)
    values = layout.values if layout.values.numel() else layout.values.new_zeros(1)
    _unpack_kernel[(triton.cdiv(n, 16), tiles)](
        values, layout.meta, layout.tile_offsets if bitmask else layout.meta, out, n, k, tiles, out.stride(0),
        BITMASK=bitmask, W=width, PORTABLE_POPCOUNT=INTERPRETED, BLOCK_N=16, num_warps=4)
    return out


_planes_autotuned = triton.autotune(configs=_configs(), key=["N", "tiles", "BLOCK_M", "split_k", "USE_DOT", "BITMASK",
                                                           "XSELECT"])(_planes_kernel)
_bitmask_autotuned = triton.autotune(configs=_configs(), key=["N", "tiles", "BLOCK_M", "split_k"])(_bitmask_fma_kernel)


def default_use_dot(m: int, layout: NM24 | Bitmask) -> bool:
    """Tensor-core planes from 5 rows up (a guess the runtime's measured dispatch overrides)."""
    return m > 4 and layout.width >= 16


def _launch(x2: torch.Tensor, out: torch.Tensor, layout: NM24 | Bitmask, bias: torch.Tensor | None, split_k: int,
            use_dot: bool, config: tuple[int, int, int] | None, xselect: bool) -> None:
    """One kernel launch writing ``out`` = x2 W^T + b (x2 rows contiguous, at most 64 of them)."""
    n, k = layout.shape
    m = x2.shape[0]
    block_m = max(16 if use_dot else 1, triton.next_power_of_2(m))
    width = layout.width
    tiles = layout.meta.shape[1] // width
    # splits of equal whole tiles: the largest divisor of the tile count not above the request
    split_k = max(d for d in range(1, max(1, min(split_k, tiles)) + 1) if tiles % d == 0)
    per_split = tiles // split_k
    partials, counters = out, out  # unused pointers without split-K
    if split_k > 1:
        partials = torch.empty(split_k, m, n, device=x2.device, dtype=torch.float32)
        counters = _split_counters(x2.device, triton.cdiv(n, 16))
    bitmask = isinstance(layout, Bitmask)
    offsets = layout.tile_offsets if bitmask else layout.meta  # unused pointer for 2:4

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), split_k)

    if config is None:
        kernel, launch = (_bitmask_autotuned if bitmask and not use_dot else _planes_autotuned), {}
    else:
        kernel = _bitmask_fma_kernel if bitmask and not use_dot else _planes_kernel
        launch = {"BLOCK_N": config[0], "STAGES": config[2], "num_warps": config[1], "num_stages": config[2]}
    x_arg = x2
    if not use_dot:
        # fp32 planes of x: plane c = input c of every group, zero-padded to the layout's K; the
        # extra copy is one small kernel (M x K) that spares every row of the GEMV a conversion
        # Only padded groups need zeros (0 weight x garbage could be NaN); rows past M are never stored.
        groups = layout.padded_k // 4
        x_arg = torch.empty(block_m, 4, groups, device=x2.device, dtype=torch.float32)
        if groups != k // 4:
            x_arg[:, :, k // 4:].zero_()
        x_arg[:m, :, : k // 4].copy_(x2.view(m, k // 4, 4).transpose(1, 2))
    if bitmask and not use_dot:
        kernel[grid](x_arg, layout.values, layout.meta, layout.tile_offsets, bias if bias is not None else x2, out,
                     partials, counters, m, n, tiles, out.stride(0), per_split, split_k, W=width,
                     HAS_BIAS=bias is not None, BLOCK_M=block_m,
                     PORTABLE_POPCOUNT=INTERPRETED, **launch)
    else:
        kernel[grid](x_arg, layout.values, layout.meta, offsets, bias if bias is not None else x2, out, partials,
                     counters, m, n, k, tiles, x2.stride(0), out.stride(0), per_split, split_k,
                     BITMASK=bitmask, W=width, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                     USE_DOT=use_dot, PORTABLE_POPCOUNT=INTERPRETED, XSELECT=xselect,
                     EVEN_K=k == layout.padded_k, **launch)


def as_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Size]:
    """x [..., K] as a [rows, K] matrix with unit stride along K, and the leading shape to restore."""
    x2 = x.reshape(-1, k)
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()), x.shape[:-1]


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for split-K, one per row block, kept per device: each launch
    leaves them at zero again, so they are allocated once (outside any CUDA-graph capture)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < blocks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K counters must exist before CUDA-graph capture: run the layer once "
                               "eagerly first (accelerate() and tune() do).")
        counters = torch.zeros(max(blocks, 4096), device=device, dtype=torch.int32)
        _COUNTERS[device] = counters
    return counters


def linear(x: torch.Tensor, layout: NM24 | Bitmask, bias: torch.Tensor | None = None, *, split_k: int = 1,
           use_dot: bool | None = None, config: tuple[int, int, int] | None = None,
           xselect: bool | None = None) -> torch.Tensor:
    """y = x W^T + b for a planes-compressed W; x [..., K] with at most 64 rows.

    ``config`` = (BLOCK_N, num_warps, num_stages) pins the launch (no autotuning, e.g. inside a
    CUDA-graph capture or under TRITON_INTERPRET); by default the first call of each shape tunes.
    """
    n, k = layout.shape
    x2, lead = as_rows(x, k)
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"the planes kernel serves M <= {MAX_M} rows, got {m}; use the dense or cuSPARSELt path.")
    if use_dot is None:
        use_dot = default_use_dot(m, layout)
    if use_dot and layout.width < 16:
        raise ValueError(f"the tensor-core planes path needs width 16 (512-input tiles); this layout has "
                         f"width {layout.width}.")
    if not use_dot and m > 4:
        raise ValueError("the FMA planes path serves M <= 4 rows; use use_dot=True above that.")
    bitmask = isinstance(layout, Bitmask)
    if xselect is None:
        xselect = not bitmask and not use_dot
    if xselect and (bitmask or use_dot):
        raise ValueError("xselect (x chosen per kept weight) serves the 2:4 FMA path only.")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    # Triton 3.6 cannot lay out the bitmask tensor-core tile for 64 activation rows ("Illegal shared
    # layout"): that path runs 32 rows per launch
    chunk = BITMASK_DOT_ROWS if bitmask and use_dot else m
    for start in range(0, m, chunk):
        _launch(x2[start:start + chunk], out[start:start + chunk], layout, bias, split_k, use_dot, config, xselect)
    return out.reshape(*lead, n)
