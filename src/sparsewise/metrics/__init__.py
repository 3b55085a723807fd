"""Quality and sparsity measurements: perplexity, fidelity to the dense model, sparsity reports."""

from __future__ import annotations

from .fidelity import FidelityProbe, FidelityResult, kl_and_agreement
from .perplexity import PerplexityResult, perplexity, perplexity_from_ids
from .report import LayerSparsity, SparsityReport, sparsity_report

__all__ = [
    "FidelityProbe",
    "FidelityResult",
    "LayerSparsity",
    "PerplexityResult",
    "SparsityReport",
    "kl_and_agreement",
    "perplexity",
    "perplexity_from_ids",
    "sparsity_report",
]
