"""Per-layer time of sparse linears vs dense cuBLAS on GPU, as ratios to dense (medians).

Shapes: LLaMA-3-8B (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336) and
LLaMA-2-7B (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008). Backends, same run:
dense F.linear; stock torch.sparse.to_sparse_semi_structured (cuSPARSELt, plan per call);
sparsewise cuSPARSELt with cached plans (kernels/cusparselt.py, default algorithm: PyTorch's
algorithm search corrupted the CUDA context on the H200, see benchmarks/notes/runtime_kernels.md);
sparsewise Triton planes kernels, 2:4 and 50% unstructured bitmask, over a small sweep of
launch configs (the best one is what the runtime's measured dispatch would pick).
Random weights made 2:4 / 50% unstructured, random activations (never zeros); weights and
inputs rotate over enough copies to exceed the L2 cache, so every call reads from HBM.
Dense and sparsewise are timed as CUDA-graph replays of many calls (device events, median per
call: the GPU time a captured decode step pays; ``--eager`` for do_bench on eager calls); the
stock path is timed eagerly, as its users call it (its cost is host-side plan set-up).

    python benchmarks/runtime_layers.py [--ms 1,2,4,8,16,64,256,2048,8192] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from sparsewise.kernels import pack_24, pack_unstructured
from sparsewise.kernels import triton_planes as planes
from sparsewise.kernels.cusparselt import CsltLinear
from sparsewise.patterns import nm_mask, unstructured_mask
from sparsewise.runtime.dispatch import capture, events_median
from sparsewise.runtime.sparse_linear import planes_choices

SHAPES = {
    "llama3-8b": {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_up": (14336, 4096),
                  "down_proj": (4096, 14336)},
    # LLaMA-2-7B's q/k/v/o are 4096x4096, the same shape as LLaMA-3's q/o above
    "llama2-7b": {"gate_up": (11008, 4096), "down_proj": (4096, 11008)},
}
L2_BYTES = 60 * 2**20


def planes_variants(kind: str, m: int, k: int, width: int) -> list[tuple[str, dict]]:
    """The launches the runtime's dispatch times (runtime.sparse_linear.planes_choices), labelled."""
    tiles = -(-k // (32 * width))
    variants = []
    for choice in planes_choices(kind, m, width, tiles):
        path = "dot" if choice["use_dot"] else "select" if choice["xselect"] else "fma"
        kwargs = {key: choice[key] for key in ("use_dot", "xselect", "split_k")}
        variants.append((f"{path} s{choice['split_k']} {tuple(choice['config'])}",
                         {**kwargs, "config": tuple(choice["config"])}))
    return variants


def bench(fn, copies: int) -> float:
    # first calls (plan set-up, compilation) stay out of do_bench's own estimate of the per-call time
    for i in range(2 * copies):
        fn(i % copies)
    torch.cuda.synchronize()
    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=10, rep=40, return_mode="median")


def bench_graph(fn, copies: int, reps: int = 10) -> float:
    """Per-call GPU time (ms) from a CUDA graph of calls cycling over the copies: what a captured
    decode step pays, without Python launch gaps (METHOD.md: time graph replays of small launches)."""
    calls = max(copies, 12)
    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1

    replay, _ = capture(step, calls, warmup=2 * copies)
    return events_median(replay, reps) / calls


