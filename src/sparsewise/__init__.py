"""sparsewise: make neural networks sparse and make that sparsity pay.

Public API (small and stable)::

    import sparsewise as sw
    model, tok = sw.load_model("smollm2-135m")
    calib = sw.data.calibration("c4.jsonl", tok, n=128, seqlen=512, seed=0)
    result = sw.prune(model, method="wanda", sparsity=0.5, pattern="2:4", calibration=calib)
    sw.evaluate.perplexity(model, tok, "wiki.test.raw", seqlen=512, max_windows=32)
    sw.save(model, "out/", tokenizer=tok); model = sw.load("out/")

Names are resolved lazily so ``import sparsewise`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NumericalError,
    PatternError,
    SparsewiseError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "data": ("data", None),
    "evaluate": ("evaluate", None),
    "metrics": ("metrics", None),
    "runtime": ("runtime", None),
    "activation": ("activation", None),
    "allocation": ("allocation", None),
    "training": ("training", None),
    "structured": ("structured", None),
    "sparsify_activations": ("activation", "sparsify_activations"),
    "remove_activation_sparsity": ("activation", "remove_activation_sparsity"),
    "PruneConfig": ("config", "PruneConfig"),
    "save": ("formats", "save"),
    "load": ("formats", "load"),
    "load_tokenizer": ("formats", "load_tokenizer"),
    "available_methods": ("methods", "available_methods"),
    "ModelAdapter": ("models", "ModelAdapter"),
    "load_model": ("models", "load_model"),
    "prune": ("oneshot", "prune"),
    "PruneResult": ("oneshot", "PruneResult"),
    "Pattern": ("patterns", "Pattern"),
    "LayerRecord": ("records", "LayerRecord"),
    "get_records": ("records", "get_records"),
}

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "NumericalError", "PatternError", "SparsewiseError",
    "UnsupportedModelError", *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsewise' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
