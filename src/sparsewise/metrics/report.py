"""What the weights really hold: exact zero counts and N:M pattern checks per prunable layer.

sparsity = zeros / params, counted on the weight itself (exact zeros, biases excluded); an N:M
layer passes when every group of M consecutive inputs of every row holds at most N nonzeros.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..patterns import Pattern, check_mask
from ..records import LayerRecord, get_records

NO_PATTERN = "-"  # layer without a record: nothing was asked of it


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, int]  # [out, in]
    params: int
    zeros: int
    sparsity: float
    pattern: str
    pattern_ok: bool

    @property
    def layer_type(self) -> str:
        """Last name component (q_proj, down_proj, fc1, ...), the grouping key of the report."""
        return self.name.rsplit(".", 1)[-1]


@dataclass
class SparsityReport:
    rows: list[LayerSparsity] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def zeros(self) -> int:
        return sum(row.zeros for row in self.rows)

    @property
    def sparsity(self) -> float:
        """Zero fraction over all counted weights (params-weighted, not a mean of layer ratios)."""
        return self.zeros / self.params if self.params else 0.0

    @property
    def all_patterns_ok(self) -> bool:
        return all(row.pattern_ok for row in self.rows)

    def by_type(self) -> dict[str, dict[str, Any]]:
        """Per layer type: number of layers, params, zeros and their zero fraction."""
        groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"layers": 0, "params": 0, "zeros": 0})
        for row in self.rows:
            group = groups[row.layer_type]
            group["layers"] += 1
            group["params"] += row.params
            group["zeros"] += row.zeros
        for group in groups.values():
            group["sparsity"] = group["zeros"] / group["params"] if group["params"] else 0.0
        return dict(groups)

    def table(self, max_rows: int | None = None) -> str:
        """Aligned text: one line per layer (first ``max_rows``), a per-type summary, totals."""
        header = ("layer", "shape", "params", "zeros", "sparsity", "pattern", "ok")
        shown = self.rows if max_rows is None else self.rows[:max_rows]
        lines = [header] + [
            (row.name, f"{row.shape[0]}x{row.shape[1]}", f"{row.params:,}", f"{row.zeros:,}",
             f"{row.sparsity:.2%}", row.pattern, "yes" if row.pattern_ok else "NO")
            for row in shown
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = ["  ".join(cell.ljust(width) if i in (0, 1, 5) else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip()
               for line in lines]
        if len(shown) < len(self.rows):
            out.append(f"... {len(self.rows) - len(shown)} more layers")
        types = self.by_type()
        if types:
            out.append("")
            name_width = max(len(name) for name in types)
            for name, group in types.items():
                out.append(f"{name.ljust(name_width)}  {group['layers']:>4} layers  {group['params']:>14,} params  "
                           f"{group['sparsity']:.2%} zeros")
        status = "all N:M patterns hold" if self.all_patterns_ok else (
            f"{sum(not row.pattern_ok for row in self.rows)} layer(s) VIOLATE their N:M pattern")
        out.append("")
        out.append(f"total: {len(self.rows)} layers, {self.params:,} params, {self.zeros:,} zeros, "
                   f"sparsity {self.sparsity:.2%}; {status}")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [{**asdict(row), "shape": list(row.shape)} for row in self.rows],
            "by_type": self.by_type(),
            "params": self.params,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "all_patterns_ok": self.all_patterns_ok,
        }

    def __str__(self) -> str:
        return self.table(max_rows=20)


def layer_sparsity(name: str, weight: torch.Tensor, pattern: str = NO_PATTERN) -> LayerSparsity:
    """One report row from a [out, in] weight; ``pattern`` "N:M" is verified group by group."""
    nonzero = weight.detach() != 0
    params = nonzero.numel()
    zeros = params - int(nonzero.sum())
    pattern_ok = True
    if pattern != NO_PATTERN:
        parsed = Pattern.parse(pattern)
        pattern_ok = check_mask(nonzero.reshape(nonzero.shape[0], -1), parsed)
    return LayerSparsity(name=name, shape=(int(weight.shape[0]), int(weight.shape[1])), params=params, zeros=zeros,
                         sparsity=zeros / params if params else 0.0, pattern=pattern, pattern_ok=pattern_ok)


def sparsity_report(model: torch.nn.Module, adapter: Any = None,
                    records: dict[str, LayerRecord] | None = None) -> SparsityReport:
    """Zero counts of every prunable layer (the adapter's) or of every recorded layer.

    ``records`` defaults to those attached to the model by pruning/loading; when there are any,
    exactly the recorded layers are reported with their patterns, otherwise all prunable layers
    of ``adapter`` (default ``ModelAdapter(model)``) with pattern "-".
    """
    from ..models import ModelAdapter, PrunableLayer, is_prunable_module

    records = dict(records) if records is not None else dict(get_records(model))
    if not records:
        adapter = adapter if adapter is not None else ModelAdapter(model)
        return SparsityReport([layer_sparsity(name, layer.get_weight())
                               for name, layer in adapter.prunable_layers().items()])

    known: dict[str, Any] = {}
    try:
        # targets="all" so recorded extras such as lm_head are found too
        known = (adapter if adapter is not None else ModelAdapter(model, targets="all")).prunable_layers()
    except UnsupportedModelError:
        pass  # a plain module without blocks: look recorded names up directly
    rows = []
    for name, record in records.items():
        layer = known.get(name)
        if layer is None:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(
                    f"record {name!r} names no submodule of {type(model).__name__}: the records do not belong "
                    "to this model (load the model they were saved with)."
                ) from None
            if not is_prunable_module(module):
                raise UnsupportedModelError(f"record {name!r} names a {type(module).__name__}, not a Linear/Conv1D.")
            layer = PrunableLayer(name=name, module=module)
        rows.append(layer_sparsity(name, layer.get_weight(), record.pattern))
    return SparsityReport(rows)
