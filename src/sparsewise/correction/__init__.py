"""Mask refiners that run after a pruner, one layer at a time; importing this package registers them."""

from ..registry import import_plugins
from .base import MaskRefiner, RefineResult, RefineTask, available_refiners, get_refiner, register
from .dsnot import DSNOT_REPO_SKIP, DSnoT, dsnot_masks, expected_output_error

import_plugins(__name__, __path__, infrastructure=("base", "reconstruct"))  # every other file is a refiner

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
