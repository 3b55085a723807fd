"""Per-layer time of sparse linears vs dense cuBLAS on GPU, as ratios to dense (medians).

Shapes: LLaMA-3-8B (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336) and
LLaMA-2-7B (4096x4096, gate/up 11008x4096, down 4096x11008). Backends: dense F.linear; stock
torch.sparse.to_sparse_semi_structured (cuSPARSELt); sparsewise Triton 2:4 and 50% bitmask.
Random fp16 weights made 2:4 / 50% unstructured, random activations (never zeros); weights are
rotated over enough copies to exceed the L2 cache, so every call reads from HBM.

    python benchmarks/runtime_layers.py [--ms 1,2,4,8,16,64] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from sparsewise.kernels import pack_24, pack_bitmask_tiles
from sparsewise.kernels.triton_gemv import gemv
from sparsewise.kernels.triton_sparse import linear as triton_linear
from sparsewise.patterns import nm_mask, unstructured_mask

SHAPES = {
    "llama3-8b": {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "o_proj": (4096, 4096),
                  "gate_up": (14336, 4096), "down_proj": (4096, 14336)},
    "llama2-7b": {"q_proj": (4096, 4096), "gate_up": (11008, 4096), "down_proj": (4096, 11008)},
}
L2_BYTES = 60 * 2**20


def bench(fn, copies: int) -> float:
    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,2,4,8,16,64")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--models", default="llama3-8b,llama2-7b")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/runtime_layers.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    ms = [int(v) for v in args.ms.split(",")]
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype}")
    rows = []
    for model in args.models.split(","):
        for name, (n, k) in SHAPES[model].items():
            dense_bytes = n * k * 2
            copies = max(2, -(-4 * L2_BYTES // dense_bytes))
            gen = torch.Generator(device="cuda").manual_seed(0)
            dense_w, w24, wbm, l24, lbm = [], [], [], [], []
            for _ in range(copies):
                w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
                a = w * nm_mask(w.abs().float(), 2, 4)
                b = w * unstructured_mask(w.abs().float(), 0.5)
                dense_w.append(w)
                w24.append(a)
                l24.append(pack_24(a))
                lbm.append(pack_bitmask_tiles(b))
                wbm.append(b)
            for m in ms:
                xs = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
                t_dense = bench(lambda i: F.linear(xs[i], dense_w[i]), copies)
                kernel = gemv if m <= 8 else triton_linear
                t_24 = bench(lambda i: kernel(xs[i], l24[i]), copies)
                t_bm = bench(lambda i: kernel(xs[i], lbm[i]), copies)
                row = {"model": model, "layer": name, "N": n, "K": k, "M": m, "dense_ms": t_dense,
                       "triton_24_ms": t_24, "triton_bitmask_ms": t_bm,
                       "speedup_24": t_dense / t_24, "speedup_bitmask": t_dense / t_bm,
                       "bytes_24": l24[0].nbytes, "bytes_bitmask": lbm[0].nbytes, "bytes_dense": dense_bytes}
                rows.append(row)
                print(f"{model:9} {name:9} N={n:5} K={k:5} M={m:3} dense {t_dense * 1e3:7.1f} us | "
                      f"2:4 {t_24 * 1e3:7.1f} us {row['speedup_24']:.2f}x | bitmask {t_bm * 1e3:7.1f} us "
                      f"{row['speedup_bitmask']:.2f}x | dense BW {dense_bytes / t_dense / 1e9:.0f} GB/s", flush=True)
    with open(args.json_out, "w") as handle:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
