"""CoSpaDi as a pruning method: each linear becomes a dense dictionary times column-sparse codes.

Shmalko et al. 2025, "COSPADI: Compressing LLMs via Calibration-Guided Sparse Dictionary
Learning". The math is :func:`sparsewise.solvers.cospadi.cospadi_factorize`, the module
:class:`sparsewise.modules.SparseDictionaryLinear`. ``sparsity`` is the fraction of the layer's
values removed (its compression ratio, as the paper states 20-50%): atoms and nonzeros per column
follow from it and ``code_density`` (nonzeros / atoms; 1 is the low-rank budget).

    sw.prune(model, method="cospadi", sparsity=0.3, calibration=calib,
             method_options={"code_density": 0.25})

The layer's record describes its codes C (the sparse core): its shape is [atoms, in] and its
``achieved`` is the codes' sparsity; ``info`` holds the layer's compression and the data-aware
error against the whitened low-rank start.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..calibration.stats import STAT_HESSIAN
from ..errors import ConfigError, NumericalError
from ..modules.cospadi import SparseDictionaryLinear
from ..solvers.cospadi import cospadi_factorize, dictionary_size
from ._common import check_options, require_stats
from .base import Capabilities, LayerResult, LayerTask, Method, check_pattern, register


@register
class CoSpaDiPruning(Method):
    name: ClassVar[str] = "cospadi"
    capabilities: ClassVar[Capabilities] = Capabilities(
        patterns=frozenset({"unstructured"}), needs=frozenset({STAT_HESSIAN}),
        updates_weights=True, replaces_modules=True)

    def __init__(self, code_density: float = 0.25, iterations: int = 4, damp_ratio: float = 0.01,
                 cg_iterations: int = 60) -> None:
        self.defaults: dict[str, Any] = {"code_density": code_density, "iterations": iterations,
                                         "damp_ratio": damp_ratio, "cg_iterations": cg_iterations}

    def prune_layer(self, task: LayerTask) -> LayerResult:
        options = {**self.defaults, **check_options(task, self.name, self.defaults)}
        check_pattern(self, task.pattern)
        stats = require_stats(task, self.name, "xtx", STAT_HESSIAN)
        out_features, in_features = task.weight.shape
        if not 0.0 < task.sparsity < 1.0:
            raise ConfigError(f"{task.name}: cospadi's sparsity is the fraction of values removed, in (0, 1); "
                              f"got {task.sparsity}.")
        atoms, nonzeros = dictionary_size(out_features, in_features, 1.0 - task.sparsity, options["code_density"])
        try:
            factors = cospadi_factorize(task.weight, stats.hessian, atoms, nonzeros,
                                        iterations=options["iterations"], damp_ratio=options["damp_ratio"],
                                        cg_iterations=options["cg_iterations"])
        except NumericalError as error:
            raise NumericalError(f"{task.name}: {error}") from error
        kept = out_features * atoms + in_features * nonzeros
        info = {"atoms": atoms, "nonzeros_per_column": nonzeros, "kept_values": kept,
                "compression": 1.0 - kept / (out_features * in_features), "data_error": factors.error,
                "lowrank_start_error": factors.start_error, "tokens": stats.tokens}
        module = SparseDictionaryLinear.from_factors(factors, task.bias, dtype=task.weight.dtype)
        mask = module.codes.weight != 0
        mask.scatter_(0, factors.support.T.to(mask.device), True)  # a fitted value of exactly 0 is still kept
        return LayerResult(weight=module.codes.weight.detach(), mask=mask, info=info, module=module, core="codes")
