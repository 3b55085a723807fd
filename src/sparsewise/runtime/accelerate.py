"""Swap the pruned layers of a model for sparse ones where that is faster, and say so.

``accelerate(model)`` packs every pruned layer and measures each distinct layer against the
dense one at the row counts you serve (``rows``, default batch 1): a layer stays sparse only
where the sparse kernel beats dense at every one of them; elsewhere the dense layer is kept (the
form that wins) and the report says why. On CUDA: ``nn.Linear`` -> :class:`SparseLinear` (CUDA
C++ decode kernels; the measurements become the dispatch table, cached on disk, that serves
each call by its row count). On the CPU: ``nn.Linear``, transformers ``Conv1D`` and 1x1
``nn.Conv2d`` -> :class:`~.cpu_linear.CpuSparseLinear` (C++ CSR kernel, Elsen et al. 2020).

Mixture-of-experts: the expert matrices of fused 3-D parameters (records
``<experts>.<parameter>.<i>``) stay in masked dense form, run by the model's own experts forward;
the report lists them as left dense and says so (a grouped sparse expert GEMM may come later).
Per-expert ``nn.Linear`` lists are ordinary linears and are swapped like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapters import _embedding_weight_ids, _is_conv1d
from ..records import get_records
from . import dispatch
from .sparse_linear import SparseLinear, default_choice, gemv_choices

CONV_SPATIAL = (14, 14)  # the feature-map size 1x1 convolutions are timed at on the CPU


@dataclass
class LayerDecision:
    name: str
    shape: tuple[int, int]
    kind: str  # "24" / "bitmask" / "" (not packed)
    sparse: bool  # True: runs as SparseLinear
    ratios: dict[int, float] = field(default_factory=dict)  # rows -> dense time / sparse time
    reason: str = ""


@dataclass
class AccelerateReport:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0
    decisions: list[LayerDecision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what stays as it is and why (MoE expert matrices)

    @property
    def memory_ratio(self) -> float:
        """Weight bytes of the swapped layers, sparse runtime over dense."""
        return self.sparse_bytes / self.dense_bytes if self.dense_bytes else float("nan")

    def table(self) -> str:
        """One line per distinct (shape, kind, decision): what was chosen and the measured ratios."""
        groups: dict[tuple, list[LayerDecision]] = {}
        for decision in self.decisions:
            key = (decision.shape, decision.kind, decision.sparse, tuple(sorted(decision.ratios.items())),
                   decision.reason)
            groups.setdefault(key, []).append(decision)
        lines = [f"{'layers':>6}  {'shape (out x in)':>17}  {'weights':>7}  {'runs as':>7}  measured dense/sparse"]
        for (shape, kind, sparse, ratios, reason), members in groups.items():
            measured = ", ".join(f"M={rows}: {ratio:.2f}x" for rows, ratio in ratios) or "-"
            example = members[0].name if len(members) == 1 else f"e.g. {members[0].name}"
            lines.append(f"{len(members):>6}  {shape[0]:>8} x {shape[1]:<6}  {('2:4' if kind == '24' else kind):>7}  "
                         f"{'sparse' if sparse else 'dense':>7}  {measured}  {reason} ({example})".rstrip())
        return "\n".join(lines)

    def summary(self) -> str:
        text = f"accelerated {len(self.swapped)} layers ({len(self.skipped)} left dense)"
        if self.swapped:
            text += (f"; their weights take {self.sparse_bytes / 2**20:.1f} MiB vs {self.dense_bytes / 2**20:.1f} MiB "
                     f"dense ({self.memory_ratio:.3f}x)")
        parts = [text, *self.notes]
        if self.decisions:
            parts.append(self.table())
        return "\n".join(parts + [f"warning: {w}" for w in self.warnings])


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _on_cpu(module: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in module.parameters(recurse=False))


def _cpu_target(module: nn.Module) -> bool:
    if type(module) is nn.Linear or _is_conv1d(module):
        return True
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1 and module.dilation == (1, 1))


def accelerate(model: nn.Module, *, device: torch.device | str | None = None, min_sparsity: float = 0.4,
               rows: tuple[int, ...] | None = (1,), prefill: bool = False) -> AccelerateReport:
    """Replace each pruned layer (at least ``min_sparsity`` zeros) by a sparse one where it pays.

    ``rows``: the row counts (batch x new tokens per step; the batch for convolutions) the model
    will serve; each distinct layer is timed against its dense form at each (CUDA: :func:`tune`,
    CUDA-graph replays; CPU: :func:`~.cpu_linear.measure_speedup`) and stays sparse only if it
    wins at all of them, else the dense layer is kept. ``rows=None`` swaps every pruned layer
    untimed. 2:4 layers also get a cuSPARSELt copy while they are timed at 2 rows or more (its
    searched algorithms beat the GEMV at some batch sizes); the copy stays only where a served row
    count chose it, or with ``prefill`` (CUDA: kept for long inputs, +0.56x of dense memory). ``device`` moves the model first. Embedding-tied heads are never swapped.
    Which layers are sparse, and with which pattern, comes from the pruning records the model
    carries (``sw.prune``, ``sw.load``, sparse training's ``finalize``); a model without records
    (pruned elsewhere) is scanned for layers with at least ``min_sparsity`` zeros instead.
    Returns what was swapped and measured (``report.summary()`` prints the per-shape table).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}.")
    if device is not None:
        model.to(device)
    tied = _embedding_weight_ids(model)
    records = get_records(model)
    report = AccelerateReport()
    gpu: dict[str, tuple[nn.Module, SparseLinear]] = {}
    cpu: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        on_cpu = _on_cpu(module)
        if not (_cpu_target(module) if on_cpu else type(module) is nn.Linear):
            continue
        weight = module.weight
        if id(weight) in tied:
            report.skipped[name] = "tied to the embeddings"
            continue
        record = records.get(name)
        if records and record is None:
            report.skipped[name] = "not pruned (no record)"
            continue
        zeros = record.achieved if record is not None else float((weight == 0).float().mean())
        if zeros < min_sparsity:
            report.skipped[name] = f"only {zeros:.0%} zeros"
            continue
        if on_cpu:
            cpu[name] = module
        else:
            sparse = SparseLinear.from_linear(module, pattern=None if record is None else record.pattern,
                                              cusparselt=prefill or max(rows or (1,)) >= 2)
            _replace(model, name, sparse)
            gpu[name] = (module, sparse)
    measured = tune(model, rows=rows) if (rows and gpu) else {}
    for name, (linear, sparse) in gpu.items():
        entries = measured.get(sparse.dispatch_key, {})
        ratios = {r: entries[dispatch.bucket(r)]["dense_ms"] / entries[dispatch.bucket(r)]["ms"]
                  for r in rows or () if dispatch.bucket(r) in entries}
        served = [entries.get(dispatch.bucket(r), {}).get("backend") for r in rows or ()]
        if sparse.cslt is not None and not prefill and "cusparselt" not in served:
            sparse.cslt = None  # no served row count chose it: only the 0.56x layout stays
        _decide(model, report, name, linear, sparse, sparse.kind, ratios)
    if cpu:
        _accelerate_cpu(model, report, cpu, rows)
    _note_experts(model, report, records)
    return report


