"""Compressed weight layouts read by the GPU kernels ("planes" layouts), with PyTorch references.

Both layouts cut the K inputs of a [N, K] weight into groups of 4 and tiles of ``32 * width``
inputs (``8 * width`` groups). Inside a tile, group ``j * width + w`` is described by nibble
``j`` (bits 4j..4j+3) of int32 word ``w``: so a kernel that loads the ``width`` words of a tile
once can walk the 8 nibble positions with constant shifts and, for each, rebuild four dense
[rows, width] *planes* (input 0, 1, 2, 3 of each group) without any reshape or register gather.

* :class:`NM24` (2:4): nibble = pos0 | pos1 << 2 (the two kept positions, pos0 < pos1);
  ``values`` [N, Kp/2], per (tile, j) first the ``width`` first-kept values, then the
  ``width`` second-kept ones, so both loads are contiguous. 0.5 * itemsize + 1/8 bytes/weight.
* :class:`Bitmask` (any sparsity): nibble = keep bits of the group's 4 inputs; ``values`` are the
  kept entries of a row in (tile, word, nibble, input) order, so the values of one word are
  contiguous and a kept entry's address is tile offset + kept entries of earlier words + kept
  entries of earlier nibbles of its word + rank in its group (all popcounts, no scan over the
  row). ``tile_offsets`` [N, T] int32. 0.5 * itemsize + 1/8 + 4/(32 * width) bytes/weight at 50%.

K is padded with zero columns up to a multiple of ``32 * width`` (kernels never read x there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PatternError

NIBBLES = 8  # 4-bit fields per int32 word
GROUP = 4


def choose_width(cols: int, max_pad: float = 0.03) -> int:
    """Words per tile: 16 (512-input tiles, what the tensor-core path needs) unless padding K to a
    multiple of 512 would cost more than ``max_pad``; then the widest tile that divides K."""
    padded = -(-cols // 512) * 512
    if (padded - cols) / cols <= max_pad:
        return 16
    for width in (8, 4, 2, 1):
        if cols % (32 * width) == 0:
            return width
    return 1


class _Planes:
    """What both layouts share: the meta words fix the padded K; bytes = all their tensors."""

    meta: torch.Tensor

    @property
    def padded_k(self) -> int:
        return self.meta.shape[1] * 32

    @property
    def nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for value in vars(self).values()
                   if isinstance(value, torch.Tensor))


@dataclass
class NM24(_Planes):
    values: torch.Tensor  # [N, Kp/2]
    meta: torch.Tensor  # [N, Kp/32] int32
    shape: tuple[int, int]
    width: int


@dataclass
class Bitmask(_Planes):
    values: torch.Tensor  # [nnz]
    meta: torch.Tensor  # [N, Kp/32] int32 keep bits
    tile_offsets: torch.Tensor  # [N, T] int32: index in values of each (row, tile)'s first kept entry
    shape: tuple[int, int]
    width: int


def _padded(weight: torch.Tensor, width: int) -> torch.Tensor:
    cols = weight.shape[1]
    padded = -(-cols // (32 * width)) * (32 * width)
    return F.pad(weight, (0, padded - cols)) if padded != cols else weight


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[N, T, 8, W] nibbles -> [N, T*W] int32 words, nibble j of word (t, w) = nibbles[:, t, j, w]."""
    rows = nibbles.shape[0]
    shifts = 4 * torch.arange(NIBBLES, device=nibbles.device, dtype=torch.int64).view(1, 1, NIBBLES, 1)
    words = (nibbles.to(torch.int64) << shifts).sum(2)  # [N, T, W], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # same 32 bits, as int32
    return words.to(torch.int32).reshape(rows, -1)


