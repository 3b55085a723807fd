"""Probe: cuSPARSELt 2:4 time by formulation / output layout, cached plans, dense F.linear beside.

sparse_a: D = W x^T with D column-major (y row-major); sparse_a_t: D = y^T row-major (then a
transpose copy to get y); sparse_b: y = x W^T with W^T as the structured B operand, y row-major
natively. CUDA events, medians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsewise.kernels.cusparselt import CsltLinear, _Plan
from sparsewise.patterns import nm_mask
from sparsewise.runtime.dispatch import events_median


def timed(fn, reps=30):
    return events_median(fn, reps, warmup=5)


def main():
    burn = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(200):
        burn @ burn
    for n, k in [(14336, 4096), (4096, 14336), (4096, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w = w * nm_mask(w.abs().float(), 2, 4).half()
        lin = CsltLinear(w, mode="sparse_a")
        try:
            lin_b = CsltLinear(w, mode="sparse_b")
        except Exception as exc:  # noqa: BLE001
            lin_b = None
            print("sparse_b refused:", exc)
        for m in (256, 2048, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            col = _Plan(lin, m, 0, "sparse_a")
            row = _Plan(lin, m, 0, "sparse_a_t")
            y_col = torch.empty(m, n, device="cuda", dtype=torch.float16)
            y_row = torch.empty(n, m, device="cuda", dtype=torch.float16)
            ref = F.linear(x, w)
            col.run(lin.compressed, x, y_col)
            row.run(lin.compressed, x, y_row)
            err_col = ((y_col.float() - ref.float()).norm() / ref.float().norm()).item()
            err_row = ((y_row.t().float() - ref.float()).norm() / ref.float().norm()).item()
            t_dense = timed(lambda: F.linear(x, w))
            t_col = timed(lambda: col.run(lin.compressed, x, y_col))
            t_row = timed(lambda: row.run(lin.compressed, x, y_row))
            t_row_copy = timed(lambda: (row.run(lin.compressed, x, y_row), y_row.t().contiguous()))
            t_row_triton = timed(lambda: lin(x, transposed=True))
            cells = f" | row-major + Triton transpose {t_dense / t_row_triton:.2f}x"
            if lin_b is not None:
                y_b = lin_b(x)
                err_b = ((y_b.float() - ref.float()).norm() / ref.float().norm()).item()
                cells = f" | sparse_b {t_dense / timed(lambda: lin_b(x)):.2f}x (err {err_b:.1e})"
            print(f"N={n} K={k} M={m}: dense {t_dense*1e3:.0f}us | D col-major {t_dense/t_col:.2f}x (err {err_col:.1e}) | "
                  f"D row-major {t_dense/t_row:.2f}x (err {err_row:.1e}) | row-major + transpose copy "
                  f"{t_dense/t_row_copy:.2f}x" + cells, flush=True)


if __name__ == "__main__":
    main()
