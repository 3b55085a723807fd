"""Saving and loading sparse models: compressed tensor formats and atomic checkpoints."""

from __future__ import annotations

from .checkpoint import checkpoint_size, load, load_tokenizer, save
from .compressed import (
    bitmask_nbytes,
    index_bits,
    nm_nbytes,
    pack_bitmask,
    pack_bits,
    pack_nm,
    unpack_bitmask,
    unpack_bits,
    unpack_nm,
)

__all__ = [
    "bitmask_nbytes",
    "checkpoint_size",
    "index_bits",
    "load",
    "load_tokenizer",
    "nm_nbytes",
    "pack_bitmask",
    "pack_bits",
    "pack_nm",
    "save",
    "unpack_bitmask",
    "unpack_bits",
    "unpack_nm",
]