def _nibbles(meta: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`_words`: [N, T*W] int32 -> [N, T, 8, W] int64 nibbles."""
    rows = meta.shape[0]
    words = meta.to(torch.int64).reshape(rows, -1, 1, width)
    shifts = 4 * torch.arange(NIBBLES, device=meta.device, dtype=torch.int64).view(1, 1, NIBBLES, 1)
    return (words >> shifts) & 15


def _check_2d(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise PatternError(f"kernel layouts take a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    if not torch.isfinite(weight).all():
        raise PatternError("the weight holds NaN or Inf values; fix the model before compressing it.")


def pack_24(weight: torch.Tensor, width: int | None = None) -> NM24:
    """2:4 planes layout of a [N, K] weight whose every group of 4 inputs holds at most 2 nonzeros."""
    _check_2d(weight)
    rows, cols = weight.shape
    if cols % GROUP:
        raise PatternError(f"2:4 needs the input dimension divisible by 4, got K={cols}; keep this layer dense.")
    width = width or choose_width(cols)
    groups = _padded(weight, width).reshape(rows, -1, GROUP)
    nonzero = groups != 0
    if int(nonzero.sum(-1).max()) > 2:
        raise PatternError("the weight is not 2:4 sparse (a group of 4 inputs holds more than 2 nonzeros); "
                           "prune it with pattern '2:4' first, or use the bitmask layout.")
    # Kept positions in increasing order; under-full groups take the first free positions, so pos0 < pos1.
    rank = nonzero.to(torch.int32) * 4 + torch.arange(GROUP, 0, -1, device=weight.device, dtype=torch.int32)
    positions = rank.topk(2, dim=-1).indices.sort(-1).values  # [N, G, 2]
    values = groups.gather(-1, positions)  # [N, G, 2]
    tiles = values.shape[1] // (NIBBLES * width)
    planar = values.reshape(rows, tiles, NIBBLES, width, 2).permute(0, 1, 2, 4, 3).reshape(rows, -1)
    nibbles = (positions[..., 0] | positions[..., 1] << 2).reshape(rows, tiles, NIBBLES, width)
    return NM24(planar.contiguous(), _words(nibbles), (rows, cols), width)


def pack_unstructured(weight: torch.Tensor, width: int | None = None) -> Bitmask:
    """Bitmask planes layout of any sparse [N, K] weight."""
    _check_2d(weight)
    rows, cols = weight.shape
    width = width or choose_width(cols)
    padded = _padded(weight, width)
    tiles = padded.shape[1] // (32 * width)
    # (tile, j, w, input) -> (tile, w, j, input): the values of one word become contiguous
    ordered = padded.reshape(rows, tiles, NIBBLES, width, GROUP).permute(0, 1, 3, 2, 4).contiguous()
    keep = ordered != 0
    if keep.sum() >= 2**31:
        raise PatternError("more than 2^31 nonzeros in one layer: the bitmask layout indexes with int32.")
    values = ordered[keep]
    per_tile = keep.reshape(rows * tiles, -1).sum(-1)
    offsets = (torch.cumsum(per_tile, 0) - per_tile).to(torch.int32).reshape(rows, tiles)
    bit = 1 << torch.arange(GROUP, device=weight.device)
    nibbles = (keep.long() * bit).sum(-1).permute(0, 1, 3, 2)  # [N, T, 8, W]
    return Bitmask(values.contiguous(), _words(nibbles), offsets, (rows, cols), width)


def unpack(layout: NM24 | Bitmask) -> torch.Tensor:
    """The dense [N, K] weight a layout holds (pure PyTorch, any device)."""
    rows, cols = layout.shape
    width = layout.width
    nibbles = _nibbles(layout.meta, width)  # [N, T, 8, W]
    tiles = nibbles.shape[1]
    if isinstance(layout, NM24):
        values = layout.values.reshape(rows, tiles, NIBBLES, 2, width).permute(0, 1, 2, 4, 3)  # [N,T,8,W,2]
        positions = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
        dense = torch.zeros(rows, tiles, NIBBLES, width, GROUP, dtype=values.dtype, device=values.device)
        dense.scatter_(-1, positions, values)
        return dense.reshape(rows, -1)[:, :cols]
    bit = 1 << torch.arange(GROUP, device=nibbles.device)
    keep = (nibbles.permute(0, 1, 3, 2).unsqueeze(-1) & bit) != 0  # [N, T, W, 8, 4]
    # each kept entry's index in the values: its tile's offset + the kept entries before it in the
    # tile. A gather, not boolean indexing: no host sync, so the fallback can be graph-captured.
    flat = keep.reshape(rows, tiles, -1)
    rank = torch.cumsum(flat, -1, dtype=torch.int32) - 1
    index = (layout.tile_offsets.unsqueeze(-1) + rank).clamp_(min=0)
    values = layout.values if layout.values.numel() else layout.values.new_zeros(1)
    ordered = torch.where(flat, values[index.reshape(-1)].reshape(flat.shape), 0).reshape(keep.shape)
    return ordered.permute(0, 1, 3, 2, 4).reshape(rows, -1)[:, :cols]


def reference_linear(x: torch.Tensor, layout: NM24 | Bitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W decompressed in PyTorch: the ground truth every kernel is tested against."""
    return F.linear(x, unpack(layout).to(x.dtype), bias)


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
