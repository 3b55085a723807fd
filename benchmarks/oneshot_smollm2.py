"""One-shot pruning of the real SmolLM2-135M by the project's evaluation protocol.

Table: {magnitude, wanda, sparsegpt} x {50% unstructured, 2:4, 4:8}; ppl on WikiText-2 test
(seqlen 512, 32 evenly spaced windows), C4 calibration 64 x 512 (seed 0), fp32 on CPU.
Each configuration runs in its own process so wall time and peak RSS belong to that run alone.

    python benchmarks/oneshot_smollm2.py                 # whole table -> stdout (markdown) + JSON
    python benchmarks/oneshot_smollm2.py --only wanda:2:4 # one row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPARSEWISE_SHARED_DATA", REPO.parent / "shared" / "data"))
C4 = DATA / "c4-en-train-00000-first1000" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = DATA / "wikitext-2-raw-orig" / "wiki.test.raw"
METHODS = ["magnitude", "wanda", "sparsegpt"]
PATTERNS = [("unstructured", 0.5), ("2:4", None), ("4:8", None)]


def run_one(method: str, pattern: str, sparsity: float | None, sequential: str, args) -> dict:
    import torch

    import sparsewise as sw
    from sparsewise.oneshot import peak_rss_mb

    torch.manual_seed(0)
    model, tok = sw.load_model("smollm2-135m")
    rss_loaded = peak_rss_mb()
    row = {"method": method, "pattern": pattern, "sequential": sequential}
    if method != "dense":
        calib = sw.data.calibration(C4, tok, n=args.calib_n, seqlen=args.calib_seqlen, seed=0)
        allocation = getattr(args, "allocation", None)
        options = json.loads(getattr(args, "allocation_options", None) or "{}")
        refine = getattr(args, "refine", None)
        result = sw.prune(model, method=method, sparsity=sparsity, pattern=pattern, calibration=calib,
                          sequential=sequential, batch_size=args.batch_size, progress=False,
                          allocation=allocation, allocation_options=options or None, refine=refine)
        layer_targets = [record.sparsity for record in result.records.values()]
        row.update(prune_wall_s=result.wall_s, peak_rss_mb=result.peak_rss_mb, rss_after_load_mb=rss_loaded,
                   achieved=result.achieved_sparsity, warnings=result.warnings, allocation=result.allocation,
                   refine=refine, allocation_options=options, layer_min=min(layer_targets),
                   layer_max=max(layer_targets),
                   swaps=sum(record.info.get("refine", {}).get("swaps", 0) for record in result.records.values()))
    clock = time.perf_counter()
    ppl = sw.evaluate.perplexity(model, tok, WIKI, seqlen=args.seqlen, max_windows=args.windows, progress=False)
    row.update(ppl=ppl.ppl, eval_wall_s=time.perf_counter() - clock, windows=ppl.n_windows,
               total_windows=ppl.total_windows)
    return row


def cpu_header(settings: str) -> dict:
    """Date, machine, versions and settings: the header of every CPU benchmark's results."""
    import torch
    import transformers

    import sparsewise

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch threads {torch.get_num_threads()}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, sparsewise {sparsewise.__version__}",
        "settings": settings,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="method:pattern[@sequential], e.g. wanda:2:4, sparsegpt:unstructured@block, dense:-")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json-out", type=Path, default=REPO / ".bench" / "oneshot_smollm2.json")
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured rows of --only")
    parser.add_argument("--allocation", help="layer-wise allocation for --only (owl, erk, tyr, ecoflap, ...)")
    parser.add_argument("--allocation-options", help="JSON options of the allocation")
    parser.add_argument("--refine", help="mask refiner for --only (dsnot)")
    args = parser.parse_args()

    if args.only:
        spec, _, sequential = args.only.partition("@")
        method, _, pattern = spec.partition(":")
        sparsity = args.sparsity if pattern == "unstructured" else None
        print(json.dumps(run_one(method, pattern, sparsity, sequential or "layer", args)), flush=True)
        return



    header = cpu_header(
        f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32, CPU); calibration C4 sample {args.calib_n} x "
        f"{args.calib_seqlen} seed 0; eval WikiText-2 test seqlen {args.seqlen}, {args.windows} evenly spaced windows")
    rows = []
    jobs = [("dense", "-", "layer")] + [(m, p, "layer") for m in METHODS for p, _ in PATTERNS]
    # the classic two-pass scheme (what llm-compressor runs), for the calibration-aware methods
    jobs += [(m, p, "block") for m in ("wanda", "sparsegpt") for p in ("unstructured", "2:4")]
    passthrough = [f"--calib-n={args.calib_n}", f"--calib-seqlen={args.calib_seqlen}", f"--seqlen={args.seqlen}",
                   f"--windows={args.windows}", f"--batch-size={args.batch_size}"]
    for method, pattern, sequential in jobs:
        out = subprocess.run([sys.executable, __file__, "--only", f"{method}:{pattern}@{sequential}", *passthrough],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"run {method}:{pattern} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"header": header, "rows": rows}, indent=2))

    print(f"date: {header['date']}\nmachine: {header['machine']}\nversions: {header['versions']}\nsettings: {header['settings']}\n")
    print("| method | pattern | sequential | ppl | prune wall s | peak RSS MB | achieved sparsity |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        if row["method"] == "dense":
            print(f"| dense | - | - | {row['ppl']:.2f} | - | - | 0 |")
            continue
        mode = row["sequential"] if row["method"] in ("wanda", "sparsegpt") else "-"
        print(f"| {row['method']} | {row['pattern']} | {mode} | {row['ppl']:.2f} | {row['prune_wall_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {row['achieved']:.4f} |")


if __name__ == "__main__":
    main()
