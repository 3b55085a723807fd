"""The real SmolLM2-135M pruned on the GPU, blocks onloaded from CPU: the quick end-to-end check
of the 7B path (benchmarks/prune_scale.py) on a real model, by the evaluation protocol.

fp32 model in CPU memory, ``sw.prune(..., device="cuda")``; calibration C4 64 x 512 (seed 0);
ppl on WikiText-2 test, seqlen 512, 32 evenly spaced windows, evaluated on the GPU in fp32.
The CPU rows of the same configurations are in RESULTS.md (oneshot_smollm2.py).

    python benchmarks/prune_smollm2_gpu.py --gguf PATH --wiki wiki.test.raw --c4 c4.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import transformers

import sparsewise as sw

CONFIGS = "wanda@0.5;sparsegpt@0.5;sparsegpt@2:4;sparsegpt@0.7+owl;sparsegpt@0.7"


def parse(spec: str) -> dict:
    """'sparsegpt@0.6+owl(lam=0.15)+dsnot+recon(epochs=20)' -> prune() keyword arguments."""
    method, _, rest = spec.partition("@")
    target, *extras = rest.split("+")
    kwargs = {"method": method, "pattern": target if ":" in target else "unstructured",
              "sparsity": None if ":" in target else float(target)}
    for extra in extras:
        name, _, options = extra.partition("(")
        parsed = {key: json.loads(value) for key, value in
                  (item.split("=") for item in options.rstrip(")").split(",") if item)}
        if name == "dsnot":
            kwargs.update(refine="dsnot", refine_options=parsed or None)
        elif name == "recon":
            kwargs.update(reconstruct=parsed or True)
        else:
            kwargs.update(allocation=name, allocation_options=parsed or None)
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--wiki", required=True)
    parser.add_argument("--c4", required=True)
    parser.add_argument("--configs", default=CONFIGS, help="';'-separated method@target[+allocation(k=v,...)][+dsnot][+recon(k=v,...)]")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/prune_smollm2_gpu.json")
    args = parser.parse_args()
    base, tok = sw.load_model(args.gguf)
    base = base.float()
    calib = sw.data.calibration(args.c4, tok, n=64, seqlen=512, seed=0)

    def ppl(model) -> float:
        model.to("cuda")
        value = sw.evaluate.perplexity(model, tok, args.wiki, seqlen=512, max_windows=32, progress=False).ppl
        model.to("cpu")
        return value

    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = [{"method": "dense", "ppl": ppl(copy.deepcopy(base))}]
    print(json.dumps(header), json.dumps(rows[0]), flush=True)
    for spec in args.configs.split(";"):
        model = copy.deepcopy(base)
        kwargs = parse(spec)
        result = sw.prune(model, calibration=calib, device="cuda", progress=False, **kwargs)
        row = {"config": spec, "wall_s": round(result.wall_s, 2), "peak_gpu_mb": round(result.peak_gpu_mb or 0),
               "achieved": round(result.achieved_sparsity, 4), "ppl": ppl(model)}
        if result.reconstruction:
            row["reconstruct"] = next(line for line in result.summary().splitlines() if line.startswith("block rec"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.json_out, "w") as handle:
            json.dump({**header, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
