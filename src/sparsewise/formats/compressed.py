"""Compressed storage of sparse tensors: a bitmask format and an N:M index format.

Pure tensor functions (no model, no files). Every round trip is exact, with one convention:
zero is zero. ``-0.0`` counts as a pruned entry, so it is not stored and comes back as ``+0.0``
(the two compare equal and give identical matmul results).

Storage cost per element, for ``itemsize`` bytes per value and sparsity ``s``:

* bitmask: ``(1 - s) * itemsize + 1/8`` (values + one mask bit per element);
  50% fp32 -> 2.125 bytes, 0.53x dense. It beats dense once ``s > 1 / (8 * itemsize)``.
* N:M: ``(n/m) * (itemsize + ceil(log2 m)/8)`` (n values + n indices per group of m);
  2:4 fp32 -> 2.125 bytes, 0.53x dense. This is the layout of the sparse tensor cores of
  Mishra et al., "Accelerating Sparse Deep Neural Networks" (2021), with indices packed densely.
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError, ConfigError, PatternError

# Values handled per vectorized step of the bit packer (a multiple of 8): bounds its int64
# temporaries to a few hundred MiB whatever the tensor size.
_CHUNK_VALUES = 1 << 24


def index_bits(m: int) -> int:
    """Bits needed to store a position inside a group of ``m``: ``ceil(log2 m)`` (at least 1)."""
    if m < 2:
        raise PatternError(f"N:M groups need M >= 2, got M={m}; use e.g. '2:4' or '4:8'.")
    return max(1, (m - 1).bit_length())


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ConfigError(f"bit packer handles 1..32 bits per value, got bits={bits}.")


def _frame_overlaps(bits: int) -> list[tuple[int, int, int]]:
    """(value j, byte k, shift) for every value/byte pair that share bits in a frame.

    Eight values of ``bits`` bits fill exactly ``bits`` bytes (a frame). Value j covers frame
    bits [j*bits, (j+1)*bits); its bit b is bit ``b + shift`` of byte k, ``shift = j*bits - 8k``.
    """
    overlaps = []
    for value in range(8):
        low, high = value * bits, (value + 1) * bits
        for byte in range(low // 8, (high - 1) // 8 + 1):
            overlaps.append((value, byte, low - 8 * byte))
    return overlaps


def _work_dtype(bits: int) -> torch.dtype:
    # Up to 8 bits a value and its byte parts fit a uint8, whose shifts wrap mod 256: the
    # cheapest layout. Wider values need int64 (their parts are shifted left by up to 7 bits).
    return torch.uint8 if bits <= 8 else torch.int64


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers (each < 2**bits) into a dense uint8 stream, LSB first.

    Value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``; bit ``j`` of the stream is bit
    ``j % 8`` of byte ``j // 8``. Output length is ``ceil(numel * bits / 8)``; the tail is zero.
    Vectorized over frames of 8 values; the only Python loops run over the <= 40 bit overlaps.
    """
    _check_bits(bits)
    flat = values.reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        raise ConfigError(f"pack_bits packs integers, got dtype {values.dtype}.")
    count = flat.numel()
    if count and flat.dtype != torch.bool and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ConfigError(f"pack_bits: values must lie in [0, {1 << bits}) to fit in {bits} bits.")
    work = _work_dtype(bits)
    out = torch.empty(math.ceil(count / 8), bits, dtype=torch.uint8, device=flat.device)
    overlaps = _frame_overlaps(bits)
    for start in range(0, count, _CHUNK_VALUES):
        chunk = flat[start : start + _CHUNK_VALUES].to(work)
        if chunk.numel() % 8:
            chunk = torch.cat([chunk, chunk.new_zeros(8 - chunk.numel() % 8)])
        frames = chunk.view(-1, 8).t()  # row j: value j of every frame
        packed = torch.zeros(bits, frames.shape[1], dtype=work, device=flat.device)
        for value, byte, shift in overlaps:
            part = frames[value] << shift if shift >= 0 else frames[value] >> -shift
            packed[byte] |= part if work == torch.uint8 else part & 0xFF
        first = start // 8
        out[first : first + frames.shape[1]] = packed.t().to(torch.uint8)
    return out.reshape(-1)[: math.ceil(count * bits / 8)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values (uint8 up to 8 bits, else int64)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"packed bits must be uint8, got {packed.dtype}: the checkpoint is corrupt; re-save it.")
    packed = packed.reshape(-1)
    if packed.numel() * 8 < count * bits:
        raise CheckpointError(
            f"packed bits hold {packed.numel() * 8} bits, {count} values of {bits} bits need {count * bits}: "
            "the checkpoint is corrupt or truncated; re-save it."
        )
    n_frames = math.ceil(count / 8)
    stream = packed[: n_frames * bits]
    if stream.numel() < n_frames * bits:
        stream = torch.cat([stream, stream.new_zeros(n_frames * bits - stream.numel())])
    work = _work_dtype(bits)
    out = torch.empty(n_frames, 8, dtype=work, device=packed.device)
    overlaps = _frame_overlaps(bits)
    frames_per_chunk = _CHUNK_VALUES // 8
    for first in range(0, n_frames, frames_per_chunk):
        frames = stream[first * bits : (first + frames_per_chunk) * bits].view(-1, bits).t().to(work)
        values = torch.zeros(8, frames.shape[1], dtype=work, device=packed.device)
        for value, byte, shift in overlaps:
            values[value] |= frames[byte] >> shift if shift >= 0 else frames[byte] << -shift
        out[first : first + frames.shape[1]] = (values & ((1 << bits) - 1)).t()
    return out.reshape(-1)[:count]


