"""Layer-wise allocation and mask correction on the real SmolLM2-135M, by the evaluation protocol.

Rows: Wanda and SparseGPT at 70% unstructured (where allocation matters most; OWL's paper
targets 70%) with allocation uniform / ER / OWL (M=5, lambda=0.08) / Tyr-style search /
ECoFLaP (first-order), and DSnoT on top of uniform and OWL. C4 calibration 64 x 512 (seed 0),
WikiText-2 test ppl (seqlen 512, 32 evenly spaced windows), fp32 CPU. Each row runs in its own
process (benchmarks/oneshot_smollm2.py --only ...), so time and memory belong to that run.

    python benchmarks/allocation_smollm2.py [--sparsity 0.7] [--rows wanda:owl,wanda:uniform+dsnot]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from oneshot_smollm2 import REPO, cpu_header

ROWS = ["wanda:uniform", "wanda:er", "wanda:owl", "wanda:tyr", "wanda:ecoflap", "wanda:uniform+dsnot",
        "wanda:owl+dsnot", "sparsegpt:uniform", "sparsegpt:owl"]
OPTIONS = {"owl": {"m": 5, "lam": 0.08}, "ecoflap": {"score": "first"}, "tyr": {"levels": 2, "step": 0.05}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--json-out", type=Path, default=REPO / ".bench" / "allocation_smollm2.json")
    args = parser.parse_args()
    header = cpu_header(f"SmolLM2-135M-Instruct fp32 CPU; calibration C4 {args.calib_n} x 512 seed 0; eval WikiText-2 "
                        f"test seqlen 512, {args.windows} windows; {args.sparsity:.0%} unstructured (per row)")
    done = json.loads(args.json_out.read_text()) if args.json_out.is_file() else {"header": header, "rows": []}
    for spec in args.rows.split(","):
        method, _, rest = spec.partition(":")
        allocation, _, refine = rest.partition("+")
        key = f"{method}:{allocation}{'+' + refine if refine else ''}@{args.sparsity}"
        if any(row.get("key") == key for row in done["rows"]):
            continue
        argv = [sys.executable, str(REPO / "benchmarks" / "oneshot_smollm2.py"), "--only", f"{method}:unstructured",
                f"--sparsity={args.sparsity}", f"--windows={args.windows}", f"--calib-n={args.calib_n}",
                f"--allocation={allocation}", f"--allocation-options={json.dumps(OPTIONS.get(allocation, {}))}"]
        if refine:
            argv.append(f"--refine={refine}")
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{key} failed:\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        row = {"key": key, **json.loads(out.stdout.strip().splitlines()[-1])}
        done["rows"].append(row)
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(done, indent=2))
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("\n".join(f"{k}: {v}" for k, v in done["header"].items()) + "\n")
    print("| method | allocation | refine | ppl | layer sparsity range | achieved | prune wall s | DSnoT swaps |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for row in done["rows"]:
        method, _, rest = row["key"].partition(":")
        allocation, _, refine = rest.split("@")[0].partition("+")
        print(f"| {method} | {allocation} | {refine or '-'} | {row['ppl']:.2f} | {row['layer_min']:.3f}-"
              f"{row['layer_max']:.3f} | {row['achieved']:.4f} | {row['prune_wall_s']:.0f} | {row['swaps']} |")


if __name__ == "__main__":
    main()
