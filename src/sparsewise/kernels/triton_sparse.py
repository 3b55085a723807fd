"""Triton GEMM/GEMV kernels that read compressed weights and decompress them in registers.

For the memory-bound shapes of decoding (M = 1..64 tokens) time is set by the bytes of weight
read: the 2:4 and 50% bitmask layouts move 1.125 (+4/tile_k) bytes per fp16 weight instead of 2,
so the ceiling is ~1.78x over dense. Each program owns BLOCK_N output rows and a K range; per
tile it loads the compressed weights once, rebuilds the dense [BLOCK_N, BLOCK_K] tile in
registers and multiplies it on the tensor cores with the (zero-padded) activation tile.
Split-K programs add their partial sums with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layouts import NM24, Bitmask


def _configs():
    configs = []
    # Kept small on purpose: every config compiles once per BLOCK_M on first use of a shape.
    for block_n in (32, 64):
        for block_k in (64, 128, 256):
            for split_k in (1, 2, 4):
                configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                                             num_warps=4, num_stages=3))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    # A split must leave every program whole tiles (and bitmask tiles align with tile_k).
    k = named_args["K"]
    tile_k = named_args.get("TILE_K", 0) or kwargs.get("TILE_K", 0)
    kept = []
    for config in configs:
        block_k, split_k = config.kwargs["BLOCK_K"], config.kwargs["SPLIT_K"]
        if k % (block_k * split_k):
            continue
        if tile_k and block_k != tile_k:
            continue
        kept.append(config)
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_configs}, reset_to_zero=["out_ptr"])
@triton.jit
def _linear_24_kernel(x_ptr, values_ptr, meta_ptr, out_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    k_per_split = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    half_k = K // 2
    words_k = K // 32
    for k0 in range(pid_k * k_per_split, (pid_k + 1) * k_per_split, BLOCK_K):
        # compressed tile: BLOCK_K/2 values and BLOCK_K/32 meta words per row
        vj = tl.arange(0, BLOCK_K // 2)
        vals = tl.load(values_ptr + rows[:, None] * half_k + (k0 // 2 + vj)[None, :], mask=row_ok[:, None], other=0.0)
        wj = tl.arange(0, BLOCK_K // 32)
        words = tl.load(meta_ptr + rows[:, None] * words_k + (k0 // 32 + wj)[None, :], mask=row_ok[:, None], other=0)
        shifts = tl.arange(0, 16) * 2
        pos = (words[:, :, None] >> shifts[None, None, :]) & 3  # [BN, BK/32, 16]
        pos = tl.reshape(pos, (BLOCK_N, BLOCK_K // 4, 2))
        vals3 = tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2))
        slot = tl.arange(0, 4)
        hit = pos[:, :, :, None] == slot[None, None, None, :]  # [BN, BK/4, 2, 4]
        dense = tl.sum(tl.where(hit, vals3[:, :, :, None], 0.0), axis=2)  # [BN, BK/4, 4]
        dense = tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(vals.dtype)
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(dense))
    out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
    out_mask = m_ok[:, None] & row_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_configs}, reset_to_zero=["out_ptr"])
@triton.jit
def _linear_bitmask_kernel(x_ptr, values_ptr, bits_ptr, offsets_ptr, out_ptr, M, N, K, M_BUCKET,
                           stride_xm, stride_om, TILE_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    k_per_split = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    words_k = K // 32
    tiles_k = K // TILE_K
    for k0 in range(pid_k * k_per_split, (pid_k + 1) * k_per_split, BLOCK_K):
        wj = tl.arange(0, BLOCK_K // 32)
        words = tl.load(bits_ptr + rows[:, None] * words_k + (k0 // 32 + wj)[None, :], mask=row_ok[:, None], other=0)
        shifts = tl.arange(0, 32)
        kept = (words[:, :, None] >> shifts[None, None, :]) & 1
        kept = tl.reshape(kept, (BLOCK_N, BLOCK_K))
        before = tl.cumsum(kept, axis=1) - kept  # exclusive prefix: rank of each kept entry in the tile
        start = tl.load(offsets_ptr + rows * tiles_k + k0 // TILE_K, mask=row_ok, other=0)
        dense = tl.load(values_ptr + start[:, None] + before, mask=(kept != 0) & row_ok[:, None], other=0.0)
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(dense))
    out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
    out_mask = m_ok[:, None] & row_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


MAX_M = 64


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def linear(x: torch.Tensor, layout: NM24 | Bitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a compressed W; x [..., K] with at most 64 rows (decode shapes)."""
    n, k = layout.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"the Triton sparse kernel serves M <= {MAX_M} rows, got {m}")
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    block_m = _block_m(m)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    if isinstance(layout, NM24):
        _linear_24_kernel[grid](x2, layout.values, layout.meta, out, m, n, k, block_m,
                                x2.stride(0), out.stride(0), BLOCK_M=block_m)
    else:
        _linear_bitmask_kernel[grid](x2, layout.values, layout.bits, layout.tile_offsets, out, m, n, k, block_m,
                                     x2.stride(0), out.stride(0), TILE_K=layout.tile_k, BLOCK_M=block_m)
    if bias is not None:
        out += bias
    return out.to(x.dtype).reshape(*lead, n)
