"""Plots of a sparse-training log (``attach(..., log=PATH)``) and of a pruned model (per-layer
sparsity and error along depth): matplotlib, imported on use, no pyplot (no GUI, no global state).

Every plot function writes a PNG to a path, or to a binary file object (``io.BytesIO``: the
HTML report embeds the bytes).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError

__all__ = ["plot_model_report", "plot_training_log", "png_bytes"]

Target = str | Path | IO[bytes]

MAX_LEGEND = 12  # beyond this many layers the per-layer lines are drawn faint and unlabelled


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from exc
    return Figure


def _save(figure, target: Target) -> Path | IO[bytes]:
    if not isinstance(target, (str, Path)):
        figure.savefig(target, dpi=110, format="png")
        return target
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, format="png")
    return path


def png_bytes(plot, *args: Any, **kwargs: Any) -> bytes:
    """The PNG a plot function draws, as bytes: ``png_bytes(plot_model_report, report)``."""
    buffer = io.BytesIO()
    plot(*args, buffer, **kwargs)
    return buffer.getvalue()


def plot_training_log(rows: list[dict[str, Any]], path: Target, title: str | None = None) -> Path | IO[bytes]:
    """Write a PNG with three panels over steps: global and per-layer sparsity, mask flips (SAD)
    per logged interval, and the PQ Index per layer. ``rows``: ``read_training_log(csv)``."""
    from ..training.metrics import GLOBAL_ROW, _by_step

    Figure = _figure_class()
    steps = _by_step(rows)
    if not steps:
        raise ConfigError("the training log is empty: nothing to plot.")
    order = list(steps)
    layers = [name for name in steps[order[-1]] if name != GLOBAL_ROW]
    many = len(layers) > MAX_LEGEND

    def series(name: str, key: str) -> list[float]:
        return [steps[step][name][key] if name in steps[step] else math.nan for step in order]

    # a Figure with no pyplot: no global backend switch, no GUI, nothing left open (Agg canvas)
    figure = Figure(figsize=(8, 9), layout="constrained")
    sparsity, flips, pqi = figure.subplots(3, 1, sharex=True)
    style = {"linewidth": 0.8, "alpha": 0.35 if many else 0.9}
    for name in layers:
        sparsity.plot(order, series(name, "sparsity"), label=None if many else name, **style)
        pqi.plot(order, series(name, "pq_index"), label=None if many else name, **style)
    if GLOBAL_ROW in steps[order[-1]]:
        sparsity.plot(order, series(GLOBAL_ROW, "sparsity"), color="black", linewidth=2, label="global")
        sparsity.plot(order, series(GLOBAL_ROW, "target_sparsity"), color="black", linestyle=":", linewidth=1,
                      label="global target")
        pqi.plot(order, series(GLOBAL_ROW, "pq_index"), color="black", linewidth=2, label="global")
    sparsity.set_ylabel("sparsity (zeros / weights)")
    sparsity.legend(fontsize="x-small", ncol=2 if not many else 1)

    # flips between consecutive records, drawn over the interval they happened in
    starts, widths, counts = order[:-1], [b - a for a, b in zip(order, order[1:], strict=False)], \
        [steps[step].get(GLOBAL_ROW, {}).get("flips_since_last", 0) for step in order[1:]]
    flips.bar(starts, counts, width=widths, align="edge", color="tab:red", edgecolor="white")
    flips.set_ylabel("mask flips (SAD)\nper logged interval")

    pqi.set_ylabel("PQ Index\n(unpruned entries)")
    pqi.set_xlabel("optimizer step")
    if not many:
        pqi.legend(fontsize="x-small", ncol=2)
    figure.suptitle(title or "sparse training")
    return _save(figure, path)


def plot_model_report(report: Any, path: Target, title: str | None = None) -> Path | IO[bytes]:
    """Write a PNG of a pruned model along depth: per-layer sparsity (one series per layer kind:
    q/k/v/o/gate/up/down or the model's own names) with the targets, then the per-layer error
    where the records hold one, then the block reconstruction error where blocks were refit.
    ``report``: :class:`sparsewise.metrics.report.CheckpointReport`."""
    from .report import kind_labels, layer_depth, layer_kind

    Figure = _figure_class()
    rows = report.sparsity.rows
    if not rows:
        raise ConfigError("the model has no prunable layers: nothing to plot.")
    depths = [layer_depth(row.name) for row in rows]
    by_depth = any(depth is not None for depth in depths)
    if by_depth:  # layers outside the blocks (lm_head) after the last block
        after = max(depth for depth in depths if depth is not None) + 1
        xs = [after if depth is None else depth for depth in depths]
    else:
        xs = list(range(len(rows)))
    kinds: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        kinds.setdefault(layer_kind(row.name), []).append(index)
    labels = kind_labels(list(kinds))
    many = len(kinds) > MAX_LEGEND
    errors = report.errors()
    blocks = report.block_reconstruction()
    panels = 1 + bool(errors) + bool(blocks)

    figure = Figure(figsize=(8, 3.3 * panels + 0.6), layout="constrained")
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    sparsity_ax = axes[0]
    marker = "o" if len(rows) <= 400 else None
    style = {"linewidth": 1.0, "markersize": 3.5, "alpha": 0.4 if many else 0.9}
    for kind, indices in kinds.items():
        sparsity_ax.plot([xs[i] for i in indices], [rows[i].sparsity for i in indices], marker=marker,
                         label=None if many else labels[kind], **style)
    targets = [(xs[i], report.records[row.name].sparsity) for i, row in enumerate(rows) if row.name in report.records]
    if targets:
        values = {round(value, 6) for _, value in targets}
        if len(values) == 1:
            sparsity_ax.axhline(targets[0][1], color="black", linestyle=":", linewidth=1, label="target")
        else:
            targets.sort()
            sparsity_ax.plot(*zip(*targets, strict=True), color="black", linestyle="none", marker="_",
                             markersize=8, label="target")
    sparsity_ax.set_ylabel("sparsity (zeros / weights)")
    sparsity_ax.yaxis.set_major_formatter(_percent_formatter())
    low = min(row.sparsity for row in rows)
    high = max(row.sparsity for row in rows)
    pad = max(0.02, (high - low) * 0.15)
    sparsity_ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    sparsity_ax.legend(fontsize="x-small", ncol=4, loc="best")

    panel = 1
    if errors:
        error_ax = axes[panel]
        panel += 1
        positive = True
        for kind, indices in kinds.items():
            points = [(xs[i], errors[rows[i].name][1]) for i in indices if rows[i].name in errors]
            if points:
                positive &= all(value > 0 for _, value in points)
                error_ax.plot(*zip(*points, strict=True), marker=marker, label=None if many else labels[kind], **style)
        if positive:
            error_ax.set_yscale("log")
        error_ax.set_ylabel("per-layer error")
        error_ax.set_title(next(iter(errors.values()))[0], fontsize="small")
        if not many:
            error_ax.legend(fontsize="x-small", ncol=4, loc="best")
    if blocks:
        block_ax = axes[panel]
        index = list(blocks)
        for key, label, color in (("loss_before", "before refit", "tab:red"), ("loss_after", "after refit", "tab:green")):
            values = [blocks[i].get(key, math.nan) for i in index]
            block_ax.plot(index, values, marker="o", color=color, label=label, linewidth=1.2, markersize=3.5)
        block_ax.set_ylabel("block output\nrelative error")
        block_ax.legend(fontsize="x-small")
    axes[-1].set_xlabel("block (depth)" if by_depth else "layer (order)")
    if by_depth:
        axes[-1].xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title or "per-layer sparsity")
    return _save(figure, path)


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0)
