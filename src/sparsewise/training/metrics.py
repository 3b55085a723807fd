"""How the sparse topology evolves during training: mask flips (SAD), PQ Index, and a CSV log.

* SAD, Sparse Architecture Divergence (Zhou et al. 2021, SR-STE): the Hamming distance between
  two keep-masks, i.e. how many weights changed between kept and pruned.
* PQ Index (Diao et al. 2023, "Pruning Deep Neural Networks from a Sparsity Perspective"): for
  the d unpruned entries of w and 0 < p < q,
  PQI_{p,q}(w) = 1 - d^{1/q - 1/p} ||w||_p / ||w||_q, in [0, 1 - d^{1/q-1/p}]; 0 for a constant
  vector, larger = more compressible.
* :class:`TrainingLog`: the per-layer CSV that ``attach(..., log=PATH)`` writes; what is counted
  is stated per column (the "Sparseland" handbook, Liu et al. 2023: say what a sparsity counts).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from .controller import SparseTraining

__all__ = ["GLOBAL_ROW", "LOG_COLUMNS", "TrainingLog", "format_training_log", "mask_flips", "pq_index",
           "read_training_log", "summarize_training_log"]

GLOBAL_ROW = "__global__"
LOG_COLUMNS = ("step", "layer", "target_sparsity", "sparsity", "flips_since_last", "pq_index", "params")


def mask_flips(previous: torch.Tensor, current: torch.Tensor) -> int:
    """Sparse Architecture Divergence (SR-STE, Zhou et al. 2021): the number of entries that are
    kept in one mask and pruned in the other, SAD = sum |m_prev - m_cur| (nonzero = kept)."""
    if previous.shape != current.shape:
        raise ConfigError(f"SAD compares masks of one layer: shapes {tuple(previous.shape)} and "
                          f"{tuple(current.shape)} differ.")
    return int((previous.to(current.device) != 0).ne(current != 0).sum())


def _power_means(values: torch.Tensor, kept: torch.Tensor, p: float, q: float, dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_p, M_q): power means (mean_i |w_i|^r)^{1/r} over the kept entries along ``dim``, after
    dividing by the largest |w| (PQI is scale-free; the division keeps |w|^q from over- or
    underflowing and makes a constant vector exactly all ones, so its PQI is exactly 0)."""
    magnitude = values.detach().abs()
    if magnitude.dtype != torch.float64:  # half / bf16 powers lose digits; ints need a float
        magnitude = magnitude.float()
    magnitude = magnitude * kept  # pruned entries: 0^r = 0 adds nothing to the sums (r > 0)
    scale = magnitude.amax(dim=dim, keepdim=True)
    normalized = magnitude / torch.where(scale > 0, scale, torch.ones_like(scale))
    count = kept.sum(dim=dim, dtype=torch.float64)
    mean_p = (normalized.pow(p).sum(dim=dim, dtype=torch.float64) / count).pow(1.0 / p)
    mean_q = (normalized.pow(q).sum(dim=dim, dtype=torch.float64) / count).pow(1.0 / q)
    return mean_p, mean_q


