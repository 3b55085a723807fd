"""Swap the pruned linears of a model for :class:`SparseLinear`, and measure the dispatch table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.adapters import _embedding_weight_ids
from . import dispatch
from .sparse_linear import PLANES_MAX_ROWS, SparseLinear, planes_choices


@dataclass
class AccelerateReport:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0

    @property
    def memory_ratio(self) -> float:
        """Weight bytes of the swapped layers, sparse runtime over dense."""
        return self.sparse_bytes / self.dense_bytes if self.dense_bytes else float("nan")

    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"accelerated {len(self.swapped)} linears ({len(self.skipped)} left dense); their weights take "
                f"{self.sparse_bytes / 2**20:.1f} MiB vs {self.dense_bytes / 2**20:.1f} MiB dense "
                f"({self.memory_ratio:.3f}x)")
        return "\n".join([text, *(f"warning: {w}" for w in self.warnings)])


def accelerate(model: nn.Module, *, device: torch.device | str | None = None, min_sparsity: float = 0.4,
               keep_dense: bool = False, prefill: bool = True, tune_rows: tuple[int, ...] | None = None,
               ) -> AccelerateReport:
    """Replace every ``nn.Linear`` whose weight is at least ``min_sparsity`` zeros by a SparseLinear.

    Embedding-tied heads are never swapped. ``device`` moves the model first (the runtime needs
    CUDA for its kernels; on CPU the SparseLinears compute through the PyTorch reference).
    ``keep_dense`` keeps a dense copy for the row counts where no sparse backend wins (memory
    goes up by 1x); ``prefill`` keeps cuSPARSELt's compressed copy for 2:4 layers (+~0.56x) so
    long prompts run on sparse tensor cores. ``tune_rows`` measures the dispatch table for those
    row counts (e.g. ``(1, 8, 2048)``) and caches it on disk. Returns what was swapped.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}.")
    if device is not None:
        model.to(device)
    tied = _embedding_weight_ids(model)
    report = AccelerateReport()
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if id(weight) in tied:
            report.skipped[name] = "tied to the embeddings"
            continue
        zeros = float((weight == 0).float().mean())
        if zeros < min_sparsity:
            report.skipped[name] = f"only {zeros:.0%} zeros"
            continue
        targets.append((name, module))
    for name, module in targets:
        sparse = SparseLinear.from_linear(module, keep_dense=keep_dense, prefill=prefill)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sparse)
        report.swapped.append(name)
        report.dense_bytes += module.weight.numel() * module.weight.element_size()
        report.sparse_bytes += sparse.weight_nbytes
    if targets and not any(sparse.device.type == "cuda" for sparse in
                           (model.get_submodule(name) for name in report.swapped)):
        report.warnings.append("the model is on the CPU: SparseLinear computes through the PyTorch reference "
                               "(decompressing the weight every call), slower than dense; pass device='cuda'.")
    if tune_rows:
        tune(model, rows=tune_rows)
    return report


def _candidates(layer: SparseLinear, rows: int) -> list[dict]:
    # decompressing a bitmask weight per call writes the whole dense weight: never worth timing
    # for decode-sized rows (the planes kernels serve those), only as the long-prompt fallback
    found = [] if layer.kind == "bitmask" and rows <= PLANES_MAX_ROWS else [{"backend": "decompress"}]
    if layer.dense_weight is not None:
        found.append({"backend": "dense"})
    if layer.cslt is not None and rows >= 16:
        # y row-major from cuSPARSELt, or y^T (its fast layout on sm_90) + one Triton transpose
        found += [{"backend": "cusparselt"}, {"backend": "cusparselt", "transposed": True}]
    tiles = layer.layout.meta.shape[1] // layer.width
    found += planes_choices(layer.kind, rows, layer.width, tiles)
    return found


def tune(model: nn.Module, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256, 2048)) -> dict[str, dict]:
    """Time every backend of each distinct SparseLinear shape at each row bucket; keep the fastest.

    Random inputs, CUDA events, medians; the table is written to the on-disk cache. Returns
    {shape key: {bucket: choice with its time in ms}}.
    """
    layers = {}
    for module in model.modules():
        if isinstance(module, SparseLinear) and module.device.type == "cuda":
            layers.setdefault(module.dispatch_key, module)
    measured: dict[str, dict] = {}
    for key, layer in layers.items():
        table = dispatch.table_for(layer.device)
        for count in sorted({dispatch.bucket(r) for r in rows}):
            x = torch.randn(count, layer.in_features, device=layer.device, dtype=layer.dtype)
            best = None
            for choice in _candidates(layer, count):
                try:
                    elapsed = dispatch.time_call(lambda choice=choice, layer=layer, x=x: layer.run(x, choice))
                except Exception:  # noqa: BLE001 - a backend that cannot serve this shape (e.g. out of shared memory)
                    continue
                if best is None or elapsed < best[0]:
                    best = (elapsed, choice)
            if best is None:
                continue
            chosen = dict(best[1], ms=round(best[0], 5))
            table.put(key, count, chosen)
            measured.setdefault(key, {})[count] = chosen
        table.save()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module._choices.clear()
    return measured
