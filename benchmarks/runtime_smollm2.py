"""Real-model check of the sparse runtime: pruned SmolLM2-135M on the GPU, dense-masked vs accelerated.

Wanda 2:4 (and 50% unstructured) with C4 calibration (32 x 512, seed 0), fp16 on CUDA; perplexity by
the project protocol (WikiText-2 test, seqlen 512, 32 evenly spaced windows) for the masked model
run densely and for the same weights through sparsewise.runtime.accelerate; then greedy generate
tokens/s at batch 1 (HF generate, eager: a 135M model is launch-bound, reported as measured).

    python benchmarks/runtime_smollm2.py --gguf PATH --wiki wiki.test.raw --c4 c4.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import sparsewise as sw
from sparsewise.runtime import accelerate


def tokens_per_second(model, tok, new_tokens: int = 128) -> float:
    prompt = tok("The history of the city", return_tensors="pt").to("cuda")
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        clock = time.perf_counter()
        out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
    return (out.shape[1] - prompt["input_ids"].shape[1]) / (time.perf_counter() - clock)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--wiki", required=True)
    parser.add_argument("--c4", required=True)
    parser.add_argument("--patterns", default="2:4,unstructured")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/runtime_smollm2.json")
    args = parser.parse_args()
    base, tok = sw.load_model(args.gguf)
    calib = sw.data.calibration(args.c4, tok, n=32, seqlen=512, seed=0)
    rows = []
    for pattern in args.patterns.split(","):
        model = copy.deepcopy(base)
        sw.prune(model, method="wanda", sparsity=0.5 if pattern == "unstructured" else None,
                 pattern=pattern, calibration=calib, device="cuda", progress=False)
        model.to("cuda", torch.float16)
        row = {"pattern": pattern}
        row["ppl_masked"] = sw.evaluate.perplexity(model, tok, args.wiki, seqlen=512, max_windows=32,
                                                   progress=False).ppl
        row["tok_s_masked"] = tokens_per_second(model, tok)
        report = accelerate(model, rows=(1,))
        row["accelerate"] = report.summary()
        row["ppl_accelerated"] = sw.evaluate.perplexity(model, tok, args.wiki, seqlen=512, max_windows=32,
                                                        progress=False).ppl
        row["tok_s_accelerated"] = tokens_per_second(model, tok)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.json_out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