def gpu_header(dtype_name: str, timing: str) -> str:
    """One line naming the GPU, versions, dtype, timing method and date (every GPU benchmark prints it)."""
    return (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
            f"{dtype_name} | {timing} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def warm_up_clocks(dtype: torch.dtype, seconds: float = 2.0) -> None:
    """Clocks up before the first timed call (the GPU idles at a few hundred MHz)."""
    burn = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        burn @ burn
    torch.cuda.synchronize()


def check(out: torch.Tensor, ref: torch.Tensor) -> float:
    error = ((out.double() - ref).norm() / ref.norm()).item()
    if not error < 1e-2:
        raise AssertionError(f"wrong result: relative error {error}")
    return error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,2,4,8,16,64,256,2048,8192")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--models", default="llama3-8b,llama2-7b")
    parser.add_argument("--max-planes-m", type=int, default=64)
    parser.add_argument("--layers", default="", help="comma-separated layer names to keep (default: all)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock path (0.5-1 ms per call)")
    parser.add_argument("--eager", dest="graph", action="store_false",
                        help="time eager calls (do_bench) instead of CUDA-graph replays for dense and sparsewise")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/runtime_layers.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    ms = [int(v) for v in args.ms.split(",")]
    header = gpu_header(args.dtype, "graph replay" if args.graph else "eager do_bench")
    print(header, flush=True)
    warm_up_clocks(dtype)
    rows = []
    for model in args.models.split(","):
        for name, (n, k) in SHAPES[model].items():
            if args.layers and name not in args.layers.split(","):
                continue
            dense_bytes = n * k * 2
            copies = max(2, -(-4 * L2_BYTES // dense_bytes))
            gen = torch.Generator(device="cuda").manual_seed(0)
            dense_w, w24, wbm, l24, lbm, stock, cslt = [], [], [], [], [], [], []
            for _ in range(copies):
                w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
                a = w * nm_mask(w.abs().float(), 2, 4)
                b = w * unstructured_mask(w.abs().float(), 0.5)
                dense_w.append(w)
                w24.append(a)
                wbm.append(b)
                l24.append(pack_24(a))
                lbm.append(pack_unstructured(b))
                stock.append(torch.sparse.to_sparse_semi_structured(a))
                cslt.append(CsltLinear(a))
            for m in ms:
                xs = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
                ref24 = F.linear(xs[0].double(), w24[0].double())
                refbm = F.linear(xs[0].double(), wbm[0].double())
                row = {"model": model, "layer": name, "N": n, "K": k, "M": m,
                       "bytes_dense": dense_bytes, "bytes_24": l24[0].nbytes, "bytes_bitmask": lbm[0].nbytes,
                       "bytes_cslt": cslt[0].nbytes}
                timer = bench_graph if args.graph else bench
                row["dense_ms"] = t_dense = timer(lambda i: F.linear(xs[i], dense_w[i]), copies)
                if not args.no_stock:
                    check(F.linear(xs[0], stock[0]), ref24)
                    row["stock_ms"] = bench(lambda i: F.linear(xs[i], stock[i]), copies)  # eager: as users call it
                for transposed in (False, True):  # y row-major from cuSPARSELt, or y^T + Triton transpose
                    check(cslt[0](xs[0], transposed=transposed), ref24)
                    t = timer(lambda i, transposed=transposed: cslt[i](xs[i], transposed=transposed), copies)
                    row[f"cslt_{'yt' if transposed else 'y'}_ms"] = t
                    if t < row.get("cslt_ms", float("inf")):
                        row["cslt_ms"], row["cslt_layout"] = t, "y^T+transpose" if transposed else "y"
                if m <= args.max_planes_m:
                    for kind, layouts, ref in (("24", l24, ref24), ("bitmask", lbm, refbm)):
                        best = None
                        for label, kwargs in planes_variants(kind, m, k, layouts[0].width):
                            try:
                                check(planes.linear(xs[0], layouts[0], **kwargs), ref)
                                t = timer(lambda i: planes.linear(xs[i], layouts[i], **kwargs), copies)
                            except Exception as exc:  # noqa: BLE001 - e.g. a config over the shared-memory limit
                                row[f"planes_{kind} {label}"] = f"failed: {str(exc)[:100]}"
                                continue
                            row[f"planes_{kind} {label}"] = t
                            if best is None or t < best[1]:
                                best = (label, t)
                        if best is not None:
                            row[f"planes_{kind}_ms"], row[f"planes_{kind}_best"] = best[1], best[0]
                rows.append(row)
                cells = [f"dense {t_dense * 1e3:7.1f}us"]
                for key in ("stock", "cslt", "planes_24", "planes_bitmask"):
                    if f"{key}_ms" in row:
                        cells.append(f"{key} {t_dense / row[key + '_ms']:.2f}x")
                best_labels = " | ".join(row.get(f"planes_{kind}_best", "") for kind in ("24", "bitmask"))
                print(f"{model:9} {name:9} N={n:5} K={k:5} M={m:4} " + " ".join(cells) + f"  [{best_labels}]",
                      flush=True)
                with open(args.json_out, "w") as handle:  # after every row: a cut-off run keeps what it measured
                    json.dump({"header": header, "rows": rows}, handle, indent=1)
    with open(args.json_out, "w") as handle:
        json.dump({"header": header, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
