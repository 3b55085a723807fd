"""Activation-sparse decode on GPU: the CUDA kernels of kernels/decode.py vs dense cuBLAS, per layer and end to end.

Per layer: LLaMA-3-8B shapes, M in {1, 8} rows, activation sparsity {0, 25, 40, 50, 65}%:
random activations (never zeros), the threshold set to the |x| quantile giving the sparsity,
weights rotating over copies larger than 4x the L2; CUDA-graph replays, device events, medians
(METHOD.md; timing helpers of runtime_kernels.py). ``decode.act_gemv`` over the dense W^T, and
``decode.act_gemv_bitplanes`` over the same weights 50% pruned (W^T as bit planes: only the
surviving weights of kept inputs are read), each at its best K split count of a small sweep.
runtime_kernels.py times the same ops at M=1 (0/50/90%, 2:4 W^T) next to the weight-sparse GEMVs.
End to end: the LLaMA-3-8B-shaped decoder of runtime_e2e.py, every block linear an
ActivationSparseLinear with a TEAL threshold per linear calibrated on a 512-token prefill of
random tokens at each target; one decode step (batch 1) captured in a CUDA graph. Both again with
every weight 50% pruned (``weight_layout="bitmask"``), against cuBLAS on the pruned weights.

    python benchmarks/activation_speed.py [--layers-only] [--sparsities 0,0.25,0.4,0.5,0.65]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from runtime_e2e import LLAMA3_8B, TINY, Decoder, prune_blocks
from runtime_kernels import L2_ROTATE_BYTES, copy_bandwidth, header, rel_err, timed

from sparsewise.kernels import decode
from sparsewise.kernels.layouts import pack_bitplanes
from sparsewise.patterns import unstructured_mask
from sparsewise.runtime import ActivationSparseLinear
from sparsewise.runtime.dispatch import capture, events_median

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_up": (14336, 4096), "down_proj": (4096, 14336)}
SPLITS = (0, 8, 16, 32, 64)  # K splits asked per launch (0: the op's default, ~4 blocks per SM)


def _best(make, copies: int, n: int, k: int, ref: torch.Tensor, label: str) -> tuple[float, int]:
    """(ms, splits) of the fastest K split count; every candidate checked against ``ref`` first."""
    best = None
    for splits in sorted({decode.act_splits(k, n, requested) for requested in SPLITS}):  # what the op runs
        error = rel_err(make(0, splits)(), ref)
        if not error < 1e-2:
            raise AssertionError(f"{label} splits={splits}: relative error {error}")
        t = timed(lambda i, s=splits: make(i, s), copies)
        if best is None or t < best[0]:
            best = (t, splits)
    return best


def layer_rows(sparsities: list[float], ms: list[int], dtype) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-L2_ROTATE_BYTES // (n * k * 2)))
        gen = torch.Generator(device="cuda").manual_seed(0)
        weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5 for _ in range(copies)]
        transposed = [w.t().contiguous() for w in weights]
        # the same weights 50% pruned (per row), W^T as bit planes: activation- and weight-sparse
        pruned = [w * unstructured_mask(w.abs().float(), 0.5).to(dtype) for w in weights]
        planes = [pack_bitplanes(w.t().contiguous()) for w in pruned]
        offsets_t = [lay.offsets.t().contiguous() for lay in planes]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            dense = timed(lambda i: (lambda: F.linear(x, weights[i])), copies)
            for sparsity in sparsities:
                limit = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity else -1.0
                thresholds = torch.full((k,), limit, device="cuda")
                kept = torch.where(x.abs().float() > thresholds, x, torch.zeros((), dtype=dtype, device="cuda"))
                label = f"{name} M={m} s={sparsity:.2f}"

                def act(i, splits):
                    return lambda: decode.act_gemv(x, thresholds, transposed[i], None, splits)

                def act_planes(i, splits):
                    lay = planes[i]
                    return lambda: decode.act_gemv_bitplanes(x, thresholds, lay.values, lay.words, offsets_t[i],
                                                             None, n, splits)

                best = _best(act, copies, n, k, F.linear(kept.double(), weights[0].double()), label)
                both = _best(act_planes, copies, n, k, F.linear(kept.double(), pruned[0].double()),
                             label + " bitplanes")
                realized = float((kept == 0).float().mean())
                # columns no row keeps: the weight rows every launch skips
                skipped = float((kept == 0).all(0).float().mean())
                rows.append({"layer": name, "N": n, "K": k, "M": m, "sparsity": sparsity, "realized": realized,
                             "skipped_columns": skipped, "dense_ms": dense, "act_ms": best[0],
                             "speedup": dense / best[0], "splits": best[1], "packed_ms": both[0],
                             "packed_speedup": dense / both[0], "packed_splits": both[1]})
                print(f"{name:9} N={n:5} K={k:5} M={m} s={sparsity:.2f} (skip {skipped:.2f}) dense {dense * 1e3:6.1f}us "
                      f"act {best[0] * 1e3:6.1f}us {dense / best[0]:.2f}x [s{best[1]}] | +50% weights "
                      f"{both[0] * 1e3:6.1f}us {dense / both[0]:.2f}x [s{both[1]}]", flush=True)
    return rows


def e2e_rows(sparsities: list[float], cfg: dict, dtype, launches: dict | None = None,
             pruned: bool = False) -> list[dict]:
    """``launches`` {(N, K): (splits over dense W^T, splits over bit planes)}: the layer sweep's best at
    batch 1 and 50% (default: the op's own split count). ``pruned``: every block linear 50%
    unstructured first (dense baseline = the pruned weights through cuBLAS; the activation-sparse
    linears then hold W^T as bit planes)."""
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
                    splits = launches.get(tuple(module.weight.shape), (0, 0))[1 if pruned else 0]
                    sparse = ActivationSparseLinear(module.weight, None, torch.tensor(0.0),
                                                    weight_layout="bitmask" if pruned else "dense", splits=splits)
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
    print(header(), flush=True)
    print(f"# copy bandwidth {copy_bandwidth():.2f} TB/s (read + write; also clocks the GPU up)", flush=True)
    result = {"header": header()}
    if not args.e2e_only:
        result["layers"] = layer_rows(sparsities, [int(m) for m in args.ms.split(",")], dtype)
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=1)
    if not args.layers_only:
        target = 0.5 if 0.5 in sparsities else max(sparsities)
        launches = {(row["N"], row["K"]): (row["splits"], row["packed_splits"]) for row in result.get("layers", [])
                    if row["M"] == 1 and row["sparsity"] == target}
        cfg = TINY if args.tiny else LLAMA3_8B
        result["e2e"] = e2e_rows(sparsities, cfg, dtype, launches)
        torch.cuda.empty_cache()
        result["e2e"] += e2e_rows(sparsities, cfg, dtype, launches, pruned=True)
    with open(args.json_out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
