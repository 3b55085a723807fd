"""Compressed weight layouts read by the GPU kernels, with their PyTorch references.

Both layouts reuse the bit streams of :mod:`sparsewise.formats.compressed` (LSB first), viewed
as int32 words per output row, so a saved checkpoint loads into the runtime without repacking:

* :class:`NM24`: ``values`` [N, K/2] (the two kept entries of every group of four inputs, in
  position order) and ``meta`` [N, K/32] int32, value j's position in its group at bits
  ``2*(j % 16)`` of word ``j // 16``. Bytes per weight: 0.5 * itemsize + 1/8 (1.125 for fp16).
* :class:`Bitmask`: ``values`` = all nonzeros row-major, ``bits`` [N, K/32] int32 (bit c of the
  row = entry c kept), and ``tile_offsets`` [N, K/tile_k] int32, the index in ``values`` of the
  first kept entry of each tile of ``tile_k`` inputs (so a kernel can start any tile without a
  scan of the row). Bytes per weight at 50%: 0.5 * itemsize + 1/8 + 4/tile_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PatternError
from ..formats.compressed import pack_bitmask, pack_nm

WORD_BITS = 32


@dataclass
class NM24:
    values: torch.Tensor  # [N, K/2]
    meta: torch.Tensor  # [N, K/32] int32
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel() * 4

    def to(self, device) -> NM24:
        return NM24(self.values.to(device), self.meta.to(device), self.shape)


@dataclass
class Bitmask:
    values: torch.Tensor  # [nnz]
    bits: torch.Tensor  # [N, K/32] int32
    tile_offsets: torch.Tensor  # [N, K/tile_k] int32
    shape: tuple[int, int]
    tile_k: int

    @property
    def nbytes(self) -> int:
        return (self.values.numel() * self.values.element_size() + self.bits.numel() * 4
                + self.tile_offsets.numel() * 4)

    def to(self, device) -> Bitmask:
        return Bitmask(self.values.to(device), self.bits.to(device), self.tile_offsets.to(device), self.shape,
                       self.tile_k)


def _as_words(packed_bytes: torch.Tensor, rows: int) -> torch.Tensor:
    # The bit streams are little-endian bytes; four of them are one int32 word on every GPU/CPU we run on.
    return packed_bytes.contiguous().view(torch.int32).view(rows, -1)


def pack_24(weight: torch.Tensor) -> NM24:
    """2:4 layout of a [N, K] weight whose every group of 4 inputs holds at most 2 nonzeros."""
    rows, cols = weight.shape
    if cols % WORD_BITS:
        raise PatternError(f"the 2:4 kernel layout needs K divisible by 32, got K={cols}; keep this layer dense.")
    values, indices = pack_nm(weight, 2, 4)
    return NM24(values.contiguous(), _as_words(indices, rows), (rows, cols))


def pack_bitmask_tiles(weight: torch.Tensor, tile_k: int | None = None) -> Bitmask:
    """Bitmask layout of any sparse [N, K] weight, with value offsets every ``tile_k`` inputs.

    ``tile_k`` defaults to 128 when it divides K, else 64 (e.g. K = 576).
    """
    rows, cols = weight.shape
    if tile_k is None:
        tile_k = 128 if cols % 128 == 0 else 64
    if cols % tile_k or tile_k % WORD_BITS:
        raise PatternError(f"the bitmask kernel layout needs K divisible by tile_k={tile_k} (a multiple of 32), "
                           f"got K={cols}; keep this layer dense.")
    values, bitmask, _ = pack_bitmask(weight)
    kept = (weight != 0).reshape(rows, cols // tile_k, tile_k).sum(-1).reshape(-1)
    starts = torch.cumsum(kept, 0) - kept  # exclusive prefix over tiles in row-major order
    if values.numel() >= 2**31:
        raise PatternError("more than 2^31 nonzeros in one layer: the bitmask kernel layout indexes with int32.")
    return Bitmask(values.contiguous(), _as_words(bitmask, rows), starts.to(torch.int32).view(rows, -1),
                   (rows, cols), tile_k)


def unpack(layout: NM24 | Bitmask) -> torch.Tensor:
    """The dense [N, K] weight a layout holds (pure PyTorch, any device)."""
    rows, cols = layout.shape
    if isinstance(layout, NM24):
        shifts = torch.arange(0, WORD_BITS, 2, device=layout.meta.device, dtype=torch.int32)
        positions = ((layout.meta.unsqueeze(-1) >> shifts) & 3).reshape(rows, cols // 2).long()
        columns = positions + 4 * (torch.arange(cols // 2, device=positions.device) // 2)
        dense = torch.zeros(rows, cols, dtype=layout.values.dtype, device=layout.values.device)
        # scatter_add, not scatter: a group padded with two zero values may name one position twice
        return dense.scatter_add_(1, columns, layout.values)
    shifts = torch.arange(WORD_BITS, device=layout.bits.device, dtype=torch.int32)
    kept = ((layout.bits.unsqueeze(-1) >> shifts) & 1).reshape(rows, cols).bool()
    dense = torch.zeros(rows, cols, dtype=layout.values.dtype, device=layout.values.device)
    dense[kept] = layout.values
    return dense


def reference_linear(x: torch.Tensor, layout: NM24 | Bitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W decompressed in PyTorch: the ground truth every kernel is tested against."""
    return F.linear(x, unpack(layout).to(x.dtype), bias)
