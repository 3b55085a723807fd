"""``sw.evaluate``: quality measurements of a (pruned) model. See :mod:`sparsewise.metrics`."""

from .metrics import FidelityProbe, FidelityResult, PerplexityResult, perplexity, sparsity_report

__all__ = ["FidelityProbe", "FidelityResult", "PerplexityResult", "perplexity", "sparsity_report"]
