"""Which of a model's parameters were pruning targets, by kind, so that nothing is skipped silently.

Every parameter gets one kind:

* ``attention``  weights of attention modules inside the repeated blocks (q/k/v/o, T5's q/k/v/o);
* ``mlp``        every other matrix of the blocks (gate/up/down, fc1/fc2, wi/wo, a shared expert);
* ``experts``    routed expert weights: fused 3-D ``[experts, out, in]`` parameters or per-expert
                 linears, found by an ``experts`` component in the name;
* ``router``     the gate that picks experts (``mlp.gate``, ``router``, ``shared_expert_gate``);
* ``embeddings`` parameters of ``nn.Embedding`` modules and ``*embed*`` tensors outside the blocks;
* ``head``       matrices outside the blocks (``lm_head``, poolers, classifiers);
* ``other``      vectors: norms, biases, scales; also per-expert bias tables ``[experts, out]``
                 (gpt-oss's ``gate_up_proj_bias``): one bias vector per expert.

"Inside the blocks" means inside *any* repeated-block list (both stacks of an encoder-decoder),
not only the one a prune walks, so an unpruned encoder shows up as dense attention and MLP. A
model of several stacks also gets one line per stack (its attention, MLP and expert matrices).

:func:`model_coverage` matches the pruning records to parameters: a record named like a module
covers its ``.weight``; a record ``<parameter>.<i>`` covers expert ``i`` of a 3-D parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..records import LayerRecord
from .adapters import find_block_lists

__all__ = ["KINDS", "Coverage", "KindCoverage", "LeftOut", "model_coverage", "parameter_kinds"]

KINDS = ("attention", "mlp", "experts", "router", "embeddings", "head", "other")
# Kinds a prune is expected to cover: a large dense one of these earns a warning. Embeddings,
# heads and routers stay dense by design (pruning them is asked for explicitly).
PRUNED_KINDS = ("attention", "mlp", "experts")
LARGE_FRACTION = 0.01  # a left-out matrix holding at least this share of all parameters is listed

_EXPERTS = re.compile(r"(^|\.)experts(\.|$)")
_ROUTER = re.compile(r"(^|\.)(router|gate|shared_expert_gate)\.weight$|(^|\.)router(\.|$)")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_EMBEDDING_NAME = re.compile(r"embed", re.IGNORECASE)


@dataclass
class KindCoverage:
    """Parameters of one kind: how many there are, how many were targets, zeros among the targets."""

    params: int = 0
    targeted: int = 0
    zeros: float = 0.0

    @property
    def fraction(self) -> float:
        return self.targeted / self.params if self.params else 0.0

    @property
    def achieved(self) -> float | None:
        """Fraction of zeros among the targeted weights (None when nothing of this kind was a target)."""
        return self.zeros / self.targeted if self.targeted else None


@dataclass
class LeftOut:
    """A large matrix (2-D or 3-D) no record covers."""

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int


@dataclass
class Coverage:
    """Per-kind coverage of one model by its pruning records (see the module docstring)."""

    total_params: int
    kinds: dict[str, KindCoverage] = field(default_factory=dict)
    left_out: list[LeftOut] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # record names that name no parameter
    all_token_experts: list[str] = field(default_factory=list)  # experts no calibration token was routed to
    # per block list, when there are several (an encoder-decoder): its attention/mlp/expert matrices
    stacks: dict[str, KindCoverage] = field(default_factory=dict)

    @property
    def targeted(self) -> int:
        return sum(kind.targeted for kind in self.kinds.values())

    @property
    def warnings(self) -> list[str]:
        """One line per prunable kind (attention, mlp, experts) with large matrices left dense."""
        notes = []
        for kind in PRUNED_KINDS:
            missing = [item for item in self.left_out if item.kind == kind]
            if not missing:
                continue
            numel = sum(item.numel for item in missing)
            examples = ", ".join(item.name for item in missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            notes.append(f"{kind}: {len(missing)} large parameter(s) holding {numel / self.total_params:.1%} of the "
                         f"model's parameters were not pruned ({examples})")
        if self.all_token_experts:
            notes.append(f"{len(self.all_token_experts)} expert matrice(s) received no routed calibration token and "
                         f"were calibrated on all tokens instead (e.g. {self.all_token_experts[0]})")
        if self.unmatched:
            notes.append(f"{len(self.unmatched)} record(s) name no parameter of this model "
                         f"(e.g. {self.unmatched[0]}): they were not counted")
        return notes

    def lines(self) -> list[str]:
        """Short text: one ``kind targeted% of params, achieved%`` item per kind present."""
        items = []
        for kind, entry in self.kinds.items():
            if not entry.params or (kind == "other" and not entry.targeted):  # vectors: never prunable
                continue
            share = entry.params / self.total_params if self.total_params else 0.0
            achieved = f", {entry.achieved:.1%} zeros" if entry.achieved is not None else ""
            items.append(f"{kind} {entry.fraction:.0%} pruned ({share:.1%} of params{achieved})")
        for name, entry in self.stacks.items():
            achieved = f", {entry.achieved:.1%} zeros" if entry.achieved is not None else ""
            items.append(f"stack {name} {entry.fraction:.0%} pruned{achieved}")
        return items

    def to_json(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "targeted_params": self.targeted,
            "kinds": {kind: {"params": entry.params, "targeted": entry.targeted, "fraction": entry.fraction,
                             "achieved": entry.achieved} for kind, entry in self.kinds.items()},
            "left_out": [{"name": item.name, "kind": item.kind, "shape": list(item.shape), "params": item.numel}
                         for item in self.left_out],
            "unmatched": list(self.unmatched),
            "all_token_experts": list(self.all_token_experts),
            "stacks": {name: {"params": entry.params, "targeted": entry.targeted, "fraction": entry.fraction,
                              "achieved": entry.achieved} for name, entry in self.stacks.items()},
            "warnings": self.warnings,
        }


def _block_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of the outermost repeated-block lists (every stack of an encoder-decoder)."""
    names = [name for name, _ in find_block_lists(model)]
    outer = [name for name in names if not any(name != other and name.startswith(f"{other}.") for other in names)]
    return [f"{name}." if name else "" for name in outer]


