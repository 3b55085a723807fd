"""Saving and loading sparse models: compressed tensor formats and atomic checkpoints."""

from __future__ import annotations

from .checkpoint import (
    SAVE_DTYPES,
    SavedCheckpoint,
    SaveInfo,
    checkpoint_size,
    load,
    load_tokenizer,
    resolve_save_dtype,
    save,
)
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
    "SAVE_DTYPES",
    "SaveInfo",
    "SavedCheckpoint",
    "bitmask_nbytes",
    "checkpoint_size",
    "index_bits",
    "load",
    "load_tokenizer",
    "nm_nbytes",
    "pack_bitmask",
    "pack_bits",
    "pack_nm",
    "resolve_save_dtype",
    "save",
    "unpack_bitmask",
    "unpack_bits",
    "unpack_nm",
]
