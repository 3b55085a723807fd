"""Expert dropping: remove, in every MoE layer, the experts the router picks least (structured).

Frequency-based expert pruning (the "heavy-hitters counting" criterion of Muzio et al. 2024,
"SEER-MoE: Sparse Expert Efficiency through Regularization for Mixture-of-Experts"): run the
calibration data through the model, count for each MoE layer how often the router selects each
expert among its top-k, and drop the ``round(ratio * E)`` least selected experts of every layer.
``sw.prune(model, "expert_drop", 0.25, calibration=...)`` removes a quarter of the experts of
every block: the fused expert parameters (or the expert ModuleList), the router's rows and the
expert counts of the modules and of ``model.config`` shrink, so the model runs (and ``sw.save`` /
``sw.load`` rebuild it) with fewer experts. The math is :func:`experts_to_keep`; finding and
slicing the MoE layers is :mod:`sparsewise.models.experts`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..records import LayerRecord, get_records, set_records
from .base import Capabilities, Method, ModelTask, register


def experts_to_keep(counts: torch.Tensor, ratio: float, groups: int = 1) -> torch.Tensor:
    """Boolean keep-mask over experts: in each of ``groups`` contiguous equal groups, drop the
    ``round(ratio * E / groups)`` experts with the fewest router selections ``counts`` [E]
    (ties: the lower index goes first)."""
    experts = counts.numel()
    if groups < 1 or experts % groups:
        raise ConfigError(f"{experts} experts do not split into {groups} equal routing groups.")
    size = experts // groups
    drop = round(ratio * size)
    keep = torch.ones(experts, dtype=torch.bool)
    for start in range(0, experts, size):
        order = torch.sort(counts[start : start + size].double(), stable=True).indices
        keep[start + order[:drop]] = False
    return keep


class _RouteCounter:
    """Counts, per MoE layer, how often each expert is among a token's top-k, from its router's
    output: the integer expert indices it returns (transformers' routers return (logits, weights,
    indices)), or else the top-k of its [tokens, experts] logits (k from the router or config)."""

    def __init__(self, blocks) -> None:
        self.counts = {block.name: torch.zeros(block.num_experts, dtype=torch.float64) for block in blocks}
        self.top_k = {block.name: block.top_k for block in blocks}
        self.handles = [block.router.register_forward_hook(self._hook(block.name, block.router_name))
                        for block in blocks]

    def _hook(self, name: str, router_name: str):
        def count(_module: nn.Module, _args: tuple, output: Any) -> None:
            counts = self.counts[name]
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            tensors = [value for value in outputs if isinstance(value, torch.Tensor)]
            index = next((value for value in tensors if not value.is_floating_point()), None)
            if index is None:
                logits = next((value for value in tensors if value.shape[-1] == counts.numel()), None)
                if logits is None or not self.top_k[name]:
                    raise ConfigError(f"{router_name} returns neither expert indices nor [tokens, {counts.numel()}] "
                                      "logits with a known top-k (router.top_k or config.num_experts_per_tok), so "
                                      "its choices cannot be counted for expert_drop.")
                index = logits.topk(self.top_k[name], dim=-1).indices
            self.top_k[name] = self.top_k[name] or int(index.shape[-1])
            index = index.reshape(-1).cpu()
            counts += torch.bincount(index[(index >= 0) & (index < counts.numel())], minlength=counts.numel()).double()

        return count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@register
class ExpertDrop(Method):
    """``prune_model``: count router selections on the calibration data, drop the least-used
    experts of every MoE layer at ratio ``sparsity`` (see the module docstring)."""

    name: ClassVar[str] = "expert_drop"
    capabilities: ClassVar[Capabilities] = Capabilities(patterns=frozenset({"unstructured"}), needs_data=True,
                                                        updates_weights=True, whole_model=True)

    def prune_layer(self, task):  # noqa: ANN001 - the protocol's per-layer door: experts go whole
        raise ConfigError("expert_drop removes whole experts of MoE layers: use sw.prune(model, 'expert_drop', ratio, "
                          "calibration=...).")

    def prune_model(self, task: ModelTask) -> dict[str, LayerRecord]:
        from ..calibration.run import calibration_batches
        from ..models.experts import moe_blocks, remove_experts, set_config_expert_count

        if task.options:
            raise ConfigError(f"expert_drop takes no method options; got {sorted(task.options)}.")
        blocks = _selected(moe_blocks(task.model), task.include, task.exclude)
        if not blocks:
            raise ConfigError(f"{type(task.model).__name__} has no routed mixture-of-experts layer (an 'experts' "
                              "module next to a 'gate'/'router'): expert_drop applies to MoE models only.")
        counter = _RouteCounter(blocks)
        device = next(task.model.parameters()).device
        try:
            with torch.no_grad():
                for batch in calibration_batches(task.calibration, task.batch_size):
                    task.model(**{key: value.to(device) if isinstance(value, torch.Tensor) else value
                                  for key, value in batch.items()})
        finally:
            counter.remove()
        silent = [block.router_name for block in blocks if not counter.counts[block.name].sum()]
        if silent:
            raise ConfigError(f"{silent[0]} (and {len(silent) - 1} more) never routed a calibration token: check that "
                              "the calibration data runs through the model's MoE layers.")
        plans = []
        for block in blocks:  # every check before the first change
            keep = experts_to_keep(counter.counts[block.name], task.sparsity, block.groups)
            top_k = counter.top_k[block.name]
            if top_k and int(keep.sum()) < top_k:
                raise ConfigError(f"expert_drop at {task.sparsity:g} leaves {int(keep.sum())} of {block.num_experts} "
                                  f"experts in {block.name}, fewer than the router's top-k = {top_k}: use a ratio of at "
                                  f"most {1 - top_k / block.num_experts:g}.")
            plans.append((block, keep))
        if len({int(keep.sum()) for _, keep in plans}) > 1 and getattr(task.model, "config", None) is not None:
            raise ConfigError("expert_drop would leave MoE layers with different expert counts, which one model "
                              "config cannot describe: use a ratio that drops the same number in every layer.")
        removed: dict[str, Any] = {}
        before = sum(param.numel() for param in task.model.parameters())
        old = blocks[0].num_experts
        for block, keep in plans:
            counts = counter.counts[block.name]
            share = counts / counts.sum().clamp_min(1)
            dropped = (~keep).nonzero().flatten().tolist()
            removed[block.name] = {"experts_before": block.num_experts, "dropped": dropped,
                                   "dropped_share": [float(share[i]) for i in dropped],
                                   "selections": counts.long().tolist()}
            _remap_records(task.model, block.name, keep)
            remove_experts(task.model, block, keep)
        changed = set_config_expert_count(task.model, old, blocks[0].num_experts)
        after = sum(param.numel() for param in task.model.parameters())
        task.removed.update({"blocks": removed, "params_removed": before - after, "params_before": before,
                             "config": changed})
        task.notes.extend(_summary(removed, before, after, changed))
        return {}


def _selected(blocks, include, exclude):
    import re

    def matches(patterns, name: str) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        return any(re.search(pattern, name) for pattern in patterns)

    return [block for block in blocks if (not include or matches(include, block.name))
            and not matches(exclude, block.name)]


def _remap_records(model: nn.Module, experts_name: str, keep: torch.Tensor) -> None:
    """Records of expert slices (``<experts>.<parameter>.<i>``) follow their expert's new index;
    those of dropped experts go."""
    new_index = (keep.long().cumsum(0) - 1).tolist()
    records = {}
    for name, record in get_records(model).items():
        head, _, tail = name.rpartition(".")
        if head.rpartition(".")[0] == experts_name and tail.isdigit():
            if not keep[int(tail)]:
                continue
            name = f"{head}.{new_index[int(tail)]}"
            record.name = name
        records[name] = record
    set_records(model, records)


def _summary(removed: dict[str, Any], before: int, after: int, changed: list[str]) -> list[str]:
    shares = sorted(share for block in removed.values() for share in block["dropped_share"])
    first = next(iter(removed.values()))
    kept = first["experts_before"] - len(first["dropped"])
    lines = [f"expert_drop: {len(first['dropped'])} of {first['experts_before']} experts dropped in each of "
             f"{len(removed)} MoE layers ({first['experts_before']} -> {kept}); parameters {before:,} -> {after:,} "
             f"(-{(before - after) / before:.1%})" + (f"; config {', '.join(changed)} = {kept}" if changed else "")]
    if shares:
        lines.append(f"dropped experts' share of router selections: median {shares[len(shares) // 2]:.1%}, max "
                     f"{shares[-1]:.1%} (an even share is {1 / first['experts_before']:.1%})")
    for name, block in removed.items():
        dropped = ", ".join(f"{index} ({share:.1%})" for index, share in zip(block["dropped"], block["dropped_share"],
                                                                              strict=True))
        lines.append(f"  {name}: dropped {dropped or 'none'}")
    return lines
