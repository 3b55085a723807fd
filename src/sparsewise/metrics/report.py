"""What the weights really hold: exact zero counts and N:M pattern checks per prunable layer;
and, for a saved model, how it was made (``sparsewise report DIR``).

sparsity = zeros / params, counted on the weight itself (exact zeros, biases excluded); an N:M
layer passes when every group of M consecutive inputs of every row holds at most N nonzeros.

:func:`checkpoint_report` adds the checkpoint's provenance: the prune job's settings kept in the
manifest (``extra["job"]``, written by ``sparsewise prune --out``), else what the records show
(method, pattern, per-layer targets, calibration tokens, recorded errors), "not recorded" for the
rest; the size on disk vs dense; text summary, per-layer table, JSON and a self-contained HTML page.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
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


# ----------------------------------------------------------------------------------------------
# checkpoint report: how a saved model was made (its manifest) and what its weights hold

NOT_RECORDED = "not recorded"
# Per-layer error figures that records may hold, the first found wins: (path in record.info, label)
ERROR_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("recon_error",), "SparseGPT reconstruction error ||(W - W')X||^2"),
    (("final_loss",), "ARMOR proxy loss (final)"),
    (("refine", "mean_abs_error_after"), "DSnoT mean |expected output error| (after)"),
)
SAME_SPARSITY = 1e-3  # layers closer than this (0.1 point) are "all at the same sparsity"
_DATE_KEYS = ("saved_at", "created_at", "created", "date", "timestamp")


def layer_depth(name: str) -> int | None:
    """Block index of a layer: the first all-digit component of its name (``layers.3.mlp.up`` -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_kind(name: str) -> str:
    """What a layer is inside its block: the name after the block index (``self_attn.q_proj``,
    ``attention.output.dense``); a layer outside the blocks (``lm_head``) is its own kind; a bare
    ``layers.3`` is of kind ``layers``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[-1].isdigit() and not parts[-2].isdigit() and any(p.isdigit() for p in parts[:-2]):
        parts = parts[:-1]  # expert i of a fused parameter (experts.gate_up_proj.3): one kind for all experts
    for index, part in enumerate(parts):
        if part.isdigit():
            rest = parts[index + 1:]
            return ".".join(rest) if rest else ".".join(parts[:index]) or name
    return name


def kind_labels(kinds: list[str]) -> dict[str, str]:
    """Short display names: the last component of each kind where that stays unambiguous."""
    last = [kind.rsplit(".", 1)[-1] for kind in kinds]
    return {kind: short if last.count(short) == 1 else kind for kind, short in zip(kinds, last, strict=True)}


def record_error(info: dict[str, Any]) -> tuple[str, float] | None:
    """(label, value) of the per-layer error a record's info holds, or None."""
    for path, label in ERROR_KEYS:
        value: Any = info
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return label, float(value)
    return None


def _pct(value: float | None) -> str:
    return NOT_RECORDED if value is None else f"{value:.2%}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 / 10 else f"{nbytes / 1024:.1f} KiB"


def _options(options: Any) -> str:
    if not options:
        return ""
    if isinstance(options, dict):
        return " (" + ", ".join(f"{key}={value}" for key, value in options.items()) + ")"
    return f" ({options})"


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2%}" if math.isclose(low, high, abs_tol=5e-5) else f"{low:.2%} - {high:.2%}"


