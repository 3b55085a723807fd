"""Mask refiners that run after a pruner, one layer at a time; importing this package registers them."""

from . import dsnot  # noqa: F401  (registration side effect)
from .base import MaskRefiner, RefineResult, RefineTask, available_refiners, get_refiner, register
from .dsnot import DSNOT_REPO_SKIP, DSnoT, dsnot_masks, expected_output_error

__all__ = [
    "DSNOT_REPO_SKIP",
    "DSnoT",
    "MaskRefiner",
    "RefineResult",
    "RefineTask",
    "available_refiners",
    "dsnot_masks",
    "expected_output_error",
    "get_refiner",
    "register",
]