def pq_index(weights: torch.Tensor, p: float = 0.5, q: float = 1.0, dim: int | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """PQ Index (Diao et al. 2023): PQI_{p,q}(w) = 1 - d^{1/q-1/p} ||w||_p / ||w||_q.

    Computed over the unpruned entries (``mask`` True, default all; d = their count): over the
    whole tensor with ``dim=None`` (a scalar), or per slice along ``dim`` (``dim=1`` on [out, in]
    rows: one value per neuron). Written as 1 - M_p / M_q with the power means
    M_r = (mean |w|^r)^{1/r}, the same quantity. 0 for a constant vector, 1 - d^{1/q-1/p} for a
    one-hot one; NaN where no kept entry is nonzero (undefined). Returned as float64.
    """
    if not 0 < p < q:
        raise ConfigError(f"the PQ Index needs 0 < p < q, got p={p}, q={q}.")
    kept = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.to(weights.device) != 0
    if kept.shape != weights.shape:
        raise ConfigError(f"mask shape {tuple(kept.shape)} does not match weights {tuple(weights.shape)}.")
    if dim is not None and not -weights.dim() <= dim < weights.dim():
        raise ConfigError(f"dim={dim} is out of range for a {weights.dim()}-d tensor.")
    if dim is None:  # the whole tensor as one vector
        weights, kept, dim = weights.reshape(-1), kept.reshape(-1), 0
    mean_p, mean_q = _power_means(weights, kept, p, q, dim)
    index = 1.0 - mean_p / mean_q
    # no kept entry, or all kept entries zero: 0/0, no sparsity to speak of
    return torch.where(mean_q > 0, index, torch.full_like(index, math.nan))


def _is_writer() -> bool:
    # under torch.distributed every rank holds the same masks: rank 0 alone writes the log
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _pack(mask: torch.Tensor) -> np.ndarray:
    # the previous record's masks, 1 bit per weight on the host (a 7B model: ~0.8 GB, not 7 GB)
    return np.packbits(mask.detach().reshape(-1).to("cpu", torch.uint8).numpy())


def _packed_flips(previous: np.ndarray, current: np.ndarray) -> int:
    # padding bits are 0 in both, so the popcount of the XOR is the Hamming distance
    return int(np.unpackbits(np.bitwise_xor(previous, current)).sum(dtype=np.int64))


class TrainingLog:
    """Per-layer sparsity, mask flips and PQ Index over training, appended to a CSV.

    One row per trained layer and record, plus a ``__global__`` row:

    step              optimizer steps taken (0 = at attach)
    layer             module name, or ``__global__`` for all trained weights together
    target_sparsity   the layer's assigned ratio (global: parameter-weighted over layers)
    sparsity          measured zeros of the weight the forward pass uses, w * mask, over the
                      layer's weights (biases excluded); global: zeros / params of all layers
    flips_since_last  SAD between this record's mask and the previous record's (0 at the first)
    pq_index          PQI_{p,q} (default p=0.5, q=1) over the layer's unpruned entries (global:
                      over all trained layers' unpruned entries as one vector)
    params            weights in the layer (global: in all trained layers)

    The file is started over at the first record unless ``append=True`` (continuing a resumed
    run). Each record is one flushed write of all its rows. Under torch.distributed only rank 0
    writes. A second record at the same step (finalize() right after a logged step) is written
    only when something changed, so a step normally appears once per layer.
    """

    def __init__(self, path: str | Path, *, p: float = 0.5, q: float = 1.0, append: bool = False):
        if not 0 < p < q:
            raise ConfigError(f"the PQ Index needs 0 < p < q, got p={p}, q={q}.")
        self.path = Path(path)
        self.p, self.q, self.append = p, q, append
        self._previous: dict[str, np.ndarray] = {}
        self._last: tuple[int, list[tuple]] | None = None
        self._started = False

    @staticmethod
    def _effective(item) -> tuple[torch.Tensor, torch.Tensor]:
        mask = item.mask_rows() != 0
        # STE methods keep dense weights and mask them in forward: count what the forward uses
        return item.weight_rows() * mask, mask

    @torch.no_grad()
    def rows(self, step: int, run: SparseTraining) -> list[tuple]:
        """This record's rows (as written); the masks become the ones the next flips count from."""
        # one common scale for the global PQI's power sums (no concatenated copy of the model)
        scale = max((float(self._effective(item)[0].abs().max()) for item in run.layers.values()), default=0.0)
        rows = []
        zeros_total = params_total = flips_total = kept_total = 0
        target_total = sum_p = sum_q = 0.0
        for name, item in run.layers.items():
            weight, mask = self._effective(item)
            params = weight.numel()
            zeros = params - int((weight != 0).sum())
            packed = _pack(mask)
            previous = self._previous.get(name)
            flips = _packed_flips(previous, packed) if previous is not None else 0
            self._previous[name] = packed
            index = float(pq_index(weight, self.p, self.q, mask=mask))
            rows.append((step, name, float(item.sparsity), zeros / params, flips, index, params))
            zeros_total += zeros
            params_total += params
            flips_total += flips
            target_total += item.sparsity * params
            kept_total += int(mask.sum())
            if scale > 0:
                normalized = weight.abs().float() / scale
                sum_p += float(normalized.pow(self.p).sum(dtype=torch.float64))
                sum_q += float(normalized.pow(self.q).sum(dtype=torch.float64))
        global_index = math.nan
        if sum_q > 0:
            global_index = 1.0 - (sum_p / kept_total) ** (1 / self.p) / (sum_q / kept_total) ** (1 / self.q)
        rows.append((step, GLOBAL_ROW, target_total / params_total, zeros_total / params_total, flips_total,
                     global_index, params_total))
        return rows

    def record(self, step: int, run: SparseTraining) -> None:
        """Append this step's rows (the controller calls it at attach, every ``log_every`` steps
        and at finalize)."""
        if not _is_writer():
            return
        rows = self.rows(step, run)
        if self._last is not None and self._last[0] == step and _unchanged(self._last[1], rows):
            return
        self._last = (step, rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        mode = "a"
        if not self._started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.append and self.path.is_file() and self.path.stat().st_size > 0:
                _check_header(self.path)
            else:
                writer.writerow(LOG_COLUMNS)
                mode = "w"
            self._started = True
        for row in rows:
            writer.writerow([_cell(value) for value in row])
        with open(self.path, mode, newline="", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()


def _unchanged(old: list[tuple], new: list[tuple]) -> bool:
    # the same state recorded twice: same layers, no flip, same measured sparsity
    return len(old) == len(new) and all(
        a[1] == b[1] and b[4] == 0 and a[3] == b[3] for a, b in zip(old, new, strict=True))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def _check_header(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    if tuple(header) != LOG_COLUMNS:
        raise DataError(f"{path} is not a sparse-training log (header {header}); pass another log path, "
                        "or append=False to start it over.")


_TYPES = {"step": int, "layer": str, "target_sparsity": float, "sparsity": float, "flips_since_last": int,
          "pq_index": float, "params": int}


def read_training_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a :class:`TrainingLog` CSV as dicts with typed values, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training log {path} does not exist; pass the CSV given to attach(..., log=PATH).")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in LOG_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} is not a sparse-training log: columns {', '.join(missing)} are missing.")
        try:
            return [{key: _TYPES[key](row[key]) for key in LOG_COLUMNS} for row in reader]
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: a row does not parse ({exc}); the file is truncated or edited.") from exc


def _by_step(rows: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    # a later row for the same (step, layer) wins: a final record after a logged step, a resumed run
    steps: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        steps.setdefault(row["step"], {})[row["layer"]] = row
    return dict(sorted(steps.items()))


def summarize_training_log(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The facts of a training log: steps, final global numbers, flips per interval, final layers."""
    steps = _by_step(rows)
    if not steps or not all(GLOBAL_ROW in layers for layers in steps.values()):
        raise DataError("the training log holds no complete record (no __global__ row): was it written by "
                        "attach(..., log=PATH)?")
    order = list(steps)
    final = steps[order[-1]]
    layers = [name for name in final if name != GLOBAL_ROW]
    intervals = [{"from": start, "to": end, "flips": steps[end][GLOBAL_ROW]["flips_since_last"]}
                 for start, end in zip(order, order[1:], strict=False)]
    total_flips = {name: sum(steps[step].get(name, {}).get("flips_since_last", 0) for step in order)
                   for name in layers}
    return {
        "steps": order,
        "final_step": order[-1],
        "params": final[GLOBAL_ROW]["params"],
        "target_sparsity": final[GLOBAL_ROW]["target_sparsity"],
        "final_sparsity": final[GLOBAL_ROW]["sparsity"],
        "final_pq_index": final[GLOBAL_ROW]["pq_index"],
        "intervals": intervals,
        "total_flips": sum(interval["flips"] for interval in intervals),
        "layers": [{"layer": name, "params": final[name]["params"], "target_sparsity": final[name]["target_sparsity"],
                    "sparsity": final[name]["sparsity"], "pq_index": final[name]["pq_index"],
                    "flips": total_flips[name]} for name in layers],
    }


def format_training_log(rows: list[dict[str, Any]], max_rows: int | None = None) -> str:
    """One screen of text: steps, final global sparsity, flips per interval, per-layer table."""
    facts = summarize_training_log(rows)
    steps = facts["steps"]
    lines = [f"steps {steps[0]} -> {steps[-1]} ({len(steps)} records), {len(facts['layers'])} trained layers, "
             f"{facts['params']:,} weights",
             f"final global sparsity {facts['final_sparsity']:.2%} (target {facts['target_sparsity']:.2%}), "
             f"PQ index {facts['final_pq_index']:.4f}"]
    intervals = [f"{item['from']}-{item['to']}: {item['flips']:,}" for item in facts["intervals"]]
    if len(intervals) > 12:  # one screen: the start and the end of training
        intervals = [*intervals[:6], "...", *intervals[-5:]]
    lines.append("mask flips (SAD) per logged interval: " + (", ".join(intervals) or "none (one record)")
                 + f"; total {facts['total_flips']:,}")
    table = [("layer", "params", "target", "final", "PQI", "flips")] + [
        (layer["layer"], f"{layer['params']:,}", f"{layer['target_sparsity']:.2%}", f"{layer['sparsity']:.2%}",
         f"{layer['pq_index']:.4f}", f"{layer['flips']:,}")
        for layer in (facts["layers"] if max_rows is None else facts["layers"][:max_rows])]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip() for row in table]
    if max_rows is not None and len(facts["layers"]) > max_rows:
        lines.append(f"... {len(facts['layers']) - max_rows} more layers")
    return "\n".join(lines)
