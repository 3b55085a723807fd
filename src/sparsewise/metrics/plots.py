"""Plots of a sparse-training log (``attach(..., log=PATH)``): matplotlib, imported on use."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["plot_training_log"]

MAX_LEGEND = 12  # beyond this many layers the per-layer lines are drawn faint and unlabelled


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from exc
    return Figure


def plot_training_log(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
