"""How far SparseGPT's fp32 column loops (torch, Triton) drift from a float64 run of the same algorithm.

Unstructured masks of lazy block k are chosen from weights updated by blocks 0..k-1, so float
rounding in the updates flips near-tied choices and each flip changes later updates: the masks of
two fp32 implementations can differ by more than rounding while solving the problem equally well.
This prints, per shape and pattern, the mask flips of each fp32 loop against float64 (first lazy
block and whole layer) and each loop's objective relative to float64's.

    python benchmarks/probes/sparsegpt_kernel_drift.py      # CUDA
"""

from __future__ import annotations

import torch

from sparsewise.solvers.sparsegpt import sparsegpt_prune


def main() -> None:
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for rows, cols, pattern in [(4096, 4096, "unstructured"), (4096, 11008, "unstructured"),
                                (11008, 4096, "2:4"), (1536, 576, "4:8")]:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(rows, cols, device="cuda", generator=g)
        x = torch.randn(4096, cols, device="cuda", generator=g)
        h = x.T @ x
        _, keep64, info64 = sparsegpt_prune(w, h, 0.5, pattern, compute_dtype=torch.float64)
        for kernel in ("torch", "triton"):
            _, keep, info = sparsegpt_prune(w, h, 0.5, pattern, kernel=kernel)
            first = float((keep[:, :128] != keep64[:, :128]).float().mean())
            whole = float((keep != keep64).float().mean())
            rel = info["recon_error"] / info64["recon_error"] - 1
            print(f"{rows}x{cols} {pattern:12s} {kernel:6s} flips vs fp64: first block {first:.2e}, "
                  f"layer {whole:.2e}; objective vs fp64 {rel:+.2e}")


if __name__ == "__main__":
    main()
