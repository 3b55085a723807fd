"""Where does the per-call cost of PyTorch's cuSPARSELt 2:4 linear go? (H200 probe)

Times, for a 2:4 fp16 weight [N, K] and activations [M, K]: dense F.linear; F.linear on
to_sparse_semi_structured (stock path); torch._cslt_sparse_mm called directly; and the same
call replayed from a CUDA graph (host work removed). Device events, medians of 50 after warm-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsewise.runtime.dispatch import capture, events_median


def timed(fn, reps=50, warmup=10):
    return events_median(fn, reps, warmup)


def graphed(fn):
    return capture(fn)[0]


def main() -> None:
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    for n, k in [(14336, 4096), (4096, 14336), (4096, 4096)]:
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16)
        mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(n, k // 4)
        weight = dense * mask
        sparse = to_sparse_semi_structured(weight)
        compressed = sparse.packed
        for m in (1, 16, 256, 2048, 8192):
            # cuSPARSELt needs the dense operand's dims in multiples of 16 (the stock path pads too)
            x = torch.randn(max(m, 16), k, device="cuda", dtype=torch.float16)
            t_dense = timed(lambda: F.linear(x, weight))
            t_stock = timed(lambda: F.linear(x, sparse))
            t_direct = timed(lambda: torch._cslt_sparse_mm(compressed, x.t()))
            try:
                alg = torch._cslt_sparse_mm_search(compressed, x.t())
            except Exception as exc:  # noqa: BLE001
                alg = f"search failed: {exc}"
            try:
                replay = graphed(lambda: torch._cslt_sparse_mm(compressed, x.t()))
                t_graph = timed(replay)
            except Exception as exc:  # noqa: BLE001
                t_graph = float("nan")
                print("graph capture failed:", exc)
            print(f"N={n} K={k} M={m}: dense {t_dense:.4f} ms | stock {t_stock:.4f} | direct {t_direct:.4f} | "
                  f"graph {t_graph:.4f} | alg {alg} | dense/graph {t_dense / t_graph:.2f}x")


if __name__ == "__main__":
    main()
