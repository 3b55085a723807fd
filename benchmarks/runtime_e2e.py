"""End-to-end speed of the sparse runtime on a LLaMA-3-8B-shaped decoder, dense vs sparse, one run.

The model is a plain PyTorch LLaMA-style decoder with the exact LLaMA-3-8B shapes (32 blocks,
hidden 4096, MLP 14336, 32 query / 8 KV heads, vocab 128256, RMSNorm, rotary, SwiGLU, static
KV cache) and random fp16 weights: speed does not depend on the values. Every block linear is
pruned (magnitude 2:4, or 50% unstructured per row); embeddings and lm_head stay dense, as in
a pruned checkpoint. The dense baseline runs the same pruned weights through cuBLAS.

The decode loop of a real Hugging Face model is ``benchmarks/decode_hf.py`` (it supersedes the decode
part here); this script remains for prefill. Measured (CUDA events, medians): decode step at batch 1
and 8 after a 512-token prompt, replayed
from a CUDA graph (how serving stacks run decode; eager PyTorch would measure the Python
launch overhead instead), tokens/s = batch / step time; prefill latency of 2048 tokens (eager);
weight bytes on the GPU. ``sparsewise.runtime.tune`` measures the dispatch table first.

    python benchmarks/runtime_e2e.py [--patterns 2:4,unstructured] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparsewise.patterns import nm_mask, unstructured_mask
from sparsewise.runtime.dispatch import capture, events_median

LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256, "layers": 32}
TINY = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "vocab": 1000, "layers": 2}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, cfg: dict, device, dtype):
        super().__init__()
        hidden, heads, kv = cfg["hidden"], cfg["heads"], cfg["kv_heads"]
        self.heads, self.kv_heads, self.head_dim = heads, kv, hidden // heads

        def linear(n_in, n_out):
            return nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)

        self.q_proj, self.k_proj = linear(hidden, hidden), linear(hidden, kv * self.head_dim)
        self.v_proj, self.o_proj = linear(hidden, kv * self.head_dim), linear(hidden, hidden)
        self.gate_proj, self.up_proj = linear(hidden, cfg["intermediate"]), linear(hidden, cfg["intermediate"])
        self.down_proj = linear(cfg["intermediate"], hidden)
        self.norm1 = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.norm2 = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.k_cache = self.v_cache = None

    def reset_cache(self, batch: int, max_len: int) -> None:
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.norm1.device, dtype=self.norm1.dtype)
        self.v_cache = torch.zeros_like(self.k_cache)

    def forward(self, x, positions, cos, sin, mask):
        batch, length, hidden = x.shape
        h = rms_norm(x, self.norm1)
        q = self.q_proj(h).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(batch, length, hidden))
        h = rms_norm(x, self.norm2)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    def __init__(self, cfg: dict, device, dtype):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg["vocab"], cfg["hidden"], device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(cfg, device, dtype) for _ in range(cfg["layers"]))
        self.norm = nn.Parameter(torch.ones(cfg["hidden"], device=device, dtype=dtype))
        self.lm_head = nn.Linear(cfg["hidden"], cfg["vocab"], bias=False, device=device, dtype=dtype)
        head_dim = cfg["hidden"] // cfg["heads"]
        self.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        self.max_len = 0

    def reset_cache(self, batch: int, max_len: int) -> None:
        self.max_len = max_len
        for block in self.blocks:
            block.reset_cache(batch, max_len)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], positions [T] (long, on device): logits of the last position."""
        x = self.embed(tokens)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.arange(self.max_len, device=tokens.device)[None, :] <= positions[:, None]
        for block in self.blocks:
            x = block(x, positions, cos, sin, mask)
        return self.lm_head(rms_norm(x[:, -1:], self.norm))


def prune_blocks(model: Decoder, pattern: str) -> None:
    with torch.no_grad():
        for block in model.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    score = module.weight.abs().float()
                    mask = nm_mask(score, 2, 4) if pattern == "2:4" else unstructured_mask(score, 0.5)
                    module.weight.mul_(mask.to(module.weight.dtype))