def _has_expert_sibling(model: nn.Module, name: str) -> bool:
    """True when the module holding parameter ``name`` sits next to an experts module (a router)."""
    parts = name.split(".")
    parent = ".".join(parts[:-2])
    try:
        siblings = model.get_submodule(parent).named_children()
    except AttributeError:
        return False
    return any("expert" in child for child, _ in siblings)


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """{parameter name: kind} for every unique parameter (see :data:`KINDS` and the module docstring)."""
    embedding_params = {id(param) for module in model.modules() if isinstance(module, nn.Embedding)
                        for param in module.parameters(recurse=False)}
    prefixes = _block_prefixes(model)
    kinds = {}
    for name, param in model.named_parameters():
        in_blocks = not prefixes or any(name.startswith(prefix) for prefix in prefixes)
        if id(param) in embedding_params:
            kind = "embeddings"
        elif param.ndim < 2 or name.endswith("bias"):
            kind = "other"
        elif not in_blocks:
            kind = "embeddings" if _EMBEDDING_NAME.search(name) else "head"
        elif _EXPERTS.search(name):
            kind = "experts"
        elif _ROUTER.search(name) and ("router" in name or _has_expert_sibling(model, name)):
            kind = "router"
        elif _ATTENTION.search(name):
            kind = "attention"
        else:
            kind = "mlp"
        kinds[name] = kind
    return kinds


def _resolve(record_name: str, names: Mapping[str, str]) -> tuple[str, bool] | None:
    """(parameter name, is a slice) a record covers; ``names`` maps every alias to its unique name."""
    if f"{record_name}.weight" in names:
        return names[f"{record_name}.weight"], False
    if record_name in names:
        return names[record_name], False
    head, _, tail = record_name.rpartition(".")
    if tail.isdigit() and head in names:
        return names[head], True
    return None


def model_coverage(model: nn.Module, records: Mapping[str, LayerRecord]) -> Coverage:
    """How much of each kind of parameter ``records`` pruned, and which large matrices stayed dense."""
    kinds = parameter_kinds(model)
    unique = dict(model.named_parameters())
    # tied weights (lm_head = embed_tokens) are listed once by named_parameters: map aliases too
    by_id = {id(param): name for name, param in unique.items()}
    aliases = {name: by_id[id(param)] for name, param in model.named_parameters(remove_duplicate=False)}
    total = sum(param.numel() for param in unique.values())
    coverage = Coverage(total_params=total, kinds={kind: KindCoverage() for kind in KINDS})
    for name, param in unique.items():
        coverage.kinds[kinds[name]].params += param.numel()
    covered: dict[str, int] = {}
    zeros_of: dict[str, float] = {}
    for record_name, record in records.items():
        resolved = _resolve(record_name, aliases)
        if resolved is None:
            coverage.unmatched.append(record_name)
            continue
        param_name = resolved[0]
        numel = math.prod(record.shape)
        covered[param_name] = covered.get(param_name, 0) + numel
        zeros_of[param_name] = zeros_of.get(param_name, 0.0) + record.achieved * numel
        entry = coverage.kinds[kinds[param_name]]
        entry.targeted += numel
        entry.zeros += record.achieved * numel
    from .experts import all_token_experts

    coverage.all_token_experts = [name for name in all_token_experts(model) if name in records]
    for name, param in unique.items():
        if param.ndim in (2, 3) and name not in covered and param.numel() >= LARGE_FRACTION * total:
            coverage.left_out.append(LeftOut(name, kinds[name], tuple(param.shape), param.numel()))
    prefixes = _block_prefixes(model)
    if len(prefixes) > 1:
        coverage.stacks = {prefix.rstrip("."): KindCoverage() for prefix in prefixes}
        for name, param in unique.items():
            prefix = next((prefix for prefix in prefixes if name.startswith(prefix)), None)
            if prefix is None or kinds[name] not in PRUNED_KINDS:
                continue
            entry = coverage.stacks[prefix.rstrip(".")]
            entry.params += param.numel()
            entry.targeted += covered.get(name, 0)
            entry.zeros += zeros_of.get(name, 0.0)
    return coverage
