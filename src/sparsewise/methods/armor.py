"""ARMOR as a pruning method: every block linear becomes A . S . B around a 2:4 core S.

Liu et al. 2025, "ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix
Factorization". The math (one layer's factorization) is :mod:`sparsewise.solvers.armor`, the
module it puts in place of a linear :class:`sparsewise.modules.ARMORLinear`; this file is the
method: a whole-model walk (each layer is optimized against its block's inputs recomputed through
the already factorized layers), modules swapped in their parents (undone on failure), and the
:class:`~sparsewise.records.LayerRecord` of each 2:4 core so that save, report and the runtime
treat it like any pruned linear. ``sw.prune(model, method="armor", pattern="2:4", ...)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, PatternError
from ..modules.armor import ARMORLinear
from ..records import LayerRecord, get_records, set_records
from ..solvers.armor import GROUP, _block_sizes, _check_settings
from .base import Capabilities, Method, ModelTask, register

ARMOR_OPTIONS = ("block_size", "iterations", "lr", "patience", "rtol", "select")


@register
class ARMORPruning(Method):
    """``prune_model``: :func:`armor` over the task's model; options are :data:`ARMOR_OPTIONS`."""

    name: ClassVar[str] = "armor"
    capabilities: ClassVar[Capabilities] = Capabilities(
        patterns=frozenset({"2:4"}), needs_data=True, updates_weights=True, replaces_modules=True, whole_model=True)

    def __init__(self, **options: Any) -> None:
        self.options = _checked(options)

    def prune_layer(self, task):  # noqa: ANN001 - the protocol's per-layer door: ARMOR needs the walk
        raise ConfigError("ARMOR factorizes every layer against its block's recomputed inputs: use prune_model "
                          "(sw.prune(model, method='armor', ...)).")

    def prune_model(self, task: ModelTask) -> dict[str, LayerRecord]:
        infos = armor(task.model, task.calibration, include=task.include, exclude=task.exclude,
                      batch_size=task.batch_size, device=task.device, seed=task.seed, progress=task.progress,
                      **{**self.options, **_checked(task.options)})
        records = get_records(task.model)
        return {f"{name}.sparse": records[f"{name}.sparse"] for name in infos}


def _checked(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(ARMOR_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown ARMOR option(s) {unknown}; known: {', '.join(ARMOR_OPTIONS)}.")
    return dict(options)


def _layer_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _core_record(name: str, module: ARMORLinear, info: dict[str, Any]) -> LayerRecord:
    """The 2:4 core ``<name>.sparse`` as a pruned linear (its zeros, its mask)."""
    weight = module.sparse.weight.detach()
    mask = weight != 0
    return LayerRecord(name=f"{name}.sparse", pattern="2:4", sparsity=0.5,
                       achieved=float((~mask).sum()) / mask.numel(), method="armor",
                       shape=(module.out_features, module.in_features), info=info, mask=mask)


def armor(
    model: nn.Module,
    calibration,
    *,
    block_size: int | tuple[int, int] = 32,
    iterations: int = 3000,
    lr: float = 1e-4,
    patience: int = 100,
    rtol: float = 1e-6,
    select: str = "gradient",
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    batch_size: int | None = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Replace every block linear of ``model`` with an :class:`ARMORLinear` (2:4 core + A, B).

    Sequential block-by-block calibration (mode "block"): each block's input energies
    diag(X^T X) come from the already factorized earlier blocks, every layer of the block is
    factorized and swapped in its parent, and the block's outputs are recomputed through the
    ARMORLinears. Each layer gets its own seed, derived from ``seed`` and its name. Each core is
    recorded as ``<name>.sparse`` (pattern 2:4, method "armor"), so ``sw.save`` stores it in N:M
    form and ``sw.load`` rebuilds the factorized modules.

    Returns {layer name: info} (initial/final proxy loss, iterations, ...). On any failure the
    original modules are put back, so the model is left as it was.
    """
    from ..calibration.engine import sequential_calibration
    from ..calibration.progress import progress_bar
    from ..calibration.run import calibration_batches
    from ..calibration.stats import STAT_NORMS
    from ..models.adapters import ModelAdapter, PrunableLayer

    _check_settings(iterations, lr, patience, rtol, 0.0, select)
    adapter = ModelAdapter(model, include=include, exclude=exclude)
    names = [name for index in range(len(adapter.blocks)) for name in adapter.block_layers(index)]
    if not names:
        raise ConfigError("ARMOR found no block linear to factorize; loosen include/exclude.")
    for name in names:  # fail before spending time on the first blocks
        layer = PrunableLayer(name=name, module=model.get_submodule(name))
        if layer.in_features % GROUP:
            raise PatternError(
                f"ARMOR: {name} has in_features = {layer.in_features}, not divisible by 4; exclude it with "
                f"exclude=[{name.rsplit('.', 1)[-1]!r}]."
            )
        try:
            _block_sizes(block_size, layer.out_features, layer.in_features)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    batches = calibration_batches(calibration, batch_size)
    options = {"block_size": block_size, "iterations": iterations, "lr": lr, "patience": patience,
               "rtol": rtol, "select": select}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    infos: dict[str, dict[str, Any]] = {}
    records: dict[str, LayerRecord] = {}
    bar = progress_bar(len(names), "armor 2:4", progress, unit="layer")

    def factorize_layer(name: str, stats) -> None:
        original = model.get_submodule(name)
        new, factors = ARMORLinear.from_linear(original, stats.sq_sum, seed=_layer_seed(seed, name), **options)
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, new)
        replaced.append((parent, attribute, original))
        infos[name] = {**factors.info(), "tokens": int(stats.tokens)}
        records[f"{name}.sparse"] = _core_record(name, new, infos[name])
        bar.update(1)

    try:
        sequential_calibration(
            model, adapter.blocks, adapter.block_layers, batches, factorize_layer,
            wanted=frozenset({STAT_NORMS}), device=torch.device(device), mode="block",
            stack_starts=adapter.stack_starts,
        )
    except BaseException:
        for parent, attribute, original in reversed(replaced):
            setattr(parent, attribute, original)
        raise
    finally:
        bar.close()
    set_records(model, {**{k: v for k, v in get_records(model).items() if k not in infos}, **records})
    return infos
