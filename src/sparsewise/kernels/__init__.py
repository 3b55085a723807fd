"""Sparse kernels. Every kernel has a plain PyTorch reference (used on CPU and in CI).

Layouts come straight from the on-disk formats of :mod:`sparsewise.formats` (no conversion):
2:4 = values [N, K/2] + 2-bit positions packed 16 per int32 word; bitmask = row-major nonzero
values + 1 bit per element packed 32 per int32 word, plus per-tile value offsets.
"""

from .layouts import NM24, Bitmask, pack_24, pack_bitmask_tiles, reference_linear, unpack

__all__ = ["Bitmask", "NM24", "pack_24", "pack_bitmask_tiles", "reference_linear", "unpack"]
