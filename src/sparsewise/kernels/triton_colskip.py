"""Activation-sparse GEMV/GEMM for decode: weight columns of zeroed inputs are never read.

y = mask(x) W^T + b, mask(x)[m, j] = x[m, j] if |x[m, j]| > threshold[j] else 0. A per-column
threshold covers TEAL (one t for every column), WINA (t / ||W[:, j]||: the score |x_j| * ||W[:, j]||
> t rewritten on |x_j|) and CHESS's attention thresholds. The weight is stored transposed, W^T
[K, N], so every input j owns one contiguous row of N weights; a program loads its [BLOCK_K,
BLOCK_N] tile with the rows of inputs that no activation row keeps masked off, and masked-off
rows generate no memory traffic: at 50% activation sparsity half the weight bytes are read.
The product runs on tensor cores (x padded to 16 rows: M <= 16), K may be split over programs
(partials added by the last program to arrive, as in :mod:`.triton_planes`). The mask is
computed inside the kernel: no compaction pass, no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import INTERPRETED
from .layouts import Bitmask, choose_width, pack_unstructured, unpack
from .triton_planes import _bitmask_planes, _dense_tile, _split_counters, _store, _word_starts, as_rows

MAX_ROWS = 16


@triton.jit
def _kept_inputs(x_ptr, threshold_ptr, ms, m_ok, ks, k_ok, stride_xm):
    """x [BLOCK_M, BLOCK_K] with |x| <= threshold zeroed, and which inputs any row keeps."""
    xs = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    limit = tl.load(threshold_ptr + ks, mask=k_ok, other=0.0)
    xs = tl.where(tl.abs(xs.to(tl.float32)) > limit[None, :], xs, tl.zeros_like(xs))
    return xs, tl.max(tl.abs(xs.to(tl.float32)), axis=0) > 0


@triton.jit
def _colskip_kernel(x_ptr, wt_ptr, threshold_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, alive_ptr, M, N, K,
                    stride_xm, stride_wk, stride_om, k_per_split, split_k, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PREMASK: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    if PREMASK:
        # first the keep flags of this split's inputs (every row-block program writes the same
        # bytes), so the weight loop's row loads wait on a flag load the pipeline issues stages
        # ahead, not on the x load -> compare -> reduce chain of the same step
        for step in tl.range(0, k_per_split, BLOCK_K, num_stages=STAGES):
            ks = k_start + step + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            _, alive = _kept_inputs(x_ptr, threshold_ptr, ms, m_ok, ks, k_ok, stride_xm)
            tl.store(alive_ptr + ks, alive.to(tl.int8), mask=k_ok)
        tl.debug_barrier()  # the block's flag stores are visible to all its threads (read from L2 below)
    for step in tl.range(0, k_per_split, BLOCK_K, num_stages=STAGES):
        ks = k_start + step + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xs, alive = _kept_inputs(x_ptr, threshold_ptr, ms, m_ok, ks, k_ok, stride_xm)
        if PREMASK:
            alive = tl.load(alive_ptr + ks, mask=k_ok, other=0, cache_modifier=".cg") != 0
        # a weight row is read only when some activation row keeps its input
        w = tl.load(wt_ptr + ks[:, None].to(tl.int64) * stride_wk + ns[None, :],
                    mask=alive[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xs, w, acc)
    _store(acc, out_ptr, partial_ptr, counter_ptr, bias_ptr, ns, n_ok, ms, M, N, pid_n, pid_k, stride_om,
           HAS_BIAS, split_k)


@triton.jit
def _colskip_bitmask_kernel(x_ptr, values_ptr, meta_ptr, offsets_ptr, threshold_ptr, bias_ptr, out_ptr, partial_ptr,
                            counter_ptr, M, N, K, tiles, stride_xm, stride_om, k_per_split, split_k,
                            W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            PORTABLE_POPCOUNT: tl.constexpr):
    """Activation- and weight-sparse: W^T held as a planes bitmask layout (layout rows = inputs,
    columns = outputs). A program owns the 4W outputs of nibble position j of tile t; per step
    it decodes the [BLOCK_K, 4W] tile of the inputs some row keeps: dead inputs load no meta
    word, and a zero word loads no value, so only surviving weights of surviving inputs are read."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = pid // 8
    j = pid % 8
    ws = tl.arange(0, W)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    cols = 4 * (t * 8 * W + j * W) + tl.arange(0, 4 * W)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, 4 * W), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for step in tl.range(0, k_per_split, BLOCK_K):
        ks = k_start + step + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xs, alive = _kept_inputs(x_ptr, threshold_ptr, ms, m_ok, ks, k_ok, stride_xm)
        live = alive & k_ok
        rows64 = ks.to(tl.int64)
        words = tl.load(meta_ptr + rows64[:, None] * (tiles * W) + t * W + ws[None, :], mask=live[:, None], other=0)
        tile_start = tl.load(offsets_ptr + rows64 * tiles + t, mask=live, other=0)
        word_start = _word_starts(words, tile_start[:, None], 1, PORTABLE_POPCOUNT)
        w0, w1, w2, w3 = _bitmask_planes(words, word_start, values_ptr, j, PORTABLE_POPCOUNT)
        acc = tl.dot(xs, _dense_tile(w0, w1, w2, w3, BLOCK_K, W).to(xs.dtype), acc)
    _store(acc, out_ptr, partial_ptr, counter_ptr, bias_ptr, cols, col_ok, ms, M, N, pid, pid_k, stride_om,
           HAS_BIAS, split_k)


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> W^T [K, N] contiguous: the layout the kernel reads (input j owns row j)."""
    return weight.t().contiguous()


def column_thresholds(threshold: float | torch.Tensor, in_features: int, *, device=None) -> torch.Tensor:
    """A scalar or per-column threshold as the float32 [K] vector the kernel reads (-inf = keep all)."""
    values = torch.as_tensor(threshold, dtype=torch.float32, device=device)
    if values.dim() == 0:
        values = values.expand(in_features)
    if values.shape != (in_features,):
        raise ValueError(f"threshold must be a scalar or have {in_features} entries, got {tuple(values.shape)}.")
    return values.contiguous()


def reference_linear(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch reference: zero |x| <= threshold, then a dense product with W^T."""
    kept = torch.where(x.abs().float() > thresholds.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = kept @ weight_t.to(x.dtype)
    return out + bias if bias is not None else out


def _decode_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Size]:
    """x as [rows, K] with unit stride, refusing more rows than the decode kernels serve."""
    x2, lead = as_rows(x, k)
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(f"the column-skipping kernel serves decode (M <= {MAX_ROWS} rows), got {x2.shape[0]}; "
                         "use the dense product for prefill.")
    return x2, lead


