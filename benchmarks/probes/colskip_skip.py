"""Does the column-skipping kernel's time follow the weight rows it reads? (diagnostic probe)

gate/up shape (N=14336, K=4096), one activation row, CUDA-graph replays over L2-exceeding
copies. Skipped inputs: none, 50% / 90% scattered (|x| quantile), 50% as one contiguous half of
K, all (threshold +inf: no weight row is read at all). If the time does not drop with the
skipped share, the kernel is bound by something other than weight bytes.

    python benchmarks/probes/colskip_skip.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime_layers import L2_BYTES, bench_graph, gpu_header, warm_up_clocks  # noqa: E402

from sparsewise.kernels import triton_colskip as colskip  # noqa: E402

N, K = 14336, 4096
LAUNCHES = [((32, 128, 4, 3), 4), ((64, 128, 4, 1), 16), ((128, 128, 8, 1), 32), ((64, 256, 8, 3), 8)]


def main() -> None:
    dtype = torch.float16
    print(gpu_header("float16", "graph replay"), flush=True)
    warm_up_clocks(dtype)
    copies = max(2, -(-4 * L2_BYTES // (N * K * 2)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights_t = [colskip.transpose_weight(torch.randn(N, K, device="cuda", dtype=dtype, generator=gen) / K**0.5)
                 for _ in range(copies)]
    xs = [torch.randn(1, K, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
    dense = bench_graph(lambda i: xs[i] @ weights_t[i], copies)
    print(f"dense (x @ W^T layout, cuBLAS) {dense * 1e3:.1f} us", flush=True)
    magnitude = torch.stack([x.abs().float()[0] for x in xs]).amax(0)
    cases = {"none": torch.full((K,), -1.0, device="cuda"),
             "50% scattered": torch.full((K,), float(torch.quantile(magnitude, 0.5)), device="cuda"),
             "90% scattered": torch.full((K,), float(torch.quantile(magnitude, 0.9)), device="cuda"),
             "50% contiguous": torch.cat([torch.full((K // 2,), float("inf")), torch.full((K // 2,), -1.0)]).cuda(),
             "all": torch.full((K,), float("inf"), device="cuda")}
    for label, thresholds in cases.items():
        cells = []
        for config, split in LAUNCHES:
            for premask in (False, True):
                t = bench_graph(lambda i, c=config, s=split, p=premask: colskip.linear(
                    xs[i], weights_t[i], thresholds, split_k=s, config=c, premask=p), copies)
                cells.append(f"{config}s{split}{'p' if premask else ''} {t * 1e3:5.1f}")
        print(f"{label:15} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