def pack_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Split a sparse tensor into (nonzero values in row-major order, 1-bit mask as uint8, shape).

    Works on any shape (flattened row-major, i.e. along the contiguous last dim).
    """
    flat = weight.reshape(-1)
    keep = flat != 0
    return flat[keep], pack_bits(keep, 1), tuple(weight.shape)


def unpack_bitmask(
    values: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, ...] | list[int], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: the dense tensor of ``shape`` and ``dtype``."""
    numel = math.prod(shape)
    keep = unpack_bits(bitmask, 1, numel).bool()
    if int(keep.sum()) != values.numel():
        raise CheckpointError(
            f"bitmask marks {int(keep.sum())} nonzeros but {values.numel()} values are stored: "
            "the checkpoint is corrupt; re-save it."
        )
    dense = torch.zeros(numel, dtype=dtype, device=values.device)
    dense[keep] = values.reshape(-1).to(dtype)
    return dense.reshape(tuple(shape))


def pack_nm(weight_2d: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress an N:M-sparse [rows, cols] tensor (groups of ``m`` along the last dim).

    Returns ``values`` [rows, cols*n/m] (same dtype) and the in-group positions of those values,
    ``ceil(log2 m)`` bits each, packed by :func:`pack_bits`. A group with fewer than ``n``
    nonzeros is padded with zeros at unused positions, so every group stores exactly ``n``
    entries, in increasing position order. Raises PatternError if a group has more than ``n``.
    """
    if weight_2d.dim() != 2:
        raise PatternError(f"pack_nm expects a 2-D [rows, cols] tensor, got shape {tuple(weight_2d.shape)}.")
    if m < 2 or not 0 < n < m:
        raise PatternError(f"N:M needs 0 < N < M and M >= 2 (e.g. 2:4), got {n}:{m}.")
    rows, cols = weight_2d.shape
    if cols % m:
        raise PatternError(f"N:M with M={m} needs the last dimension ({cols}) divisible by {m}.")
    # Position-major layout [m, groups]: the loops below run over the m positions, each step
    # vectorized over all groups (reductions over a tiny last dim are slow).
    by_position = weight_2d.reshape(-1, m).t().contiguous()
    nonzero = by_position != 0
    per_group = torch.zeros(nonzero.shape[1], dtype=torch.int32, device=weight_2d.device)
    for position in range(m):
        per_group += nonzero[position]
    if bool((per_group > n).any()):
        flat_group = int((per_group > n).nonzero()[0])
        row, group = divmod(flat_group, cols // m)
        raise PatternError(
            f"tensor is not {n}:{m} sparse: row {row}, group {group} (columns {group * m}..{group * m + m - 1}) "
            f"holds {int(per_group[flat_group])} nonzeros, more than {n}. Check the pattern the layer was "
            "pruned with (its LayerRecord) or store it with the bitmask format."
        )
    # Keep every nonzero plus the first (n - count) zeros of each group, in position order;
    # a dropped entry is written to the spare slot n, which is cut off at the end.
    pad_needed = n - per_group
    zeros_before = torch.zeros_like(per_group)
    kept_before = torch.zeros_like(per_group)
    position_dtype = torch.uint8 if m <= 256 else torch.int64
    chosen = torch.zeros(n + 1, per_group.numel(), dtype=position_dtype, device=weight_2d.device)
    values = torch.zeros(n + 1, per_group.numel(), dtype=weight_2d.dtype, device=weight_2d.device)
    for position in range(m):
        is_nonzero = nonzero[position]
        keep = is_nonzero | (zeros_before < pad_needed)
        slot = torch.where(keep, kept_before, n).unsqueeze(0)
        chosen.scatter_(0, slot, torch.full_like(slot, position, dtype=position_dtype))
        # Padding slots hold a plain zero even where the weight had -0.0 (zero is zero).
        entry = torch.where(is_nonzero, by_position[position], torch.zeros_like(by_position[position]))
        values.scatter_(0, slot, entry.unsqueeze(0))
        kept_before += keep
        zeros_before += ~is_nonzero
    packed_values = values[:n].t().reshape(rows, cols // m * n)
    return packed_values, pack_bits(chosen[:n].t(), index_bits(m))


def unpack_nm(
    values: torch.Tensor,
    indices_packed: torch.Tensor,
    n: int,
    m: int,
    shape: tuple[int, int] | list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`pack_nm`: the dense [rows, cols] tensor."""
    rows, cols = (int(size) for size in shape)
    if cols % m or values.numel() != rows * cols // m * n:
        raise CheckpointError(
            f"N:M {n}:{m} values of {values.numel()} entries do not fit shape {(rows, cols)}: "
            "the checkpoint is corrupt; re-save it."
        )
    n_groups = rows * (cols // m)
    positions = unpack_bits(indices_packed, index_bits(m), n_groups * n).reshape(rows, cols // m, n)
    if n_groups and int(positions.max()) >= m:
        raise CheckpointError(f"N:M positions exceed the group size {m}: the checkpoint is corrupt; re-save it.")
    dense = torch.zeros(rows, cols // m, m, dtype=dtype, device=values.device)
    dense.scatter_(-1, positions.long(), values.reshape(rows, cols // m, n).to(dtype))
    return dense.reshape(rows, cols)


def bitmask_nbytes(numel: int, nonzeros: int, itemsize: int) -> int:
    """Bytes of the bitmask format: the nonzero values plus one bit per element."""
    return nonzeros * itemsize + math.ceil(numel / 8)


def nm_nbytes(numel: int, n: int, m: int, itemsize: int) -> int:
    """Bytes of the N:M format: ``n`` values and ``n`` packed positions per group of ``m``."""
    stored = numel // m * n
    return stored * itemsize + math.ceil(stored * index_bits(m) / 8)
