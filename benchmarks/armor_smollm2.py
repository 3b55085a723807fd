"""ARMOR 2:4 on the real SmolLM2-135M, by the evaluation protocol (GPU: the factorization is iterative).

fp32 model in CPU memory, blocks onloaded to ``--device``; ``sparsewise.methods.armor.armor(...)`` factorizes
every block linear as A . S . B (S 2:4, A and B block diagonal, 32 x 32 blocks), initialized
from the NoWag-P 2:4 mask as in the paper; calibration C4 64 x 512 (seed 0); ppl on WikiText-2
test (seqlen 512, 32 evenly spaced windows). Prints the proxy-loss reduction per layer type.

    python benchmarks/armor_smollm2.py --gguf PATH --wiki wiki.test.raw --c4 c4.jsonl [--iterations 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import transformers

import sparsewise as sw
from sparsewise.methods.armor import armor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--wiki", required=True)
    parser.add_argument("--c4", required=True)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/armor_smollm2.json")
    args = parser.parse_args()
    model, tok = sw.load_model(args.gguf)
    model = model.float()
    calib = sw.data.calibration(args.c4, tok, n=64, seqlen=512, seed=0)
    clock = time.perf_counter()
    infos = armor(model, calib, iterations=args.iterations, device=args.device, progress=False)
    wall = time.perf_counter() - clock
    model.to(args.device)
    ppl = sw.evaluate.perplexity(model, tok, args.wiki, seqlen=512, max_windows=32, progress=False).ppl
    by_type: dict[str, list[float]] = {}
    for name, info in infos.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(info["final_loss"] / info["initial_loss"])
    row = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "iterations": args.iterations, "layers": len(infos), "wall_s": round(wall, 1), "ppl": ppl,
           "proxy_loss_ratio_median": {key: round(statistics.median(values), 4) for key, values in by_type.items()},
           "mean_iterations_run": statistics.mean(info["iterations"] for info in infos.values())}
    print(json.dumps(row), flush=True)
    with open(args.json_out, "w") as handle:
        json.dump({**row, "layers_info": infos}, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
