"""Depth pruning: remove the least important whole blocks (structured; issue 19 point 2).

``sw.prune(model, "depth", 0.25, calibration=calib)`` removes ``round(0.25 * n)`` of the model's
n blocks (the rounding is stated in the notes), ranked by ``importance``:

* ``"bi"`` (default): ShortGPT's Block Influence ``BI_i = 1 - mean_t cos(x_in, x_out)`` of block i
  on the calibration tokens (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect"), one walk over the blocks;
* ``"removal_loss"``: ``KL(p_dense || p_skip_i)`` of the next-token distributions when block i
  alone is skipped, one forward per block.

The blocks with the lowest scores go: the ModuleList loses them, the config's layer count and
per-layer lists follow, ``layer_idx`` are renumbered (see :mod:`sparsewise.structured.depth`), so
the model saves as a plain Hugging Face checkpoint and through ``sw.save``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import ConfigError
from ..records import LayerRecord
from .base import Capabilities, Method, ModelTask, register

IMPORTANCES = ("bi", "removal_loss")


@register
class DepthPrune(Method):
    """``prune_model``: score every block on the calibration data, remove the ``round(ratio * n)``
    least important ones (see the module docstring). Option ``importance="bi"|"removal_loss"``."""

    name: ClassVar[str] = "depth"
    capabilities: ClassVar[Capabilities] = Capabilities(patterns=frozenset({"unstructured"}), needs_data=True,
                                                        updates_weights=True, whole_model=True)

    def prune_layer(self, task):  # noqa: ANN001 - the protocol's per-layer door: blocks go whole
        raise ConfigError("depth removes whole blocks: use sw.prune(model, 'depth', ratio, calibration=...).")

    def prune_model(self, task: ModelTask) -> dict[str, LayerRecord]:
        from ..structured.depth import (
            _single_stack,
            block_influence_scores,
            blocks_to_remove,
            depth_count,
            removal_loss_scores,
            remove_blocks,
        )

        options = dict(task.options)
        importance = options.pop("importance", "bi")
        if options:
            raise ConfigError(f"depth takes the option importance='bi'|'removal_loss' only; got {sorted(options)}.")
        if importance not in IMPORTANCES:
            raise ConfigError(f"depth importance must be one of {', '.join(IMPORTANCES)}; got {importance!r}.")
        if task.include or task.exclude:
            raise ConfigError("depth ranks all blocks of the model: include/exclude do not apply.")
        blocks = _single_stack(task.model)
        count = depth_count(len(blocks), task.sparsity)  # refuses 0-of-ratio>0 and all blocks before any work
        extra: dict[str, Any] = {}
        if importance == "bi":
            scores = block_influence_scores(task.model, task.calibration, device=task.device,
                                            batch_size=task.batch_size)
        else:
            losses = removal_loss_scores(task.model, task.calibration, device=task.device,
                                         batch_size=task.batch_size or 4)
            scores, extra = losses["kl"], {"ce_increase": losses["ce_increase"]}
        chosen = blocks_to_remove(scores, count)
        info = remove_blocks(task.model, chosen)
        task.removed.update({**info, "importance": importance, "scores": scores, **extra,
                             "blocks_before": len(blocks)})
        before, removed = info.get("params_before", 0), info["params_removed"]
        kept = len(blocks) - count
        task.notes.append(
            f"depth ({importance}): ratio {task.sparsity:g} of {len(blocks)} blocks -> {count} whole blocks removed "
            f"({count / len(blocks):.1%}; {len(blocks)} -> {kept})"
            + (f"; parameters {before:,} -> {before - removed:,} (-{removed / before:.1%})" if before else "")
            + (f"; config {', '.join(info['config'])}" if info["config"] else ""))
        if chosen:
            task.notes.append("  removed: " + ", ".join(f"{name} ({scores[index]:.4g})"
                                                        for name, index in zip(info["removed"], chosen, strict=True)))
        return {}
