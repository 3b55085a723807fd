"""Exceptions raised by sparsewise. Every message says what went wrong *and* what to do."""

from __future__ import annotations


class SparsewiseError(Exception):
    """Base class: catch this to handle any sparsewise failure."""


class ConfigError(SparsewiseError, ValueError):
    """A setting is impossible (ratio outside [0, 1), N >= M, unknown method, ...)."""


class PatternError(ConfigError):
    """A sparsity pattern does not fit a layer (e.g. N:M with M not dividing the input dimension)."""


class UnsupportedModelError(SparsewiseError, TypeError):
    """No adapter can find repeated blocks / prunable layers in this model."""


class NumericalError(SparsewiseError, ArithmeticError):
    """Non-finite weights or statistics, or a Hessian that stays non positive definite."""


class CheckpointError(SparsewiseError, OSError):
    """A saved model is missing, truncated, corrupt or not a sparsewise checkpoint."""


class DataError(SparsewiseError, ValueError):
    """Calibration or evaluation data cannot be read or is too short."""