def _split_outputs(x2: torch.Tensor, n: int, k: int, block_k: int, split_k: int, counter_blocks: int):
    """K split into whole BLOCK_K steps: (split_k, K per split, output, fp32 partials, arrival
    counters); partials and counters are the output itself (unused) without a split."""
    m = x2.shape[0]
    split_k = max(1, min(split_k, triton.cdiv(k, block_k)))
    per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    out = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    partials, counters = out, out
    if split_k > 1:
        partials = torch.empty(split_k, m, n, device=x2.device, dtype=torch.float32)
        counters = _split_counters(x2.device, counter_blocks)
    return split_k, per_split, out, partials, counters


def linear(x: torch.Tensor, weight_t: torch.Tensor, thresholds: torch.Tensor, bias: torch.Tensor | None = None, *,
           split_k: int = 1, config: tuple[int, int, int, int] = (64, 128, 4, 3),
           premask: bool = False) -> torch.Tensor:
    """Activation-sparse y = mask(x) W^T + b for x [..., K] with at most 16 rows.

    ``config`` = (BLOCK_K, BLOCK_N, warps, stages); ``split_k`` programs share K. ``premask``:
    each program first writes its inputs' keep flags, then streams weight rows gated by them.
    """
    k, n = weight_t.shape
    x2, lead = _decode_rows(x, k)
    m = x2.shape[0]
    if weight_t.stride(1) != 1:
        raise ValueError("weight_t must be W^T [K, N] with unit stride along N (transpose_weight(W)).")
    block_k, block_n, warps, stages = config
    split_k, per_split, out, partials, counters = _split_outputs(x2, n, k, block_k, split_k, triton.cdiv(n, 16))
    grid = (triton.cdiv(n, block_n), split_k)
    alive = torch.empty(k, device=x.device, dtype=torch.int8) if premask else out
    _colskip_kernel[grid](x2, weight_t, thresholds, bias if bias is not None else x2, out, partials, counters, alive,
                          m, n, k, x2.stride(0), weight_t.stride(0), out.stride(0), per_split, split_k,
                          HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_K=block_k, STAGES=stages, PREMASK=premask,
                          BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out.reshape(*lead, n)


def pack_transposed(weight: torch.Tensor) -> Bitmask:
    """A pruned W [N, K] as the bitmask planes layout of W^T (one layout row per input), the
    layout :func:`linear_packed` reads: ~(0.5 + 1/16) x dense bytes at 50% sparsity. Tiles of at
    least 4 words (128 outputs, the tensor-core tile's minimum), padding N where needed."""
    return pack_unstructured(weight.t().contiguous(), width=max(4, choose_width(weight.shape[0])))


def linear_packed(x: torch.Tensor, layout_t: Bitmask, thresholds: torch.Tensor, bias: torch.Tensor | None = None, *,
                  split_k: int = 4, block_k: int = 32) -> torch.Tensor:
    """Activation-sparse y = mask(x) W^T + b over a weight-sparse W^T (:func:`pack_transposed`):
    reads only the surviving weights of the inputs some row keeps; x [..., K], at most 16 rows."""
    k, n = layout_t.shape
    x2, lead = _decode_rows(x, k)
    m = x2.shape[0]
    if layout_t.width < 4:
        raise ValueError(f"linear_packed needs a layout of width >= 4 (>= 128 outputs), got width {layout_t.width}.")
    width = layout_t.width
    tiles = layout_t.meta.shape[1] // width
    split_k, per_split, out, partials, counters = _split_outputs(x2, n, k, block_k, split_k, tiles * 8)
    values = layout_t.values if layout_t.values.numel() else layout_t.values.new_zeros(1)
    _colskip_bitmask_kernel[(tiles * 8, split_k)](
        x2, values, layout_t.meta, layout_t.tile_offsets, thresholds, bias if bias is not None else x2, out, partials,
        counters, m, n, k, tiles, x2.stride(0), out.stride(0), per_split, split_k, W=width, HAS_BIAS=bias is not None,
        BLOCK_M=16, BLOCK_K=block_k, PORTABLE_POPCOUNT=INTERPRETED, num_warps=4)
    return out.reshape(*lead, n)


def reference_linear_packed(x: torch.Tensor, layout_t: Bitmask, thresholds: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`linear_packed`: decode W^T, then :func:`reference_linear`."""
    return reference_linear(x, unpack(layout_t), thresholds, bias)