def decode_step_ms(model: Decoder, batch: int, prompt: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median ms of one decode step (CUDA graph replay) after a ``prompt``-token prefill."""
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(1)
    model.reset_cache(batch, prompt + 64)
    with torch.no_grad():
        tokens = torch.randint(0, model.cfg["vocab"], (batch, prompt), device=device, generator=gen)
        model(tokens, torch.arange(prompt, device=device))
        step_tokens = torch.randint(0, model.cfg["vocab"], (batch, 1), device=device, generator=gen)
        position = torch.tensor([prompt], device=device)
        replay, logits = capture(lambda: model(step_tokens, position))
        reference = logits.float().clone()
        return events_median(replay, repeats), reference


def prefill_ms(model: Decoder, length: int, repeats: int) -> float:
    device = model.embed.weight.device
    model.reset_cache(1, length)
    tokens = torch.randint(0, model.cfg["vocab"], (1, length), device=device,
                           generator=torch.Generator(device=device).manual_seed(2))
    positions = torch.arange(length, device=device)
    with torch.no_grad():
        return events_median(lambda: model(tokens, positions), repeats, warmup=2)


def weight_bytes(model: nn.Module) -> dict:
    from sparsewise.runtime import SparseLinear

    linear = sparse = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            sparse += module.weight_nbytes
        elif isinstance(module, nn.Linear) and module is not model.lm_head:
            linear += module.weight.numel() * module.weight.element_size()
    return {"block_linear_bytes": linear + sparse}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patterns", default="2:4,unstructured")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--no-prefill-copy", action="store_true", help="accelerate(prefill=False): no cuSPARSELt copy")
    parser.add_argument("--rows", default="1",
                        help="accelerate(rows=...): the row counts a layer must win at to stay sparse (comma list)")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/runtime_e2e.json")
    args = parser.parse_args()
    cfg = dict(TINY if args.tiny else LLAMA3_8B, layers=args.layers if not args.tiny else TINY["layers"])
    header = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | fp16 | "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | cfg {cfg}")
    print(header, flush=True)
    results = {"header": header, "runs": []}
    for pattern in args.patterns.split(","):
        try:
            run_pattern(pattern, cfg, args, results)
        except Exception:  # noqa: BLE001 - keep the other pattern's numbers
            import traceback

            traceback.print_exc()
        torch.cuda.empty_cache()


def run_pattern(pattern: str, cfg: dict, args, results: dict) -> None:
    from sparsewise.runtime import accelerate

    device, dtype = torch.device("cuda"), torch.float16
    torch.manual_seed(0)
    model = Decoder(cfg, device, dtype).eval()
    prune_blocks(model, pattern)
    run = {"pattern": pattern, "dense": {}, "sparse": {}}
    refs = {}
    for batch in (1, 8):
        step, refs[batch] = decode_step_ms(model, batch, args.prompt, args.repeats)
        run["dense"][f"decode_b{batch}_ms"] = step
        run["dense"][f"decode_b{batch}_tok_s"] = batch * 1000 / step
    run["dense"]["prefill_ms"] = prefill_ms(model, args.prefill, max(5, args.repeats // 10))
    run["dense"].update(weight_bytes(model))
    # progress as it goes: a run cut off by a time limit still says how far it got
    print(f"{pattern}: dense decode b1 {run['dense']['decode_b1_tok_s']:.1f} tok/s, b8 "
          f"{run['dense']['decode_b8_tok_s']:.1f}, prefill {run['dense']['prefill_ms']:.1f} ms", flush=True)
    clock = time.perf_counter()
    report = accelerate(model, prefill=not args.no_prefill_copy, rows=tuple(int(r) for r in args.rows.split(",")))
    run["accelerate_s"] = time.perf_counter() - clock
    torch.cuda.empty_cache()
    clock = time.perf_counter()
    from sparsewise.runtime import tune

    # the prefill bucket too (cuSPARSELt or decompression), for the layers that stayed sparse
    run["dispatch"] = {key: {str(b): c for b, c in table.items()}
                       for key, table in tune(model, rows=(args.prefill,)).items()}
    run["tune_s"] = time.perf_counter() - clock
    print(f"{pattern}: accelerate {run['accelerate_s']:.1f} s, prefill dispatch tuned in {run['tune_s']:.1f} s\n"
          f"{report.summary()}", flush=True)
    for batch in (1, 8):
        step, logits = decode_step_ms(model, batch, args.prompt, args.repeats)
        run["sparse"][f"decode_b{batch}_ms"] = step
        run["sparse"][f"decode_b{batch}_tok_s"] = batch * 1000 / step
        run["sparse"][f"decode_b{batch}_logits_rel_err"] = ((logits - refs[batch]).norm()
                                                             / refs[batch].norm()).item()
    run["sparse"]["prefill_ms"] = prefill_ms(model, args.prefill, max(5, args.repeats // 10))
    run["sparse"].update(weight_bytes(model))
    run["memory_ratio_block_linears"] = run["sparse"]["block_linear_bytes"] / run["dense"]["block_linear_bytes"]
    run["report"] = report.summary()
    for name in ("decode_b1", "decode_b8", "prefill"):
        run[f"{name}_speedup"] = run["dense"][f"{name}_ms"] / run["sparse"][f"{name}_ms"]
    results["runs"].append(run)
    print(f"{pattern}: decode b1 {run['dense']['decode_b1_tok_s']:.1f} -> {run['sparse']['decode_b1_tok_s']:.1f} "
          f"tok/s ({run['decode_b1_speedup']:.2f}x) | b8 {run['dense']['decode_b8_tok_s']:.1f} -> "
          f"{run['sparse']['decode_b8_tok_s']:.1f} ({run['decode_b8_speedup']:.2f}x) | prefill {args.prefill} "
          f"{run['dense']['prefill_ms']:.1f} -> {run['sparse']['prefill_ms']:.1f} ms ({run['prefill_speedup']:.2f}x) "
          f"| block weights {run['memory_ratio_block_linears']:.3f}x | logits err "
          f"{run['sparse']['decode_b1_logits_rel_err']:.1e} | {report.summary()}", flush=True)
    with open(args.json_out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
