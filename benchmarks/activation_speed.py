"""Activation-sparse decode on GPU: the column-skipping kernel vs dense cuBLAS, per layer and end to end.

Per layer: LLaMA-3-8B shapes, M in {1, 8} rows, activation sparsity {0, 25, 40, 50, 65}%:
random activations (never zeros), the threshold set to the |x| quantile giving the sparsity,
weights and inputs rotating over copies larger than L2; CUDA-graph replays, device events,
medians (METHOD.md). The kernel row is the best of a small launch sweep.
End to end: the LLaMA-3-8B-shaped decoder of runtime_e2e.py, every block linear an
ActivationSparseLinear with a TEAL threshold per linear calibrated on a 512-token prefill of
random tokens at each target; one decode step (batch 1) captured in a CUDA graph. Both again with
every weight 50% pruned: W^T held as bitmask planes, the kernel reading only surviving weights
of kept inputs (`triton_colskip.linear_packed`), against cuBLAS on the dense shape.

    python benchmarks/activation_speed.py [--layers-only] [--sparsities 0,0.25,0.4,0.5,0.65]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
from runtime_e2e import LLAMA3_8B, TINY, Decoder, prune_blocks
from runtime_layers import L2_BYTES, bench_graph, gpu_header, warm_up_clocks

from sparsewise.kernels import triton_colskip as colskip
from sparsewise.kernels.layouts import unpack
from sparsewise.patterns import unstructured_mask
from sparsewise.runtime import ActivationSparseLinear
from sparsewise.runtime.dispatch import capture, events_median

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_up": (14336, 4096), "down_proj": (4096, 14336)}
# (BLOCK_K, BLOCK_N, warps, stages): stages 3 stream W through cp.async (a masked-off row is a
# zero-fill copy), stages 1 use predicated plain loads (a masked-off row issues no request)
CONFIGS = [(64, 128, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3), (64, 128, 4, 1), (128, 128, 8, 1)]
# up to one K block per program (K/BLOCK_K splits): no loop-carried wait between the mask and
# the weight rows it selects, parallelism from programs instead
SPLITS = (1, 4, 16, 32)
PACKED_SPLITS = (1, 4, 16)


def layer_rows(sparsities: list[float], ms: list[int], dtype) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        gen = torch.Generator(device="cuda").manual_seed(0)
        weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5 for _ in range(copies)]
        transposed = [colskip.transpose_weight(w) for w in weights]
        # the same weights 50% pruned (per row), W^T as bitmask planes: activation- and weight-sparse
        packed = [colskip.pack_transposed(w * unstructured_mask(w.abs().float(), 0.5).to(dtype)) for w in weights]
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
            dense = bench_graph(lambda i: F.linear(xs[i], weights[i]), copies)
            for sparsity in sparsities:
                limit = float(torch.quantile(xs[0].abs().float().flatten(), sparsity)) if sparsity else -1.0
                thresholds = colskip.column_thresholds(limit, k, device="cuda")
                kept = torch.where(xs[0].abs().float() > thresholds, xs[0], torch.zeros((), dtype=dtype, device="cuda"))
                ref = F.linear(kept.double(), weights[0].double())
                best = None
                for config, split, premask in itertools.product(CONFIGS, SPLITS, (False, True)):
                    out = colskip.linear(xs[0], transposed[0], thresholds, split_k=split, config=config,
                                         premask=premask)
                    error = ((out.double() - ref).norm() / ref.norm()).item()
                    if not error < 1e-2:
                        raise AssertionError(f"{name} M={m} {config} s{split} p{premask:d}: relative error {error}")
                    t = bench_graph(lambda i, c=config, s=split, p=premask: colskip.linear(
                        xs[i], transposed[i], thresholds, split_k=s, config=c, premask=p), copies)
                    if best is None or t < best[0]:
                        best = (t, f"{config} s{split}{' premask' if premask else ''}", config, split, premask)
                pruned_ref = F.linear(kept.double(), unpack(packed[0]).double().t())  # unpack: W^T [K, N]
                both = None
                for split in PACKED_SPLITS:
                    out = colskip.linear_packed(xs[0], packed[0], thresholds, split_k=split)
                    error = ((out.double() - pruned_ref).norm() / pruned_ref.norm()).item()
                    if not error < 1e-2:
                        raise AssertionError(f"{name} M={m} packed s{split}: relative error {error}")
                    t = bench_graph(lambda i, s=split: colskip.linear_packed(xs[i], packed[i], thresholds, split_k=s),
                                    copies)
                    if both is None or t < both[0]:
                        both = (t, split)
                realized = float((kept == 0).float().mean())
                # columns no row keeps: the weight rows the kernel skips
                skipped = float((kept == 0).all(0).float().mean())
                rows.append({"layer": name, "N": n, "K": k, "M": m, "sparsity": sparsity, "realized": realized,
                             "skipped_columns": skipped, "dense_ms": dense, "colskip_ms": best[0],
                             "speedup": dense / best[0], "best": best[1], "config": best[2], "split_k": best[3],
                             "premask": best[4], "packed_ms": both[0], "packed_speedup": dense / both[0],
                             "packed_split_k": both[1]})
                print(f"{name:9} N={n:5} K={k:5} M={m} s={sparsity:.2f} (skip {skipped:.2f}) dense {dense * 1e3:6.1f}us "
                      f"colskip {best[0] * 1e3:6.1f}us {dense / best[0]:.2f}x [{best[1]}] | +50% weights "
                      f"{both[0] * 1e3:6.1f}us {dense / both[0]:.2f}x [s{both[1]}]", flush=True)
    return rows


def e2e_rows(sparsities: list[float], cfg: dict, dtype, launches: dict | None = None,
             pruned: bool = False) -> list[dict]:
    """``launches`` {(N, K): (config, split_k, premask)}: the layer sweep's best at batch 1 and 50%.
    ``pruned``: every block linear 50% unstructured first (dense baseline = the pruned weights
    through cuBLAS; the activation-sparse linears then hold W^T as bitmask planes)."""
    launches = launches or {}
    torch.manual_seed(0)
    model = Decoder(cfg, torch.device("cuda"), dtype).eval()
    if pruned:
        prune_blocks(model, "unstructured")
    prompt = 512
    gen = torch.Generator(device="cuda").manual_seed(1)
    model.reset_cache(1, prompt + 64)
    tokens = torch.randint(0, cfg["vocab"], (1, prompt), device="cuda", generator=gen)
    step_tokens = torch.randint(0, cfg["vocab"], (1, 1), device="cuda", generator=gen)
    position = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        model(tokens, torch.arange(prompt, device="cuda"))
        dense_replay, dense_logits = capture(lambda: model(step_tokens, position))
        dense_ms = events_median(dense_replay, 50)
        # |x| samples of every block linear's input on the prompt (TEAL calibration, random model)
        samples, handles = {}, []
        for block in model.blocks:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    handles.append(module.register_forward_pre_hook(
                        lambda mod, args: samples.__setitem__(mod, args[0].abs().float().flatten()[::7])))
        model.reset_cache(1, prompt + 64)
        model(tokens, torch.arange(prompt, device="cuda"))
        for handle in handles:
            handle.remove()
        swapped = {}
        for block in model.blocks:
            for name, module in list(block.named_children()):
                if isinstance(module, torch.nn.Linear):
                    # threshold 0 at construction: the kernel path (thresholds are refilled per target;
                    # at 0% the row times the kernel keeping everything, the runtime itself would use cuBLAS)
                    config, split, premask = launches.get(tuple(module.weight.shape), ((64, 128, 4, 3), 4, False))
                    sparse = ActivationSparseLinear(module.weight, None, torch.tensor(0.0), config=tuple(config),
                                                    split_k=split, premask=premask)
                    swapped[sparse] = samples[module]
                    setattr(block, name, sparse)
        samples.clear()  # the swapped layers keep their own samples
        torch.cuda.empty_cache()
        rows = []
        model.reset_cache(1, prompt + 64)
        model(tokens, torch.arange(prompt, device="cuda"))
        replay, logits = capture(lambda: model(step_tokens, position))
        for sparsity in sparsities:
            for sparse, sample in swapped.items():  # in place: the captured graph reads these buffers
                limit = float(torch.quantile(sample[: 1 << 24], sparsity)) if sparsity else -1.0
                sparse.thresholds.fill_(limit)
            step_ms = events_median(replay, 50)
            error = ((logits.float() - dense_logits.float()).norm() / dense_logits.float().norm()).item()
            rows.append({"weights": "50% unstructured" if pruned else "dense", "sparsity": sparsity, "dense_ms": dense_ms, "sparse_ms": step_ms,
                         "dense_tok_s": 1000 / dense_ms, "sparse_tok_s": 1000 / step_ms, "speedup": dense_ms / step_ms,
                         "logits_rel_err_vs_dense": error})
            print(f"e2e decode b1 {'50% pruned weights, ' if pruned else ''}s={sparsity:.2f}: dense {1000 / dense_ms:.1f} tok/s -> {1000 / step_ms:.1f} tok/s "
                  f"({dense_ms / step_ms:.2f}x), logits vs dense {error:.2e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.65")
    parser.add_argument("--ms", default="1,8")
    parser.add_argument("--layers-only", action="store_true")
    parser.add_argument("--e2e-only", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/activation_speed.json")
    args = parser.parse_args()
    dtype = torch.float16
    sparsities = [float(s) for s in args.sparsities.split(",")]
    header = gpu_header("float16", "graph replay")
    print(header, flush=True)
    warm_up_clocks(dtype)
    result = {"header": header}
    if not args.e2e_only:
        result["layers"] = layer_rows(sparsities, [int(m) for m in args.ms.split(",")], dtype)
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=1)
    if not args.layers_only:
        target = 0.5 if 0.5 in sparsities else max(sparsities)
        launches = {(row["N"], row["K"]): (row["config"], row["split_k"], row["premask"]) for row in result.get("layers", [])
                    if row["M"] == 1 and row["sparsity"] == target}
        cfg = TINY if args.tiny else LLAMA3_8B
        result["e2e"] = e2e_rows(sparsities, cfg, dtype, launches)
        torch.cuda.empty_cache()
        result["e2e"] += e2e_rows(sparsities, cfg, dtype, launches, pruned=True)
    with open(args.json_out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