def _weighted(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(weight for _, weight in pairs)
    return sum(value * weight for value, weight in pairs) / total if total else None


@dataclass
class CheckpointReport:
    """One saved model: its provenance (manifest, job settings, records) and its exact zeros."""

    path: str
    format: str  # "sparsewise" or "hf-dense"
    sparsity: SparsityReport
    size: dict[str, Any]
    records: dict[str, LayerRecord] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # sparsewise.json; for hf-dense: config.json facts
    file_dates: str | None = None  # modification time of the manifest / weights, a hint when no date is recorded
    coverage: Any = None  # models.coverage.Coverage of the records over the model's parameters (None: no records)

    # ------------------------------------------------------------------ facts
    @property
    def job(self) -> dict[str, Any] | None:
        """The prune job's settings (``sparsewise prune --out``), None for models saved from Python."""
        job = (self.manifest.get("extra") or {}).get("job")
        return job if isinstance(job, dict) else None

    def errors(self) -> dict[str, tuple[str, float]]:
        """{layer: (label, value)} of the per-layer errors the records hold (one label: the most common)."""
        found = {name: error for name, record in self.records.items()
                 if (error := record_error(record.info)) is not None}
        if not found:
            return {}
        labels = [label for label, _ in found.values()]
        common = max(set(labels), key=labels.count)
        return {name: error for name, error in found.items() if error[0] == common}

    def block_reconstruction(self) -> dict[int, dict[str, Any]]:
        """{block index: reconstruction info} where blocks were refit after pruning."""
        blocks: dict[int, dict[str, Any]] = {}
        for name, record in self.records.items():
            info = record.info.get("reconstruct")
            depth = layer_depth(name)
            if isinstance(info, dict) and depth is not None:
                blocks.setdefault(depth, info)
        return dict(sorted(blocks.items()))

    def target_sparsity(self) -> tuple[float | None, str]:
        """Asked-for sparsity and where it comes from (job, N:M pattern, or the records)."""
        job = self.job
        if job is not None:
            if isinstance(job.get("sparsity"), (int, float)):
                return float(job["sparsity"]), "job"
            pattern = str(job.get("pattern", ""))
            with contextlib.suppress(Exception):
                parsed = Pattern.parse(pattern)
                if parsed.kind == "nm":
                    return 1 - parsed.n / parsed.m, f"fixed by {pattern}"
        pairs = [(record.sparsity, row.params) for row in self.sparsity.rows
                 if (record := self.records.get(row.name)) is not None]
        value = _weighted(pairs)
        return value, "records" if value is not None else NOT_RECORDED

    def provenance(self) -> list[tuple[str, str]]:
        """(label, text) lines saying how the model was made; missing facts read "not recorded"."""
        job, manifest, records = self.job or {}, self.manifest, list(self.records.values())
        from_records = " (from the records)"
        config = manifest.get("config") or {}
        model_class = manifest.get("model_class") or next(iter(config.get("architectures") or []), None)
        source = job.get("model") or config.get("_name_or_path") or None
        model = f"{source}" if source else NOT_RECORDED
        shape = [model_class] if model_class else []
        blocks = config.get("num_hidden_layers") or config.get("n_layer")
        hidden = config.get("hidden_size") or config.get("n_embd")
        shape += [f"{blocks} blocks"] * bool(blocks) + [f"hidden {hidden}"] * bool(hidden)
        if shape:
            model += f" ({', '.join(map(str, shape))})"
        if not job:
            model += "; saved from Python, no prune job recorded" if self.format == "sparsewise" else ""
        lines = [("model", model)]

        methods = sorted({record.method for record in records})
        method = job.get("method") or (", ".join(methods) + from_records if methods else NOT_RECORDED)
        lines.append(("method", f"{method}{_options(job.get('method_options'))}"))
        patterns = sorted({record.pattern for record in records})
        pattern = job.get("pattern") or (", ".join(patterns) + from_records if patterns else NOT_RECORDED)
        lines.append(("pattern", str(pattern)))

        target, origin = self.target_sparsity()
        per_layer = [record.sparsity for record in records]
        sparsity = f"target {_pct(target)}" + (f" ({origin})" if target is not None and origin != "job" else "")
        if per_layer and not math.isclose(min(per_layer), max(per_layer), abs_tol=5e-5):
            sparsity += f", per-layer targets {_span(per_layer)}"
        sparsity += f"; achieved {self.sparsity.sparsity:.2%} (exact zeros, {len(self.sparsity.rows)} layers)"
        lines.append(("sparsity", sparsity))

        if job:
            allocation = f"{job.get('allocation') or 'uniform'}{_options(job.get('allocation_options'))}"
            refine = f"{job['refine']}{_options(job.get('refine_options'))}" if job.get("refine") else "none"
            reconstruct = f"yes{_options(job.get('reconstruct_options'))}" if job.get("reconstruct") else "no"
        elif records:  # no job: what the records show, the allocator's name is not recorded
            uniform = math.isclose(min(per_layer), max(per_layer), abs_tol=5e-5)
            allocation = f"{NOT_RECORDED}; the records' per-layer targets " + (
                "are equal (uniform)" if uniform else f"differ ({_span(per_layer)}): non-uniform")
            refine = "yes" + from_records if any("refine" in record.info for record in records) \
                else f"{NOT_RECORDED}; none in the records"
            reconstruct = "yes" + from_records if any("reconstruct" in record.info for record in records) \
                else f"{NOT_RECORDED}; none in the records"
        else:
            allocation = refine = reconstruct = NOT_RECORDED
        blocks = self.block_reconstruction()
        if blocks:
            before = [info.get("loss_before") for info in blocks.values()]
            after = [info.get("loss_after") for info in blocks.values()]
            if all(isinstance(value, (int, float)) for value in before + after):
                reconstruct += (f"; {len(blocks)} blocks refit, mean relative error {sum(before) / len(before):.4g}"
                                f" -> {sum(after) / len(after):.4g}")
        lines += [("allocation", allocation), ("refine", refine), ("reconstruct", reconstruct)]

        tokens = [record.info["tokens"] for record in records if isinstance(record.info.get("tokens"), int)]
        seen = f"; {max(tokens):,} tokens seen per layer" if tokens else ""
        if job.get("calib") == "self":
            calibration = (f"self-generated, {job.get('self_n', '?')} x {job.get('self_seqlen', '?')} tokens, "
                           f"seed {job.get('seed', '?')}")
        elif job.get("calib"):
            calibration = (f"{job['calib']}, {job.get('calib_n', '?')} x {job.get('calib_seqlen', '?')} tokens, "
                           f"seed {job.get('seed', '?')}")
        else:
            calibration = NOT_RECORDED
        if job and not tokens and self._data_free(job):
            seen = f"; unused ({job.get('method')} needs no data)"
        lines.append(("calibration", calibration + seen))

        extra = manifest.get("extra") or {}
        date = next((str(source[key]) for source in (manifest, extra, job) for key in _DATE_KEYS
                     if source.get(key)), None)
        lines.append(("date", date or NOT_RECORDED + (f" (files dated {self.file_dates})" if self.file_dates else "")))
        versions = [f"sparsewise {manifest.get('sparsewise_version') or NOT_RECORDED}"]
        versions += [f"{lib} {manifest[f'{lib}_version']}" for lib in ("torch", "transformers")
                     if manifest.get(f"{lib}_version")]
        lines.append(("versions", ", ".join(versions)))
        dtype = self._stored_dtype()
        lines.append(("format", self.format + (f", {dtype}" if dtype else "")))
        others = {key: value for key, value in extra.items() if key != "job" and key not in _DATE_KEYS}
        if others:
            lines.append(("extra", ", ".join(f"{key}={value}" for key, value in others.items())))
        return lines

    @staticmethod
    def _data_free(job: dict[str, Any]) -> bool:
        try:
            from ..methods import get_method

            needs = get_method(str(job.get("method"))).needs
        except Exception:  # an unknown or renamed method: say nothing
            return False
        return not needs and not job.get("refine") and not job.get("reconstruct") \
            and str(job.get("allocation") or "uniform") in ("uniform", "er", "erk")

    def _stored_dtype(self) -> str | None:
        counts: dict[str, int] = defaultdict(int)
        for entry in (self.manifest.get("tensors") or {}).values():
            if isinstance(entry, dict) and "float" in str(entry.get("dtype", "")):
                counts[str(entry["dtype"])] += math.prod(entry.get("shape") or [0])
        return max(counts, key=counts.get) if counts else None

    def pattern_check(self) -> str:
        rows = self.sparsity.rows
        nm = [row for row in rows if row.pattern not in (NO_PATTERN, "") and _is_nm(row.pattern)]
        bad = [row.name for row in rows if not row.pattern_ok]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            return f"VIOLATIONS in {len(bad)} layer(s): {shown} (see --layers)"
        if not nm:
            return "no N:M pattern recorded: nothing to check"
        patterns = ", ".join(sorted({row.pattern for row in nm}))
        return f"every N:M group valid ({len(nm)} layers checked against {patterns})"

    def size_lines(self) -> list[str]:
        """Bytes on disk vs the dense equivalent; then the compressed (pruned) tensors alone."""
        size = self.size
        if self.format == "hf-dense":
            return [f"{_mib(size['weights_bytes'])} on disk, every tensor stored dense (hf-dense format)"]
        lines = [f"{_mib(size['weights_bytes'])} on disk vs {_mib(size['dense_bytes'])} dense "
                 f"({size['weights_bytes'] / max(size['dense_bytes'], 1):.3f}x)"]
        if size.get("pruned_dense_bytes"):
            counts = size.get("storage_counts", {})
            lines.append(f"pruned tensors {_mib(size['pruned_stored_bytes'])} vs {_mib(size['pruned_dense_bytes'])} "
                         f"({size['pruned_ratio']:.3f}x): {counts.get('nm', 0)} N:M, {counts.get('bitmask', 0)} "
                         "bitmask")
        else:
            lines.append("no tensor stored compressed")
        return lines

    def kinds(self) -> dict[str, dict[str, Any]]:
        """Per layer kind (q_proj, mlp.down_proj, ...): layers, params, zeros, sparsity, in depth order."""
        groups: dict[str, dict[str, Any]] = {}
        for row in self.sparsity.rows:
            group = groups.setdefault(layer_kind(row.name), {"layers": 0, "params": 0, "zeros": 0})
            group["layers"] += 1
            group["params"] += row.params
            group["zeros"] += row.zeros
        for group in groups.values():
            group["sparsity"] = group["zeros"] / group["params"] if group["params"] else 0.0
        return groups

    def extremes(self, count: int = 3) -> tuple[list[LayerSparsity], list[LayerSparsity]]:
        """The ``count`` most and least sparse layers (empty when all layers lie within 0.1 point)."""
        rows = self.sparsity.rows
        if len(rows) < 2 or max(r.sparsity for r in rows) - min(r.sparsity for r in rows) < SAME_SPARSITY:
            return [], []
        ordered = sorted(rows, key=lambda row: row.sparsity)
        count = min(count, len(rows) // 2)
        return ordered[::-1][:count], ordered[:count]

    # ------------------------------------------------------------------ text
    def summary(self, count: int = 3) -> str:
        """One screen: provenance, totals, size vs dense, N:M check, most/least sparse layers."""
        rule = "-" * 72
        report = self.sparsity
        lines = [rule, f"sparsewise report | {self.path}", rule]
        lines += [f"{label:<12} {text}" for label, text in self.provenance()]
        lines.append("")
        lines.append(f"{'layers':<12} {len(report.rows)} layers, {report.params:,} weights, {report.zeros:,} zeros "
                     f"({report.sparsity:.2%})")
        kinds = self.kinds()
        labels = kind_labels(list(kinds))
        lines += _wrapped("by kind", [f"{labels[kind]} {group['sparsity']:.1%}" for kind, group in kinds.items()],
                          sep="  ")
        lines += [f"{'size' if index == 0 else '':<12} {text}" for index, text in enumerate(self.size_lines())]
        lines.append(f"{'N:M check':<12} {self.pattern_check()}")
        if self.coverage is not None:
            lines += _wrapped("coverage", self.coverage.lines(), sep="; ")
            lines += [f"{'warning':<12} {note}" for note in self.coverage.warnings]
        most, least = self.extremes(count)
        if most:
            lines += _wrapped("most sparse", [f"{row.name} {row.sparsity:.2%}" for row in most])
            lines += _wrapped("least sparse", [f"{row.name} {row.sparsity:.2%}" for row in least])
        elif report.rows:
            span = _span([row.sparsity for row in report.rows])
            lines.append(f"{'spread':<12} every layer {'within' if ' - ' in span else 'at'} {span}")
        errors = self.errors()
        if errors:
            label = next(iter(errors.values()))[0]
            worst = sorted(errors.items(), key=lambda item: -item[1][1])[:count]
            lines += _wrapped("top error", [f"{name} {value:.4g}" for name, (_, value) in worst])
            lines.append(f"{'':<12} ({label}; {len(errors)} layers hold one)")
        lines.append(rule)
        lines.append("per-layer table: --layers | plot: --plot FILE.png | web page: --html FILE.html")
        return "\n".join(lines)

    def layer_rows(self) -> list[dict[str, Any]]:
        errors = self.errors()
        rows = []
        for row in self.sparsity.rows:
            record = self.records.get(row.name)
            rows.append({"layer": row.name, "shape": f"{row.shape[0]}x{row.shape[1]}", "params": row.params,
                         "zeros": row.zeros, "sparsity": row.sparsity,
                         "target": record.sparsity if record is not None else None,
                         "pattern": row.pattern, "ok": row.pattern_ok,
                         "error": errors[row.name][1] if row.name in errors else None})
        return rows

    def layers_table(self, max_rows: int | None = None) -> str:
        """Every layer (first ``max_rows``): shape, zeros, achieved vs target, pattern check, error."""
        rows = self.layer_rows()
        shown = rows if max_rows is None else rows[:max_rows]
        with_error = any(row["error"] is not None for row in rows)
        header = ("layer", "shape", "params", "zeros", "sparsity", "target", "pattern", "ok") + \
            (("error",) if with_error else ())
        lines = [header] + [
            (row["layer"], row["shape"], f"{row['params']:,}", f"{row['zeros']:,}", f"{row['sparsity']:.2%}",
             "-" if row["target"] is None else f"{row['target']:.2%}", row["pattern"], "yes" if row["ok"] else "NO")
            + ((("-" if row["error"] is None else f"{row['error']:.4g}"),) if with_error else ())
            for row in shown
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = ["  ".join(cell.ljust(width) if i in (0, 1, 6) else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(line, widths, strict=True))).rstrip()
               for line in lines]
        if len(shown) < len(rows):
            out.append(f"... {len(rows) - len(shown)} more layers (drop --max-rows to see all)")
        if with_error:
            out.append(f"error: {next(iter(self.errors().values()))[0]}")
        kinds = self.kinds()
        if kinds:
            out.append("")
            width = max(len(kind) for kind in kinds)
            for kind, group in kinds.items():
                out.append(f"{kind.ljust(width)}  {group['layers']:>4} layers  {group['params']:>14,} params  "
                           f"{group['sparsity']:.2%} zeros")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        target, origin = self.target_sparsity()
        return {
            "path": self.path,
            "format": self.format,
            "sparsity": self.sparsity.to_json(),
            "size": self.size,
            "provenance": {
                **{label: text for label, text in self.provenance()},
                "job": self.job,
                "target_sparsity": target,
                "target_origin": origin,
                "sparsewise_version": self.manifest.get("sparsewise_version"),
            },
            "errors": {name: {"label": label, "value": value} for name, (label, value) in self.errors().items()},
            "pattern_check": self.pattern_check(),
            "coverage": self.coverage.to_json() if self.coverage is not None else None,
        }

    # ------------------------------------------------------------------ html
    def to_html(self, plot_png: bytes | None = None, layers_open: bool = False,
                extra_sections: list[tuple[str, str]] | None = None) -> str:
        """A self-contained page: the summary tables, the plot as a base64 PNG, the per-layer table
        (folded unless ``layers_open``). No external assets, no script."""
        from html import escape

        report = self.sparsity
        sections: list[tuple[str, str]] = [("How it was made", _kv_table(self.provenance()))]
        kinds = self.kinds()
        labels = kind_labels(list(kinds))
        facts = [("layers", f"{len(report.rows)} layers, {report.params:,} weights, {report.zeros:,} zeros "
                            f"({report.sparsity:.2%})"),
                 ("size", "; ".join(self.size_lines())), ("N:M check", self.pattern_check())]
        if self.coverage is not None:
            facts.append(("coverage", "; ".join(self.coverage.lines())))
            facts += [("warning", note) for note in self.coverage.warnings]
        most, least = self.extremes()
        if most:
            facts += [("most sparse", ", ".join(f"{row.name} {row.sparsity:.2%}" for row in most)),
                      ("least sparse", ", ".join(f"{row.name} {row.sparsity:.2%}" for row in least))]
        errors = self.errors()
        if errors:
            worst = sorted(errors.items(), key=lambda item: -item[1][1])[:3]
            facts.append(("top error", ", ".join(f"{name} {value:.4g}" for name, (_, value) in worst)
                          + f" ({next(iter(errors.values()))[0]}; {len(errors)} layers hold one)"))
        summary = _kv_table(facts) + _table(
            ("kind", "layers", "params", "sparsity"),
            [(labels[kind], str(group["layers"]), f"{group['params']:,}", f"{group['sparsity']:.2%}")
             for kind, group in kinds.items()], css="kinds")
        sections.append(("Summary", summary))
        if plot_png:
            sections.append(("Per-layer sparsity and error along depth", _img(plot_png, "per-layer plot")))
        rows = self.layer_rows()
        with_error = any(row["error"] is not None for row in rows)
        table = _table(
            ("layer", "shape", "params", "zeros", "sparsity", "target", "pattern", "ok") + (("error",) * with_error),
            [(row["layer"], row["shape"], f"{row['params']:,}", f"{row['zeros']:,}", f"{row['sparsity']:.2%}",
              "-" if row["target"] is None else f"{row['target']:.2%}", row["pattern"], "yes" if row["ok"] else "NO")
             + (("-" if row["error"] is None else f"{row['error']:.4g}",) * with_error) for row in rows],
            css="layers")
        note = f"<p>error: {escape(next(iter(self.errors().values()))[0])}</p>" if with_error else ""
        sections.append(("Layers", f"<details{' open' if layers_open else ''}><summary>{len(rows)} layers"
                                   f"</summary>{table}{note}</details>"))
        if self.job:
            sections.append(("Job settings", "<pre>" + escape(json.dumps(self.job, indent=2, default=str)) + "</pre>"))
        sections += extra_sections or []
        return html_page(f"sparsewise report: {self.path}", sections)


def _wrapped(label: str, items: list[str], width: int = 100, sep: str = ", ") -> list[str]:
    """``label`` then the items joined by ``sep``, continued on indented lines past ``width``."""
    lines, current = [], ""
    for item in items:
        if current and 13 + len(current) + len(sep) + len(item) > width:
            lines.append(current + sep.rstrip())
            current = item
        else:
            current = f"{current}{sep}{item}" if current else item
    lines.append(current)
    return [f"{label if index == 0 else '':<12} {line}" for index, line in enumerate(lines)]


def _is_nm(pattern: str) -> bool:
    try:
        return Pattern.parse(pattern).kind == "nm"
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# html pieces (self-contained: inline CSS, images as data: URIs)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{padding:.2em .7em;border-bottom:1px solid #eee;text-align:right;vertical-align:top}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
table.kv td:first-child{font-weight:600;white-space:nowrap}table.kv td{text-align:left}
table.layers td:nth-child(2),table.layers td:nth-child(7){text-align:left}
td.bad{color:#b00;font-weight:600}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
img{max-width:100%;height:auto}summary{cursor:pointer}
"""


def _kv_table(pairs: list[tuple[str, str]]) -> str:
    from html import escape

    body = "".join(f"<tr><td>{escape(label)}</td><td>{escape(text)}</td></tr>" for label, text in pairs)
    return f'<table class="kv">{body}</table>'


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], css: str = "") -> str:
    from html import escape

    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f'<td{" class=bad" if cell == "NO" else ""}>{escape(cell)}</td>' for cell in row)
                   + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    import base64

    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def text_section(text: str, png: bytes | None = None, alt: str = "plot") -> str:
    """An html fragment: preformatted text and an optional embedded PNG (e.g. a training log)."""
    from html import escape

    return f"<pre>{escape(text)}</pre>" + (_img(png, alt) if png else "")


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A whole page from (heading, html fragment) sections."""
    from html import escape

    from .. import __version__

    body = "".join(f"<h2>{escape(heading)}</h2>\n{fragment}\n" for heading, fragment in sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{escape(title)}</h1>\n{body}"
            f'<p style="color:#888;font-size:.8em">written by sparsewise {escape(__version__)}</p></body></html>\n')


def checkpoint_report(path: str | Path) -> CheckpointReport:
    """Load a saved model (sparsewise checkpoint or hf-dense folder) and report it."""
    from ..formats import checkpoint_size
    from ..formats.checkpoint import MANIFEST_NAME, RECORDS_NAME, WEIGHTS_NAME
    from ..models import load_model
    from ..models.coverage import model_coverage

    directory = Path(path).expanduser()
    model, _ = load_model(str(directory))
    manifest: dict[str, Any] = {}
    records = dict(get_records(model))
    if (directory / MANIFEST_NAME).is_file():
        fmt = "sparsewise"
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))  # load() just verified it
        dated = directory / MANIFEST_NAME
    else:
        fmt = "hf-dense"
        config_path = directory / "config.json"
        with contextlib.suppress(OSError, ValueError):
            manifest["config"] = json.loads(config_path.read_text(encoding="utf-8"))
        records_path = directory / RECORDS_NAME
        if not records and records_path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                saved = json.loads(records_path.read_text(encoding="utf-8")).get("records", {})
                records = _match_names(model, {name: LayerRecord.from_json(data) for name, data in saved.items()})
        dated = next(iter(sorted(directory.glob("*.safetensors"))), config_path)
    try:
        report = sparsity_report(model, records=records or None)
    except UnsupportedModelError:  # records of an hf-dense folder that do not fit: count every layer
        records = {}
        report = sparsity_report(model)
    file_dates = None
    with contextlib.suppress(OSError):
        file_dates = datetime.fromtimestamp((dated if dated.exists() else directory / WEIGHTS_NAME).stat().st_mtime) \
            .strftime("%Y-%m-%d %H:%M")
    coverage = model_coverage(model, records) if records else None
    return CheckpointReport(path=str(path), format=fmt, sparsity=report, size=checkpoint_size(directory),
                            records=records, manifest=manifest, file_dates=file_dates, coverage=coverage)


def _match_names(model: torch.nn.Module, records: dict[str, LayerRecord]) -> dict[str, LayerRecord]:
    """Records of a model with a head, read onto its bare base model (``transformer.h.0...`` -> ``h.0...``)."""
    modules = dict(model.named_modules())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    out = {}
    for name, record in records.items():
        if name not in modules and name.startswith(prefix) and name[len(prefix):] in modules:
            name = name[len(prefix):]
            record = replace(record, name=name)
        out[name] = record
    return out


def write_html(path: str | Path, page: str) -> Path:
    """Write a page from :func:`html_page` / :meth:`CheckpointReport.to_html`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
