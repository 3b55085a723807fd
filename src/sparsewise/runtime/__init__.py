"""Sparse inference runtime: pruned linears that run faster, not just smaller.

``accelerate(model)`` swaps pruned ``nn.Linear`` layers for :class:`SparseLinear` (compressed
weights + per-shape backend dispatch); ``tune(model)`` measures the dispatch table on this GPU
and caches it. Kernels live in :mod:`sparsewise.kernels`; nothing here is imported by pruning.
"""

from .accelerate import AccelerateReport, accelerate, tune
from .activation_linear import ActivationSparseLinear, accelerate_activations
from .sparse_linear import SparseLinear, weight_kind

__all__ = ["AccelerateReport", "ActivationSparseLinear", "SparseLinear", "accelerate", "accelerate_activations", "tune",
           "weight_kind"]
