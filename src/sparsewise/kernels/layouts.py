"""Compressed weight layouts read by the CUDA C++ decode kernels (:mod:`.decode`, ``cuda/sparse_gemv.cu``),
with their PyTorch unpacking (the references every kernel is tested against).

* :class:`Rows24` (2:4, K % 16 == 0): the two kept values of each group of 4 inputs in natural
  order, plus one int16 of 2-bit positions per 16 inputs. 0.5625x of fp16.
* :class:`BitPlanes` (any sparsity): per row, tiles of 256 inputs as 8 int32 keep-bit words and
  the kept values in row-major order, with an int32 offset per (row, tile). ~0.57x of fp16 at 50%.
  Also the W^T layout of the activation-sparse kernel (rows = inputs, bit planes along N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PatternError

GROUP = 4


def _check_2d(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise PatternError(f"kernel layouts take a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    if not torch.isfinite(weight).all():
        raise PatternError("the weight holds NaN or Inf values; fix the model before compressing it.")


# --------------------------------------------------------------------------------------------------
# Layouts of the CUDA C++ decode kernels (kernels/cuda/sparse_gemv.cu).


@dataclass
class Rows24:
    """2:4 in natural order: ``values`` [N, K/2] (the two kept entries of each group of 4, in input
    order) and ``meta`` [N, K/16] int16 whose nibble j = pos0 | pos1 << 2 of group j of a 16-input
    chunk. 0.5 * itemsize + 1/8 bytes per weight (0.5625x of fp16)."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta))


@dataclass
class BitPlanes:
    """Any sparsity, per row tiles of 256 inputs: ``words`` [N, 8T] int32, bit l of word (t, w) =
    keep of input 256t + 32w + l; ``values`` the kept entries in row-major order, then
    :data:`PLANE_PAD` zeros (the kernel reads each tile's values as one aligned 528-byte window);
    ``offsets`` [N, T] int32 index in ``values`` of each (row, tile)'s first kept entry. At 50%
    fp16: 1 + 1/8 + 4/256 bytes per weight (0.57x)."""

    values: torch.Tensor
    words: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    @property
    def tiles(self) -> int:
        return self.offsets.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.words, self.offsets))


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows24(weight: torch.Tensor) -> Rows24:
    """:class:`Rows24` of a [N, K] weight with at most 2 nonzeros per group of 4 inputs (K % 16 == 0)."""
    _check_2d(weight)
    rows, cols = weight.shape
    if cols % 16:
        raise PatternError(f"the 2:4 kernel needs the input dimension divisible by 16, got K={cols}; "
                           "this layer stays on the bitmask layout or dense.")
    groups = weight.reshape(rows, cols // GROUP, GROUP)
    nonzero = groups != 0
    if int(nonzero.sum(-1).max()) > 2:
        raise PatternError("the weight is not 2:4 sparse (a group of 4 inputs holds more than 2 nonzeros); "
                           "prune it with pattern '2:4' first, or use the bitmask layout.")
    rank = nonzero.to(torch.int32) * 4 + torch.arange(GROUP, 0, -1, device=weight.device, dtype=torch.int32)
    positions = rank.topk(2, dim=-1).indices.sort(-1).values  # [N, K/4, 2], pos0 < pos1
    values = groups.gather(-1, positions).reshape(rows, cols // 2)
    nibbles = (positions[..., 0] | positions[..., 1] << 2).to(torch.int64).reshape(rows, cols // 16, 4)
    shifts = 4 * torch.arange(4, device=weight.device, dtype=torch.int64)
    meta = (nibbles << shifts).sum(-1)
    meta = torch.where(meta >= 2**15, meta - 2**16, meta).to(torch.int16)
    return Rows24(values.contiguous(), meta.contiguous(), (rows, cols))


def unpack_rows24(layout: Rows24) -> torch.Tensor:
    rows, cols = layout.shape
    meta = layout.meta.to(torch.int64) & 0xFFFF
    nibbles = (meta.unsqueeze(-1) >> (4 * torch.arange(4, device=meta.device))) & 15  # [N, K/16, 4]
    positions = torch.stack([nibbles & 3, nibbles >> 2], -1).reshape(rows, cols // GROUP, 2)
    dense = torch.zeros(rows, cols // GROUP, GROUP, dtype=layout.values.dtype, device=layout.values.device)
    dense.scatter_(-1, positions, layout.values.reshape(rows, cols // GROUP, 2))
    return dense.reshape(rows, cols)


PLANE_TILE = 256
PLANE_PAD = 272  # >= the kernel's 264-value window + 8 of alignment slack


def pack_bitplanes(weight: torch.Tensor) -> BitPlanes:
    """:class:`BitPlanes` of any sparse [N, K] weight."""
    _check_2d(weight)
    rows, cols = weight.shape
    tiles = -(-cols // PLANE_TILE)
    keep = F.pad(weight != 0, (0, tiles * PLANE_TILE - cols)).reshape(rows, tiles * 8, 32)
    if int(keep.sum()) >= 2**31:
        raise PatternError("more than 2^31 nonzeros in one layer: the bitmask layout indexes with int32.")
    bits = 1 << torch.arange(32, device=weight.device, dtype=torch.int64)
    words = _to_int32_bits((keep.to(torch.int64) * bits).sum(-1))
    per_tile = keep.reshape(rows, tiles, -1).sum(-1).reshape(-1)
    offsets = (torch.cumsum(per_tile, 0) - per_tile).to(torch.int32).reshape(rows, tiles)
    values = F.pad(weight[weight != 0], (0, PLANE_PAD))
    return BitPlanes(values.contiguous(), words.contiguous(), offsets.contiguous(), (rows, cols))


def unpack_bitplanes(layout: BitPlanes) -> torch.Tensor:
    rows, cols = layout.shape
    words = layout.words.to(torch.int64) & 0xFFFFFFFF
    keep = ((words.unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1).bool().reshape(rows, -1)
    dense = torch.zeros(rows, keep.shape[1], dtype=layout.values.dtype, device=layout.values.device)
    dense[keep] = layout.values[: layout.values.numel() - PLANE_PAD]
    return dense[:, :cols]
