"""sparsewise: make neural networks sparse and make that sparsity pay.

Public API (small and stable)::

    model, tok = sw.load_model("smollm2-135m")
    calib = sw.data.calibration(source, tok, n=128, seqlen=512, seed=0)
    result = sw.prune(model, method="wanda", sparsity=0.5, pattern="2:4", calibration=calib)
    sw.evaluate.perplexity(model, tok, "wiki.test.raw", seqlen=512, max_windows=32)
    sw.save(model, "out/"); model = sw.load("out/")
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(source, **kwargs):
    """Load a model and its tokenizer: short name, HF dir, hub id, .gguf file, or an nn.Module."""
    from .models.loading import load_model as _load_model

    return _load_model(source, **kwargs)
