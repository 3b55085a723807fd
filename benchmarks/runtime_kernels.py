"""Per-layer speed of the CUDA C++ decode kernels against dense cuBLAS, LLaMA-3-8B shapes, one run.

For every shape (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336), row count M
and compiled variant: the kernel's output is checked against a float64 reference (fresh random
inputs, output poisoned first), then timed as CUDA-graph replays over enough weight copies to
exceed 4x the L2 (METHOD.md), medians of repeats; dense = F.linear on the same pruned weights.
Effective bandwidth counts the bytes the kernel must read (weights + x) over its time.

    python benchmarks/runtime_kernels.py [--shapes q,kv,gate,down] [--ms 1,2,4,8,16] [--json-out F]
    python benchmarks/runtime_kernels.py --skip weights,act --prefill-ms 2048   # cuSPARSELt prefill
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparsewise.kernels import decode
from sparsewise.kernels.layouts import pack_bitplanes, pack_rows24
from sparsewise.patterns import nm_mask, unstructured_mask
from sparsewise.runtime.dispatch import capture, events_median

SHAPES = {"q": (4096, 4096), "kv": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)}
L2_ROTATE_BYTES = 4 * 60 * 2**20


def header() -> str:
    from sparsewise.kernels import cuda

    props = torch.cuda.get_device_properties(0)
    lib = cuda._load_nvrtc()
    compiler = cuda._nvrtc_version(lib) if lib else "nvcc"
    return (f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"compiler {compiler}, fp16")


def copy_bandwidth() -> float:
    src = torch.randn(2**28, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = events_median(lambda: dst.copy_(src), repeats=20, warmup=3)
    return 2 * src.numel() * 2 / ms / 1e9  # TB/s, read + write


def timed(make_call, copies: int) -> float:
    """Median ms per call over graph replays of ``copies`` calls, each on its own weight copy."""
    calls = [make_call(i) for i in range(copies)]

    def step():
        for call in calls:
            call()

    replay, _ = capture(step, calls=1, warmup=2)
    return events_median(replay, repeats=9, warmup=2) / copies


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def checked(fn, ref: torch.Tensor) -> float:
    out = fn()
    if not torch.isfinite(out).all():
        return float("inf")
    return rel_err(out, ref)


def bench_weights(name: str, n: int, k: int, ms: list[int], rows: list, args) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=generator) * 0.02
    weights = {"2:4": dense * nm_mask(dense.abs(), 2, 4), "50%": dense * unstructured_mask(dense.abs(), 0.5)}
    weights = {kind: weight for kind, weight in weights.items() if kind in args.weights.split(",")}
    dense_bytes = n * k * 2
    copies = max(2, -(-L2_ROTATE_BYTES // (dense_bytes // 2)))
    for kind, weight in weights.items():
        dense_copies = [weight.clone() for _ in range(copies)]
        if kind == "2:4":
            layouts = [pack_rows24(w) for w in dense_copies]
            configs = decode.GEMV24_CONFIGS
        else:
            layouts = [pack_bitplanes(w) for w in dense_copies]
            configs = decode.BITPLANES_CONFIGS
        sparse_bytes = layouts[0].nbytes
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = F.linear(x.double(), weight.double())
            dense_ms = timed(lambda i: (lambda: F.linear(x, dense_copies[i])), copies)
            want = min(8, 1 << (m - 1).bit_length())
            best = None
            variants = [("gemv", c) for c in configs if c[0] in (want, want // 2) and not (m == 1 and c[0] != 1)]
            if kind == "2:4" and m >= 2:  # sparse tensor cores
                variants += [("tc", c) for c in decode.GEMV24_TC_CONFIGS if m <= 8 * c[1] and (c[1] == 1 or m > 8)]
            for backend, config in variants:
                if backend == "tc":
                    def make(i, config=config):
                        lay = layouts[i]
                        return lambda: decode.gemv24_tc(x, lay.values, lay.meta, None, n, list(config))
                elif kind == "2:4":
                    def make(i, config=config):
                        lay = layouts[i]
                        return lambda: decode.gemv24(x, lay.values, lay.meta, None, n, list(config))
                else:
                    def make(i, config=config):
                        lay = layouts[i]
                        return lambda: decode.gemv_bitplanes(x, lay.values, lay.words, lay.offsets, None, n, k,
                                                             list(config))
                err = checked(make(0), ref)
                try:
                    sparse_ms = timed(make, copies)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {name} {kind} M={m} {config}: {exc}", file=sys.stderr)
                    continue
                row = {"shape": name, "n": n, "k": k, "mode": kind, "m": m, "config": [backend, *config],
                       "sparse_us": sparse_ms * 1e3, "dense_us": dense_ms * 1e3, "ratio": dense_ms / sparse_ms,
                       "tbps": (sparse_bytes + m * k * 2) / sparse_ms / 1e9, "dense_tbps": dense_bytes / dense_ms / 1e9,
                       "rel_err": err, "bytes_ratio": sparse_bytes / dense_bytes}
                if args.all_configs:
                    rows.append(row)
                if best is None or row["ratio"] > best["ratio"]:
                    best = row
            if best is not None and not args.all_configs:
                rows.append(best)
            if best is not None:
                print(f"{name:5s} {kind:4s} M={m:<3d} {str(best['config']):14s} sparse {best['sparse_us']:7.1f} us  dense "
                      f"{best['dense_us']:7.1f} us  {best['ratio']:5.2f}x  {best['tbps']:.2f} TB/s (dense "
                      f"{best['dense_tbps']:.2f})  err {best['rel_err']:.1e}", flush=True)


def bench_activation(name: str, n: int, k: int, rows: list, args) -> None:
    generator = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=generator) * 0.02
    weight24 = weight * nm_mask(weight.abs(), 2, 4)
    copies = max(2, -(-L2_ROTATE_BYTES // (n * k)))
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    dense_copies = [weight.clone() for _ in range(copies)]
    dense_ms = timed(lambda i: (lambda: F.linear(x, dense_copies[i])), copies)
    weight_t = [w.t().contiguous() for w in dense_copies]
    planes = [pack_bitplanes(weight24.t().contiguous()) for _ in range(copies)]
    planes_offsets_t = [lay.offsets.t().contiguous() for lay in planes]
    rows24 = [pack_rows24(weight24.clone()) for _ in range(copies)]
    for sparsity in args.act_sparsities:
        if sparsity <= 0:
            thresholds = torch.full((k,), -1.0, device="cuda")
        else:
            thresholds = torch.full((k,), float(x.abs().float().quantile(sparsity)), device="cuda")
        kept = torch.where(x.abs().float() > thresholds, x, torch.zeros_like(x)).double()
        measured = float((kept == 0).double().mean())
        variants = [("act", weight, None), ("2:4+act", weight24, None)]
        variants += [("2:4 fused act", weight24, config) for config in ((1, 4, 4, 0), (1, 8, 4, 0))]
        for mode, weight_ref, config in variants:
            ref = F.linear(kept, weight_ref.double())
            if mode == "act":
                def make(i):
                    return lambda: decode.act_gemv(x, thresholds, weight_t[i], None, 0)
            elif config is None:
                def make(i):
                    lay, offsets_t = planes[i], planes_offsets_t[i]
                    return lambda: decode.act_gemv_bitplanes(x, thresholds, lay.values, lay.words, offsets_t,
                                                             None, n, 0)
            else:
                def make(i, config=config):
                    lay = rows24[i]
                    return lambda: decode.gemv24(x, lay.values, lay.meta, None, n, list(config), thresholds)
            err = checked(make(0), ref)
            sparse_ms = timed(make, copies)
            row = {"shape": name, "n": n, "k": k, "mode": f"{mode} {sparsity:.0%}", "m": 1, "config": list(config or []),
                   "sparse_us": sparse_ms * 1e3, "dense_us": dense_ms * 1e3, "ratio": dense_ms / sparse_ms,
                   "rel_err": err, "act_sparsity": measured}
            rows.append(row)
            print(f"{name:5s} {row['mode']:12s} M=1   sparse {row['sparse_us']:7.1f} us  dense {dense_ms * 1e3:7.1f} us  "
                  f"{row['ratio']:5.2f}x  err {err:.1e}  (zeros {measured:.2f})", flush=True)


def bench_prefill(name: str, n: int, k: int, ms: list[int], rows: list) -> None:
    """2:4 at prefill sizes through cuSPARSELt: library-default algorithm id vs our search, both
    output layouts (y written directly, or y^T + the Triton transpose), against dense cuBLAS."""
    from sparsewise.kernels.cusparselt import CsltLinear

    generator = torch.Generator(device="cuda").manual_seed(2)
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=generator) * 0.02
    weight = dense * nm_mask(dense.abs(), 2, 4)
    copies = max(2, -(-L2_ROTATE_BYTES // (n * k * 2)))
    dense_copies = [weight.clone() for _ in range(copies)]
    cslt = [CsltLinear(w) for w in dense_copies]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = F.linear(x.double(), weight.double())
        dense_ms = timed(lambda i: (lambda: F.linear(x, dense_copies[i])), copies)
        for transposed in (False, True):
            for searched in (False, True):
                found, search_s = {}, 0.0
                if searched:
                    started = time.perf_counter()
                    found = cslt[0].search(m, transposed=transposed)
                    search_s = time.perf_counter() - started
                    for other in cslt[1:]:
                        other.alg_ids.update(cslt[0].alg_ids)
                        other._plans.clear()

                def make(i, transposed=transposed):
                    return lambda: cslt[i](x, transposed=transposed)

                err = checked(make(0), ref)
                sparse_ms = timed(make, copies)
                label = ("y^T+transpose" if transposed else "y") + (f" alg {found['alg_id']}/{found['tried']}"
                                                                   if searched else " alg 0")
                row = {"shape": name, "n": n, "k": k, "mode": "2:4 cuSPARSELt", "m": m, "config": [label],
                       "sparse_us": sparse_ms * 1e3, "dense_us": dense_ms * 1e3, "ratio": dense_ms / sparse_ms,
                       "rel_err": err, "search_s": search_s, "faulted": found.get("faulted", [])}
                rows.append(row)
                print(f"{name:5s} 2:4 cuSPARSELt M={m:<5d} {label:24s} sparse {row['sparse_us']:8.1f} us  dense "
                      f"{row['dense_us']:8.1f} us  {row['ratio']:5.2f}x  err {err:.1e}"
                      + (f"  (search {search_s:.0f} s, faulted ids {found['faulted']})" if searched else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="q,kv,gate,down")
    parser.add_argument("--ms", default="1,2,4,8,16")
    parser.add_argument("--act-sparsities", default="0,0.5,0.9")
    parser.add_argument("--weights", default="2:4,50%", help="weight patterns timed: 2:4, 50%%")
    parser.add_argument("--skip", default="", help="comma list of: weights, act")
    parser.add_argument("--prefill-ms", default="", help="also time cuSPARSELt 2:4 at these row counts (e.g. 2048); "
                        "its algorithm search runs in this process, so keep it a run of its own")
    parser.add_argument("--all-configs", action="store_true", help="one row per variant, not only the best")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    args.act_sparsities = [float(s) for s in args.act_sparsities.split(",")]
    print(header())
    print(f"# copy bandwidth {copy_bandwidth():.2f} TB/s (read + write)", flush=True)
    rows: list[dict] = []
    ms = [int(m) for m in args.ms.split(",")]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        if "weights" not in args.skip:
            bench_weights(name, n, k, ms, rows, args)
        if "act" not in args.skip:
            bench_activation(name, n, k, rows, args)
        if args.prefill_ms:
            bench_prefill(name, n, k, [int(m) for m in args.prefill_ms.split(",")], rows)
    if rows:
        print(f"# median ratio over rows: {statistics.median(r['ratio'] for r in rows):.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"header": header(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
