"""One-shot pruning at 7B scale on the GPU: wall time and peak GPU memory (Wanda, SparseGPT).

A LLaMA-2-7B-shaped model (32 blocks, hidden 4096, MLP 11008, 32 heads, vocab 32000) with
random bf16 weights lives in CPU memory; ``sw.prune(..., device="cuda")`` onloads one block at
a time. Calibration: 128 x 2048 random token ids (time does not depend on values). The wall
time includes every forward pass. The bound printed next to the peak is one block's weights +
the block's calibration activations (input and MLP intermediate, bf16) + one fp32 Hessian of
the widest input (what the issue allows).

    python benchmarks/prune_scale.py [--methods wanda,sparsegpt] [--samples 128] [--seqlen 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers

import sparsewise as sw
from sparsewise.data import CalibrationSet

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def build(layers: int) -> torch.nn.Module:
    """The model on CPU in bf16; one block's random weights copied into every block (fast to build)."""
    config = transformers.LlamaConfig(**dict(LLAMA2_7B, num_hidden_layers=layers), torch_dtype=torch.bfloat16)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    first = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            key = name.split("layers.")[-1].split(".", 1)[-1] if "layers." in name else name
            if key not in first:
                first[key] = (torch.randn(param.shape, generator=gen) * 0.02).to(torch.bfloat16)
            param.copy_(first[key])
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers rebuilt off meta
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="wanda,sparsegpt", help="comma-separated; sparsegpt:torch / "
                        "sparsegpt:triton pick SparseGPT's column loop (plain sparsegpt: auto, Triton on CUDA)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--sequential", default="layer")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/prune_scale.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of the script only
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (f"{gpu} | torch {torch.__version__} | transformers {transformers.__version__} | "
              f"bf16 | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {args.layers} blocks, "
              f"{args.samples} x {args.seqlen} tokens, sequential={args.sequential}")
    print(header, flush=True)
    hidden, inter = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
    tokens = args.samples * args.seqlen
    bound_mb = ((4 * hidden * hidden + 3 * hidden * inter) * 2 + tokens * (hidden + inter) * 2
                + inter * inter * 4) / 2**20
    calibration = CalibrationSet(input_ids=torch.randint(0, LLAMA2_7B["vocab_size"], (args.samples, args.seqlen),
                                                         generator=torch.Generator().manual_seed(0)),
                                 source="random tokens")
    results = {"header": header, "bound_mb": bound_mb, "runs": []}
    for spec in args.methods.split(","):
        method, _, kernel = spec.partition(":")  # "sparsegpt:triton": the lazy-block Triton kernel
        clock = time.perf_counter()
        model = build(args.layers)
        build_s = time.perf_counter() - clock
        result = sw.prune(model, method=method, sparsity=0.5, calibration=calibration, device=device,
                          sequential=args.sequential, progress=False,
                          method_options={"kernel": kernel} if kernel else None)
        run = {"method": spec, "wall_s": result.wall_s, "peak_gpu_mb": result.peak_gpu_mb,
               "achieved_sparsity": result.achieved_sparsity, "build_s": build_s}
        results["runs"].append(run)
        print(f"{spec}: {result.wall_s:.1f} s (forwards included), peak GPU {result.peak_gpu_mb or 0:.0f} MB "
              f"(bound {bound_mb:.0f} MB), sparsity {result.achieved_sparsity:.4f} [model built in {build_s:.0f} s]",
              flush=True)
        del model
        with open(args.json_out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
