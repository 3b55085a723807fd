"""CoSpaDi vs low rank on real SmolLM2-135M layers, at equal stored values (CPU).

For a few block linears of SmolLM2-135M-Instruct, X^T X is gathered from C4 calibration text
(the fit) and, separately, from other C4 samples (held out). Each weight is factorized at the
same number of stored values by
  * low rank, whitened (truncated SVD of W L, H = L L^T: SVD-LLM's data-aware low rank), which is
    CoSpaDi with ``code_density`` 1, and
  * CoSpaDi (``sparsewise.solvers.cospadi``) at code densities 0.5 and 0.25,
and the relative output error tr(E H E^T) / tr(W H W^T) is reported on the held-out H. Indices
of the sparse codes are not counted in "values" (the paper's convention); the bytes column
counts them (uint16).

    python benchmarks/cospadi_layers.py [--compressions 0.3,0.5] [--layers 0.self_attn.q_proj,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPARSEWISE_SHARED_DATA", REPO.parent / "shared" / "data"))
C4 = DATA / "c4-en-train-00000-first1000" / "c4-train.00000-of-01024.first1000.jsonl"
LAYERS = "8.self_attn.q_proj,15.mlp.up_proj,15.mlp.down_proj"


def gram_matrices(model, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """X^T X of each named linear's inputs over ``batches`` (float64 sums)."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_module, args, name=name):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + rows.T @ rows

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=LAYERS, help="block-relative names under model.layers")
    parser.add_argument("--compressions", default="0.3", help="fractions of the layer's values removed")
    parser.add_argument("--densities", default="1.0,0.5,0.25", help="code densities (1.0 = whitened low rank)")
    parser.add_argument("--calib-n", type=int, default=32)
    parser.add_argument("--heldout-n", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    import transformers

    import sparsewise as sw
    from sparsewise.solvers.cospadi import cospadi_factorize, damped, data_error, dictionary_size

    torch.manual_seed(0)
    model, tok = sw.load_model("smollm2-135m")
    model.eval()
    calib = sw.data.calibration(C4, tok, n=args.calib_n + args.heldout_n, seqlen=args.seqlen, seed=0)
    ids = calib.input_ids
    fit_batches = list(ids[: args.calib_n].split(8))
    held_batches = list(ids[args.calib_n:].split(8))
    names = [f"model.layers.{name}" for name in args.layers.split(",")]
    fit = gram_matrices(model, fit_batches, names)
    held = gram_matrices(model, held_batches, names)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# SmolLM2-135M-Instruct fp32; X^T X from C4 {args.calib_n} x {args.seqlen} (fit) and "
          f"{args.heldout_n} x {args.seqlen} other samples (held out); {args.iterations} alternations; "
          "error = tr(E H E^T) / tr(W H W^T) on the held-out H (1% damping)")
    print("| layer | shape | removed | method | atoms | nonzeros/col | values kept | bytes vs fp16 dense | "
          "held-out error | fit error | s |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        out_features, in_features = weight.shape
        for compression in (float(c) for c in args.compressions.split(",")):
            for density in (float(d) for d in args.densities.split(",")):
                atoms, nonzeros = dictionary_size(out_features, in_features, 1.0 - compression, density)
                clock = time.perf_counter()
                factors = cospadi_factorize(weight, fit[name], atoms, nonzeros, iterations=args.iterations)
                seconds = time.perf_counter() - clock
                held_error = data_error(weight.double(), factors.product().double(), damped(held[name], 0.01))
                values = out_features * atoms + in_features * nonzeros
                index_bytes = 0 if density == 1.0 else 2 * in_features * nonzeros
                row = {"layer": name, "shape": [out_features, in_features], "compression": compression,
                       "method": "low rank (whitened SVD)" if density == 1.0 else f"CoSpaDi density {density}",
                       "atoms": atoms, "nonzeros": nonzeros, "values_kept": values / weight.numel(),
                       "bytes_vs_dense": (2 * values + index_bytes) / (2 * weight.numel()),
                       "heldout_error": held_error, "fit_error": factors.error, "seconds": seconds}
                rows.append(row)
                print(f"| {name.removeprefix('model.layers.')} | {out_features}x{in_features} | {compression:.0%} | "
                      f"{row['method']} | {atoms} | {nonzeros} | {row['values_kept']:.3f} | "
                      f"{row['bytes_vs_dense']:.3f} | {held_error:.3e} | {factors.error:.3e} | {seconds:.0f} |",
                      flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
