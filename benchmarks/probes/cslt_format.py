"""Probe: dump cuSPARSELt's compressed 2:4 buffers for matrices whose kept values are unique
integers, so the value order and the metadata encoding can be decoded offline (CPU).

Why: holding both cuSPARSELt's copy (prefill) and the decode layout (Rows24) costs 1.125x dense;
if the decode kernel could read cuSPARSELt's buffer, 2:4 would stay at ~0.56x with both paths.

    python benchmarks/probes/cslt_format.py   # -> $OUT/cslt_format.safetensors
"""

from __future__ import annotations

import os

import safetensors.torch
import torch

from sparsewise.kernels.cusparselt import CsltLinear


def crafted(n: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    first = torch.randint(0, 3, (n, k // 4), generator=generator)
    second = first + 1 + (torch.rand(n, k // 4, generator=generator) * (3 - first)).long()
    keep.scatter_(-1, first.unsqueeze(-1), True)
    keep.scatter_(-1, second.clamp(max=3).unsqueeze(-1), True)
    values = torch.zeros(n, k)
    values[keep.reshape(n, k)] = torch.arange(1, int(keep.sum()) + 1, dtype=torch.float32)  # exact in fp16 (<= 2048)
    return values.half()


def main() -> None:
    tensors = {}
    for n, k in [(32, 64), (16, 128), (64, 64)]:
        weight = crafted(n, k, seed=n + k)
        tensors[f"dense_{n}x{k}"] = weight
        for mode in ("sparse_a", "sparse_b"):
            try:
                linear = CsltLinear(weight.cuda(), mode=mode)
            except Exception as exc:  # noqa: BLE001
                print(f"{mode} {n}x{k}: {exc}")
                continue
            tensors[f"{mode}_{n}x{k}"] = linear.compressed.view(torch.uint8).cpu().contiguous()
            print(f"{mode} {n}x{k}: {linear.compressed.numel() * linear.compressed.element_size()} bytes "
                  f"(dense fp16 {n * k * 2}, values {n * k})")
    path = os.path.join(os.environ.get("OUT", "."), "cslt_format.safetensors")
    safetensors.torch.save_file(tensors, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
