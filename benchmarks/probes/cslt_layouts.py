"""Probe: cuSPARSELt 2:4 time by output layout (y row-major = D column-major vs D = y^T row-major).

Cached plans through sparsewise.kernels.cusparselt; dense F.linear beside; CUDA events, medians.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsewise.kernels.cusparselt import CsltLinear, _Plan
from sparsewise.patterns import nm_mask


def timed(fn, reps=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


def main():
    burn = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(200):
        burn @ burn
    for n, k in [(14336, 4096), (4096, 14336), (4096, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w = w * nm_mask(w.abs().float(), 2, 4).half()
        lin = CsltLinear(w)
        for m in (256, 2048, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            col = _Plan(lin, m, 0, transposed_out=True)
            row = _Plan(lin, m, 0, transposed_out=False)
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
            print(f"N={n} K={k} M={m}: dense {t_dense*1e3:.0f}us | D col-major {t_dense/t_col:.2f}x (err {err_col:.1e}) | "
                  f"D row-major {t_dense/t_row:.2f}x (err {err_row:.1e}) | row-major + transpose copy "
                  f"{t_dense/t_row_copy:.2f}x", flush=True)


if __name__ == "__main__":
    main()
