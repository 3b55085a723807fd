"""y = (y^T)^T + b in one pass: the epilogue of cuSPARSELt's fast output layout.

On sm_90 cuSPARSELt's 2:4 kernels are fast only when they write D = W x^T row-major, i.e. y^T
[N, M] (1.2-1.46x dense at M >= 2048 on LLaMA MLP shapes, benchmarks/RESULTS.md), while a model
wants y [M, N]. ``torch``'s transposing copy ran at ~0.6 TB/s there and ate the gain; this Triton
kernel moves [BLOCK, BLOCK] tiles through registers/shared memory with coalesced reads and writes,
and adds the bias on the way (one pass instead of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import INTERPRETED


@triton.jit
def _transpose_kernel(src_ptr, bias_ptr, out_ptr, N, M, stride_src, stride_out, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (ns < N)[:, None] & (ms < M)[None, :]
    tile = tl.load(src_ptr + ns[:, None].to(tl.int64) * stride_src + ms[None, :], mask=mask, other=0.0)
    tile = tile.to(tl.float32)
    if HAS_BIAS:
        tile += tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + ms[None, :].to(tl.int64) * stride_out + ns[:, None]
    tl.store(out_ptrs, tile.to(out_ptr.dtype.element_ty), mask=mask)


def transpose_bias(yt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[N, M] (unit stride along M) -> contiguous [M, N], plus ``bias`` [N] if given."""
    n, m = yt.shape
    if yt.stride(1) != 1:
        raise ValueError("transpose_bias expects y^T with unit stride along its last dimension.")
    if yt.device.type != "cuda" and not INTERPRETED:
        out = yt.t().contiguous()
        return out + bias if bias is not None else out
    out = torch.empty(m, n, device=yt.device, dtype=yt.dtype)
    block = 64
    grid = (triton.cdiv(n, block), triton.cdiv(m, block))
    _transpose_kernel[grid](yt, bias if bias is not None else yt, out, n, m, yt.stride(0), out.stride(0),
                            HAS_BIAS=bias is not None, BLOCK_N=block, BLOCK_M=block, num_warps=4)
    return out