EXPERTS_DENSE = "expert matrix of a fused parameter: stays masked dense (no grouped sparse expert GEMM yet)"


def _note_experts(model: nn.Module, report: AccelerateReport, records: dict) -> None:
    """List the pruned expert slices of fused 3-D parameters as left dense, with one summary note."""
    fused = {name for name, param in model.named_parameters() if param.ndim == 3}
    experts = [name for name in records if name.rpartition(".")[0] in fused and name.rpartition(".")[2].isdigit()]
    for name in experts:
        report.skipped[name] = EXPERTS_DENSE
    if experts:
        parameters = {name.rpartition(".")[0] for name in experts}
        report.notes.append(f"{len(experts)} pruned expert matrices in {len(parameters)} fused expert parameters stay in "
                            "masked dense form (the model's experts forward runs them; a grouped sparse expert GEMM "
                            "may come later)")


def _decide(model, report, name, dense, sparse, kind, ratios) -> None:
    """Keep ``sparse`` in the model unless dense wins at a served row count; record the decision."""
    losing = [r for r, ratio in ratios.items() if ratio < 1.0]
    shape = (sparse.out_features, sparse.in_features)
    decision = LayerDecision(name, shape, kind, not losing, ratios)
    if losing:
        _replace(model, name, dense)  # dense wins at a served row count: keep the dense weight
        decision.reason = f"dense is faster at M={','.join(map(str, losing))}"
        report.skipped[name] = decision.reason
    else:
        report.swapped.append(name)
        report.dense_bytes += dense.weight.numel() * dense.weight.element_size()
        report.sparse_bytes += sparse.weight_nbytes
    report.decisions.append(decision)


