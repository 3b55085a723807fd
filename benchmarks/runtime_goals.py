"""Issue 16's goal table, computed from the JSON files the runtime benchmarks write.

Each GPU benchmark prints and saves what it measured; this script reads any number of those files
and prints one row per goal: the goal, what the files measured (best backend per layer shape and
row count, as dispatch would pick), and met / not met / not measured. Nothing is hard-coded but
the goals themselves.

    python benchmarks/runtime_goals.py benchmarks/results/h200-2026-12-03/*.json
    python benchmarks/runtime_goals.py --markdown FILES...     # the table RESULTS.md shows

Inputs it understands (told apart by their fields):
  runtime_kernels.py --json-out   per-layer rows {shape, mode, m, ratio, ...}
  decode_hf.py --json-out         decode rows {mode, batch, tok_s, ratio_vs_dense, block_weight_mib, ...}
  runtime_smollm2.py (json)       {pattern, ppl_masked, ppl_accelerated, ...}
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Which shape names of runtime_kernels.py are which LLaMA-3-8B projections.
PROJECTIONS = {"q": "q/o", "kv": "k/v", "gate": "gate/up", "down": "down"}
# decode_hf.py's models are LLaMA-3-8B-shaped: (out, in) of each projection in accelerate()'s table.
SHAPE_NAMES = {(4096, 4096): "q", (1024, 4096): "kv", (14336, 4096): "gate", (4096, 14336): "down"}
ACCELERATE_ROW = re.compile(r"(\d+) x (\d+)\s+\S+\s+(sparse|dense)\s+M=(\d+): ([\d.]+)x")
PPL_TOLERANCE = 1e-3  # relative: fp16 noise of the protocol's perplexity (32 windows of 512 tokens)


@dataclass
class Measured:
    """Everything the given files hold, indexed for the goal rows."""

    layer: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (family, shape, m) -> best ratio
    decode: dict[tuple[str, int], dict] = field(default_factory=dict)  # (mode, batch) -> latest row
    smollm2: dict[str, dict] = field(default_factory=dict)  # pattern -> row
    sources: list[str] = field(default_factory=list)


def layer_family(mode: str) -> str | None:
    """Goal family of a runtime_kernels.py row mode ('2:4 cuSPARSELt' -> '2:4', 'act 50%' -> 'act50')."""
    if mode in ("2:4", "2:4 tc", "2:4 cuSPARSELt"):
        return "2:4"
    if mode == "50%":
        return "unstructured50"
    for prefix, family in (("2:4 fused act ", "2:4+act"), ("2:4+act ", "2:4+act"), ("act ", "act")):
        if mode.startswith(prefix):
            return family + mode.removeprefix(prefix).rstrip("%")
    return None


def load(paths: list[Path]) -> Measured:
    measured = Measured()
    for path in paths:
        data = json.loads(path.read_text())
        rows = data.get("rows", data if isinstance(data, list) else [])
        kind = None
        for row in rows:
            if "shape" in row and "ratio" in row:
                kind = "kernels"
                family = layer_family(row["mode"])
                if family is None or not math.isfinite(row["ratio"]):
                    continue
                key = (family, row["shape"], int(row["m"]))
                measured.layer[key] = max(measured.layer.get(key, 0.0), row["ratio"])
            elif "tok_s" in row and "batch" in row:
                kind = "decode"
                key = (row["mode"], int(row["batch"]))
                measured.decode[key] = {**row, "source": path.name, "header": data.get("header", "")}
                _dispatch_ratios(measured, row)
            elif "ppl_masked" in row:
                kind = "smollm2"
                measured.smollm2[row["pattern"]] = row
        measured.sources.append(f"{path.name}: {kind or 'nothing recognised'} ({data.get('header', '').strip('# ')})")
    return measured


def _dispatch_ratios(measured: Measured, row: dict) -> None:
    """The per-layer ratios accelerate() measured while choosing backends in a decode run (its table)."""
    family = {"2:4": "2:4", "unstructured50": "unstructured50"}.get(row["mode"])
    if family is None:
        return
    for out_features, in_features, _runs_as, m, ratio in ACCELERATE_ROW.findall(row.get("accelerate", "")):
        shape = SHAPE_NAMES.get((int(out_features), int(in_features)))
        if shape is not None:
            key = (family, shape, int(m))
            measured.layer[key] = max(measured.layer.get(key, 0.0), float(ratio))


def _ratios(measured: Measured, family: str, shapes: list[str], rows: list[int]) -> dict[tuple[str, int], float]:
    return {(shape, m): measured.layer[(family, shape, m)] for shape in shapes for m in rows
            if (family, shape, m) in measured.layer}


def _fmt(found: dict[tuple[str, int], float], by_m: bool) -> str:
    parts = [f"{PROJECTIONS.get(shape, shape)}{f' M={m}' if by_m else ''} {ratio:.2f}x"
             for (shape, m), ratio in sorted(found.items(), key=lambda item: (item[0][1], item[0][0]))]
    return ", ".join(parts)


def per_layer_goal(family: str, rows: list[int], thresholds: dict[str, float]) -> Callable[[Measured], tuple]:
    """Every listed shape at every listed row count must reach its threshold (best backend per cell)."""
    def judge(measured: Measured) -> tuple[str, bool | None]:
        found = _ratios(measured, family, list(thresholds), rows)
        if not found:
            return "not measured in these files", None
        met = all(found.get((shape, m), 0.0) >= need for shape, need in thresholds.items() for m in rows
                  if (shape, m) in found)
        complete = len(found) == len(thresholds) * len(rows)
        return _fmt(found, len(rows) > 1) + ("" if complete else " (some cells not measured)"), met and complete
    return judge


def decode_goal(batch: int, thresholds: dict[str, float]) -> Callable[[Measured], tuple]:
    def judge(measured: Measured) -> tuple[str, bool | None]:
        found = {mode: measured.decode[(mode, batch)]["ratio_vs_dense"] for mode in thresholds
                 if (mode, batch) in measured.decode}
        if not found:
            return "not measured in these files", None
        text = ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in found.items())
        complete = len(found) == len(thresholds)
        met = complete and all(found[mode] >= need for mode, need in thresholds.items())
        return text + ("" if complete else " (some modes not measured)"), met
    return judge


def never_below_dense(measured: Measured) -> tuple[str, bool | None]:
    """End to end: every accelerated decode mode at every batch at least as fast as dense."""
    ratios = {key: row["ratio_vs_dense"] for key, row in measured.decode.items() if key[0] != "dense"}
    if not ratios:
        return "not measured in these files", None
    (mode, batch), worst = min(ratios.items(), key=lambda item: item[1])
    return f"lowest decode ratio {worst:.2f}x ({mode}, batch {batch}) over {len(ratios)} runs", worst >= 1.0


def weight_memory(measured: Measured) -> tuple[str, bool | None]:
    parts, met = [], []
    for (mode, batch), row in sorted(measured.decode.items()):
        dense = measured.decode.get(("dense", batch))
        if mode == "2:4" and dense:
            ratio = row["block_weight_mib"] / dense["block_weight_mib"]
            parts.append(f"2:4 batch {batch} {ratio:.3f}x")
            met.append(ratio <= 0.57)
    if not parts:
        return "not measured in these files", None
    return ", ".join(parts), all(met)


def smollm2_quality(measured: Measured) -> tuple[str, bool | None]:
    if not measured.smollm2:
        return "not measured in these files", None
    parts, met = [], []
    for pattern, row in measured.smollm2.items():
        masked, fast = row["ppl_masked"], row["ppl_accelerated"]
        parts.append(f"{pattern}: {masked:.3f} masked, {fast:.3f} accelerated")
        met.append(abs(fast - masked) <= PPL_TOLERANCE * masked)
    return "; ".join(parts), all(met)


GOALS: list[tuple[str, str, Callable[[Measured], tuple]]] = [
    ("2:4 per layer, M=1 (q/o, gate/up, down)", ">= 1.7x",
     per_layer_goal("2:4", [1], {"q": 1.7, "gate": 1.7, "down": 1.7})),
    ("2:4 per layer, M=2..16", ">= 1.35x gate/up, down; >= 1.2x q/o",
     per_layer_goal("2:4", [2, 4, 8, 16], {"q": 1.2, "gate": 1.35, "down": 1.35})),
    ("2:4 prefill, M=2048, every projection", ">= 1.25x",
     per_layer_goal("2:4", [2048], {"q": 1.25, "kv": 1.25, "gate": 1.25, "down": 1.25})),
    ("50% unstructured per layer, M=1", ">= 1.5x",
     per_layer_goal("unstructured50", [1], {"q": 1.5, "kv": 1.5, "gate": 1.5, "down": 1.5})),
    ("50% unstructured per layer, M=8", ">= 1.15x",
     per_layer_goal("unstructured50", [8], {"q": 1.15, "kv": 1.15, "gate": 1.15, "down": 1.15})),
    ("activation-sparse 50%, M=1", ">= 1.6x",
     per_layer_goal("act50", [1], {"q": 1.6, "kv": 1.6, "gate": 1.6, "down": 1.6})),
    ("activation-sparse 90%, M=1", ">= 3x",
     per_layer_goal("act90", [1], {"q": 3.0, "kv": 3.0, "gate": 3.0, "down": 3.0})),
    ("activation-sparse 0%, M=1", ">= 0.98x",
     per_layer_goal("act0", [1], {"q": 0.98, "kv": 0.98, "gate": 0.98, "down": 0.98})),
    ("2:4 weights + 50% activations, M=1", ">= 2.5x",
     per_layer_goal("2:4+act50", [1], {"q": 2.5, "gate": 2.5, "down": 2.5})),
    ("never below dense (end to end, dispatch)", ">= 1.0x", never_below_dense),
    ("decode tok/s, batch 1", "2:4 >= 1.5x; 50% >= 1.35x; 2:4+act50 >= 2.0x",
     decode_goal(1, {"2:4": 1.5, "unstructured50": 1.35, "2:4+act50": 2.0})),
    ("decode tok/s, batch 8", "2:4 >= 1.25x", decode_goal(8, {"2:4": 1.25})),
    ("weight memory of accelerated block linears", "<= 0.57x dense", weight_memory),
    ("SmolLM2 ppl, accelerated vs masked", f"equal within {PPL_TOLERANCE:.0e} relative", smollm2_quality),
]


def goal_rows(measured: Measured) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, goal, judge in GOALS:
        text, met = judge(measured)
        rows.append((name, goal, text, {True: "met", False: "NOT met", None: "-"}[met]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    measured = load(args.files)
    print("# sources")
    for source in measured.sources:
        print(f"#   {source}")
    rows = goal_rows(measured)
    if args.markdown:
        print("| measure | goal | measured | status |\n| --- | --- | --- | --- |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    width = max(len(row[0]) for row in rows)
    for name, goal, text, status in rows:
        print(f"{name:<{width}}  {status:<7}  goal {goal}\n{'':<{width}}           {text}")


if __name__ == "__main__":
    main()
