"""Layer-wise solvers: pure tensor math that methods call (no model plumbing)."""

from .sparsegpt import sparsegpt_prune

__all__ = ["sparsegpt_prune"]
