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

# Bits handled per vectorized step of the bit packer: bounds its temporary one-int64-per-bit
# tensor to 64 MiB whatever the tensor size.
_STREAM_BITS = 1 << 23


def index_bits(m: int) -> int:
    """Bits needed to store a position inside a group of ``m``: ``ceil(log2 m)`` (at least 1)."""
    if m < 2:
        raise PatternError(f"N:M groups need M >= 2, got M={m}; use e.g. '2:4' or '4:8'.")
    return max(1, (m - 1).bit_length())


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ConfigError(f"bit packer handles 1..32 bits per value, got bits={bits}.")


def _chunk_values(bits: int) -> int:
    # A multiple of 8 values, so every chunk starts on a byte boundary of the stream.
    return max(8, _STREAM_BITS // bits // 8 * 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers (each < 2**bits) into a dense uint8 stream, LSB first.

    Value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``; bit ``j`` of the stream is bit
    ``j % 8`` of byte ``j // 8``. Output length is ``ceil(numel * bits / 8)``; the tail is zero.
    """
    _check_bits(bits)
    flat = values.reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        raise ConfigError(f"pack_bits packs integers, got dtype {values.dtype}.")
    flat = flat.to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ConfigError(f"pack_bits: values must lie in [0, {1 << bits}) to fit in {bits} bits.")
    out = torch.zeros(math.ceil(flat.numel() * bits / 8), dtype=torch.uint8, device=flat.device)
    value_shifts = torch.arange(bits, device=flat.device)
    byte_shifts = torch.arange(8, device=flat.device)
    step = _chunk_values(bits)
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        stream = ((chunk[:, None] >> value_shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.reshape(-1, 8) << byte_shifts).sum(dim=1).to(torch.uint8)
        byte_start = start * bits // 8  # exact: start is a multiple of 8
        out[byte_start : byte_start + packed.numel()] = packed
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as an int64 vector."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"packed bits must be uint8, got {packed.dtype}: the checkpoint is corrupt; re-save it.")
    packed = packed.reshape(-1)
    if packed.numel() * 8 < count * bits:
        raise CheckpointError(
            f"packed bits hold {packed.numel() * 8} bits, {count} values of {bits} bits need {count * bits}: "
            "the checkpoint is corrupt or truncated; re-save it."
        )
    out = torch.empty(count, dtype=torch.int64, device=packed.device)
    value_shifts = torch.arange(bits, device=packed.device)
    byte_shifts = torch.arange(8, device=packed.device)
    step = _chunk_values(bits)
    for start in range(0, count, step):
        n_values = min(step, count - start)
        byte_start = start * bits // 8
        chunk = packed[byte_start : byte_start + math.ceil(n_values * bits / 8)].to(torch.int64)
        stream = ((chunk[:, None] >> byte_shifts) & 1).reshape(-1)[: n_values * bits]
        out[start : start + n_values] = (stream.reshape(n_values, bits) << value_shifts).sum(dim=1)
    return out


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
    groups = weight_2d.reshape(rows, cols // m, m)
    nonzero = groups != 0
    per_group = nonzero.sum(dim=-1)
    if bool((per_group > n).any()):
        row, group = (per_group > n).nonzero()[0].tolist()
        raise PatternError(
            f"tensor is not {n}:{m} sparse: row {row}, group {group} (columns {group * m}..{group * m + m - 1}) "
            f"holds {int(per_group[row, group])} nonzeros, more than {n}. Check the pattern the layer was "
            "pruned with (its LayerRecord) or store it with the bitmask format."
        )
    # Rank nonzeros first, then zeros, each by position; keep n and restore position order.
    position = torch.arange(m, device=weight_2d.device)
    rank_key = (~nonzero).to(torch.int64) * m + position
    chosen = torch.sort(torch.sort(rank_key, dim=-1).indices[..., :n], dim=-1).values
    values = torch.gather(groups, -1, chosen)
    # Padding slots read a zero that may be -0.0: store a plain zero (zero is zero).
    values = torch.where(values != 0, values, torch.zeros_like(values))
    return values.reshape(rows, cols // m * n), pack_bits(chosen, index_bits(m))


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
    dense.scatter_(-1, positions, values.reshape(rows, cols // m, n).to(dtype))
    return dense.reshape(rows, cols)


def bitmask_nbytes(numel: int, nonzeros: int, itemsize: int) -> int:
    """Bytes of the bitmask format: the nonzero values plus one bit per element."""
    return nonzeros * itemsize + math.ceil(numel / 8)


def nm_nbytes(numel: int, n: int, m: int, itemsize: int) -> int:
    """Bytes of the N:M format: ``n`` values and ``n`` packed positions per group of ``m``."""
    stored = numel // m * n
    return stored * itemsize + math.ceil(stored * index_bits(m) / 8)
