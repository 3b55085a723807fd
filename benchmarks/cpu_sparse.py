"""CPU: pruned linears and 1x1 convolutions, dense PyTorch vs the sparsewise CSR kernel vs torch.sparse.

Layers (out x in): TinyLlama-1.1B q/o 2048x2048, gate/up 5632x2048, down 2048x5632; SmolLM2-135M
gate/up 1536x576, down 576x1536; MobileNet-style 1x1 convolutions 256->256 at 28x28, 512->512 at
14x14, 1024->1024 at 7x7. Weights: random normal, magnitude-pruned per output row to each sparsity
(sparsewise.patterns.unstructured_mask); inputs random normal (never zero). Timed, interleaved
(dense, sparse, CSR, dense, ...): dense F.linear / F.conv2d on the pruned dense weight;
CpuSparseLinear (sparsewise.kernels.cpu_sparse, Elsen et al. 2020 "Fast Sparse ConvNets" layout);
torch.sparse_csr_tensor @ dense (built once, outside the timing). Medians over ``--repeats``
samples after warm-up, each sample a run of calls of >= 3 ms; a measurement whose interquartile
spread exceeds 25% is retaken (up to 4 times, the steadiest kept) and its spread printed: on a
shared virtual machine a descheduled vCPU stalls every multi-threaded call for ~8-16 ms at a time,
for seconds; ``--passes N`` measures everything N times and keeps, per row, the calmest pass.

"warm": one weight, re-read every call, so it stays in the caches when it fits (a dense 2048x2048
fp32 weight is 16 MiB: it fits this machine's L3). "cold" (linears): weights and inputs rotate over
enough copies to exceed 3x the L3, so every call streams its weight from memory, as in a model
whose layers together exceed the caches.

    python benchmarks/cpu_sparse.py [--threads 2,1] [--rows 1,8] [--sparsity 0.5,0.7,0.8,0.9] [--passes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from sparsewise.kernels import cpu_sparse
from sparsewise.patterns import unstructured_mask
from sparsewise.runtime.cpu_linear import CpuSparseLinear, relative_spread, steadiest_samples

LINEARS = {"tinyllama q/o": (2048, 2048), "tinyllama gate/up": (5632, 2048), "tinyllama down": (2048, 5632),
           "smollm2 gate/up": (1536, 576), "smollm2 down": (576, 1536)}
NOISY = 0.25
CONVS = {"mobilenet 1x1 256@28": (256, 28), "mobilenet 1x1 512@14": (512, 14), "mobilenet 1x1 1024@7": (1024, 7)}


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "logical cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core", "L2 cache",
                               "L3 cache", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def l3_bytes() -> int:
    path = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    try:
        text = open(path).read().strip().upper()
        return int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    except (OSError, ValueError):
        return 32 * 2**20


def pruned_weight(out_features: int, in_features: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=generator)
    if sparsity > 0:
        weight *= unstructured_mask(weight.abs(), sparsity)
    return weight


def torch_csr(layer: CpuSparseLinear) -> torch.Tensor:
    return cpu_sparse._torch_csr(layer.row_ptr, layer.cols, layer.values, layer.in_features)


def measure(calls: dict, repeats: int, warmup: int = 3) -> dict:
    """Median ms per call of each callable, the samples' worst relative spread (IQR / median) and
    the paired ratio dense/sparse (median over samples taken back to back, so a slow stretch of
    the machine hits both sides of most pairs)."""
    samples, spread = steadiest_samples(calls, repeats, min_sample_s=0.003, warmup=warmup, attempts=4)
    paired = statistics.median(d / s for d, s in zip(samples["dense"], samples["sparse"], strict=True))
    return {**{name: statistics.median(times) * 1e3 for name, times in samples.items()}, "spread": spread,
            "paired": paired, "sparse_spread": relative_spread(samples["sparse"])}


class LinearCase:
    """``copies`` pruned weights of one shape and sparsity, as dense, CpuSparseLinear and torch CSR."""

    def __init__(self, n: int, k: int, sparsity: float, copies: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.weights = [pruned_weight(n, k, sparsity, generator) for _ in range(copies)]
        self.bias = torch.randn(n, generator=generator)
        self.sparse = [CpuSparseLinear.from_weight(w, self.bias) for w in self.weights]
        self.csr = [torch_csr(layer) for layer in self.sparse]
        self.k, self.copies, self.generator = k, copies, generator

    def time(self, rows: int, repeats: int) -> dict:
        xs = [torch.randn(rows, self.k, generator=self.generator) for _ in range(self.copies)]
        weights, bias, sparse, csr = self.weights, self.bias, self.sparse, self.csr
        turn = {"dense": 0, "sparse": 0, "torch_csr": 0}

        def step(name):  # the next copy each call: with copies > 1 nothing stays cached between calls
            turn[name] = (turn[name] + 1) % self.copies
            return turn[name]

        def dense():
            i = step("dense")
            return F.linear(xs[i], weights[i], bias)

        def sparse_call():
            i = step("sparse")
            return sparse[i](xs[i])

        def csr_call():
            i = step("torch_csr")
            return (csr[i] @ xs[i].t()).t() + bias

        torch.testing.assert_close(sparse[0](xs[0]), F.linear(xs[0], weights[0], bias), rtol=1e-4, atol=1e-3)
        return {**measure({"dense": dense, "sparse": sparse_call, "torch_csr": csr_call}, repeats,
                          warmup=max(3, self.copies)), "density": sparse[0].density}


def time_conv(channels: int, side: int, sparsity: float, batch: int, repeats: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    weight = pruned_weight(channels, channels, sparsity, generator)
    bias = torch.randn(channels, generator=generator)
    layer = CpuSparseLinear.from_weight(weight, bias, conv=True)
    csr = torch_csr(layer)
    x = torch.randn(batch, channels, side, side, generator=generator)
    kernel = weight[:, :, None, None].contiguous()

    def csr_call():  # the images side by side as columns, as a CSR product needs them
        columns = x.permute(1, 0, 2, 3).reshape(channels, -1)
        out = (csr @ columns + bias[:, None]).reshape(channels, batch, side, side)
        return out.permute(1, 0, 2, 3).contiguous()

    torch.testing.assert_close(layer(x), F.conv2d(x, kernel, bias), rtol=1e-4, atol=1e-3)
    return {**measure({"dense": lambda: F.conv2d(x, kernel, bias), "sparse": lambda: layer(x),
                       "torch_csr": csr_call}, repeats), "density": layer.density}


def one_pass(threads: list[int], rows_list: list[int], sparsities: list[float], repeats: int, cold: bool
             ) -> list[dict]:
    records = []
    with torch.inference_mode():
        for count in threads:
            torch.set_num_threads(count)
            for name, (n, k) in LINEARS.items():
                cold_copies = max(2, -(-3 * l3_bytes() // (n * k * 4)))
                for sparsity in sparsities:
                    for regime, copies in [("warm", 1)] + ([("cold", cold_copies)] if cold else []):
                        case = LinearCase(n, k, sparsity, copies, seed=len(records))
                        for rows in rows_list:
                            records.append({"threads": count, "layer": name, "shape": f"{n}x{k}", "rows": rows,
                                            "sparsity": sparsity, "regime": regime, **case.time(rows, repeats)})
                        del case
            for name, (channels, side) in CONVS.items():
                for sparsity in sparsities:
                    for batch in rows_list:
                        result = time_conv(channels, side, sparsity, batch, repeats, seed=len(records))
                        records.append({"threads": count, "layer": name, "shape": f"{channels}x{channels}x{side}x{side}",
                                        "rows": batch, "sparsity": sparsity, "regime": "warm", **result})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=f"{torch.get_num_threads()},1")
    parser.add_argument("--rows", default="1,8", help="rows of x (linears) / batch (convolutions)")
    parser.add_argument("--sparsity", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--passes", type=int, default=1,
                        help="measure everything this many times, keep per row the calmest pass (shared machines)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (weights streamed) linear timings")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    sparsities = [float(s) for s in args.sparsity.split(",")]

    if cpu_sparse.load_extension() is None:
        print("WARNING: the C++ kernel is unavailable; 'sparse' below is the torch.sparse fallback")
    print("machine:", json.dumps(machine()))
    print(f"torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"default threads {torch.get_num_threads()}, kernel build {cpu_sparse.build_hash()}")
    print(f"settings: threads {threads}, rows {rows_list}, sparsity {sparsities}, repeats {args.repeats} "
          f"(medians, interleaved, samples >= 3 ms, warm-up first, retaken when unsteady), fp32, L3 {l3_bytes() // 2**20} MiB")
    started = time.perf_counter()
    passes = [one_pass(threads, rows_list, sparsities, args.repeats, not args.no_cold) for _ in range(args.passes)]
    # per row, the calmest pass (smallest dense + sparse time): every number of a row comes from one measurement
    records = [min(group, key=lambda r: r["dense"] + r["sparse"]) for group in zip(*passes, strict=True)]
    print(f"measured in {time.perf_counter() - started:.0f} s ({args.passes} pass(es); per row the calmest)\n")
    print("ratios: dense median / other median (> 1: faster than dense); paired: median of per-sample ratios;")
    print(f"spread: worst IQR/median of the three timings (rows over {NOISY:.0%} are marked '?': the machine "
          "moved under them)\n")
    print("| threads | layer | shape | rows | sparsity | regime | dense ms | sparse ms | torch CSR ms "
          "| dense/sparse | paired | dense/CSR | spread |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        flag = " ?" if r["spread"] > NOISY else ""
        print(f"| {r['threads']} | {r['layer']} | {r['shape']} | {r['rows']} | {r['sparsity']:.1f} | {r['regime']} "
              f"| {r['dense']:.3f} | {r['sparse']:.3f} | {r['torch_csr']:.3f} | **{r['dense'] / r['sparse']:.2f}** "
              f"| {r['paired']:.2f} | {r['dense'] / r['torch_csr']:.2f} | {r['spread']:.2f}{flag} |")
    print("\ndense/sparse by sparsity (sparse kernel; in parentheses torch CSR):\n")
    print("| threads | layer | shape | rows | regime | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|---|---|---|" + "---|" * len(sparsities))
    table: dict[tuple, dict[float, dict]] = {}
    for r in records:
        table.setdefault((r["threads"], r["layer"], r["shape"], r["rows"], r["regime"]), {})[r["sparsity"]] = r
    for (count, layer, shape, rows, regime), cells in table.items():
        text = " | ".join(f"{cells[s]['dense'] / cells[s]['sparse']:.2f} ({cells[s]['dense'] / cells[s]['torch_csr']:.2f})"
                          + (" ?" if cells[s]["spread"] > NOISY else "") for s in sparsities)
        print(f"| {count} | {layer} | {shape} | {rows} | {regime} | {text} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine(), "torch": torch.__version__, "records": records}, handle, indent=1)


if __name__ == "__main__":
    main()