def _accelerate_cpu(model, report, layers: dict[str, nn.Module], rows) -> None:
    from .cpu_linear import CpuSparseLinear, measure_speedup

    measured: dict[tuple, dict[int, float]] = {}  # layers of one shape and density share a timing
    for name, module in layers.items():
        sparse = CpuSparseLinear.from_module(module)
        ratios = {}
        if rows:
            key = (type(module).__name__, sparse.out_features, sparse.in_features, round(sparse.density, 2))
            if key not in measured:
                spatial = CONV_SPATIAL if sparse.conv else None
                measured[key] = {r: measure_speedup(module, r, spatial=spatial) for r in rows}
            ratios = measured[key]
        _replace(model, name, sparse)
        _decide(model, report, name, module, sparse, "csr", ratios)


def _candidates(layer: SparseLinear, rows: int) -> list[dict]:
    found = gemv_choices(layer.kind, rows)
    if layer.cslt is not None and rows >= 2:
        # y row-major from cuSPARSELt, or y^T (its fast layout on sm_90) + one Triton transpose,
        # each with the algorithm id its own search found fastest for this bucket (id 0 when refused)
        from ..kernels.cusparselt import CusparseLtError

        for transposed in (False, True):
            choice = {"backend": "cusparselt", **({"transposed": True} if transposed else {})}
            try:
                choice["alg_id"] = layer.cslt.search(rows, transposed=transposed)["alg_id"]
            except CusparseLtError:
                pass
            found.append(choice)
    if rows > 16 or not found:
        found.append({"backend": "decompress"})
    return found


def agrees(out: torch.Tensor, reference: torch.Tensor, tolerance: float = 2e-2) -> bool:
    """A backend's output matches the float32 dense reference: finite, right shape, relative
    Frobenius error under ``tolerance`` (fp16/bf16 kernels measure 2e-4 to 4e-3)."""
    if out.shape != reference.shape or not bool(torch.isfinite(out).all()):
        return False
    error = (out.float() - reference).norm() / reference.norm().clamp_min(1e-12)
    return float(error) < tolerance


def _clones(layer: SparseLinear, copies: int) -> list[SparseLinear]:
    """Copies of a layer's buffers (not of its cuSPARSELt state), to rotate weights through memory."""
    out = [layer]
    for _ in range(copies - 1):
        clone = SparseLinear(layer.layout.__class__(*[t.clone() if isinstance(t, torch.Tensor) else t
                                                      for t in vars(layer.layout).values()]), layer.bias,
                             cslt=layer.cslt)
        out.append(clone)
    return out


def tune(model: nn.Module, rows: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[str, dict]:
    """Time every backend of each distinct SparseLinear shape at each row bucket against dense cuBLAS.

    CUDA-graph replays over rotated weight copies, medians; the fastest choice per bucket (with
    ``ms`` and ``dense_ms``) goes to the on-disk dispatch table. Returns {shape key: {bucket: choice}}.
    """
    layers: dict[str, SparseLinear] = {}
    for module in model.modules():
        if isinstance(module, SparseLinear) and module.device.type == "cuda":
            layers.setdefault(module.dispatch_key, module)
    measured: dict[str, dict] = {}
    for key, layer in layers.items():
        table = dispatch.table_for(layer.device)
        dense = layer.dense_weight()
        copies = dispatch.rotation_copies(layer.weight_nbytes)
        clones = _clones(layer, copies)
        dense_copies = [dense] + [dense.clone() for _ in range(copies - 1)]
        for count in sorted({dispatch.bucket(r) for r in rows}):
            x = torch.randn(count, layer.in_features, device=layer.device, dtype=layer.dtype)
            dense_ms = dispatch.time_rotated([lambda w=w, x=x, b=layer.bias: F.linear(x, w, b) for w in dense_copies])
            best = None
            reference = F.linear(x.float(), dense.float(), None if layer.bias is None else layer.bias.float())
            for choice in _candidates(layer, count):
                try:
                    if not agrees(layer.run(x, choice), reference):
                        continue  # a wrong answer is never a candidate, however fast
                    elapsed = dispatch.time_rotated([lambda c=c, x=x, choice=choice: c.run(x, choice) for c in clones])
                except Exception:  # noqa: BLE001 - a backend that cannot serve this shape
                    continue
                if best is None or elapsed < best[0]:
                    best = (elapsed, choice)
            if best is None:
                best = (float("inf"), default_choice(layer.kind, count, has_cslt=layer.cslt is not None, on_cuda=True))
            chosen = dict(best[1], ms=round(best[0], 5), dense_ms=round(dense_ms, 5))
            table.put(key, count, chosen)
            measured.setdefault(key, {})[count] = chosen
        table.save()
        del clones, dense_copies, dense
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module._choices.clear()
    return measured
