"""Compare the pruned layers of two sparsewise checkpoints: mask agreement and weight difference.

Used to check that a torchrun run over N GPUs prunes like one process:
    python benchmarks/probes/compare_masks.py OUT_1GPU OUT_2GPU
"""

from __future__ import annotations

import json
import sys

import sparsewise as sw
from sparsewise.records import get_records


def main(first: str, second: str) -> None:
    model_a, model_b = sw.load(first), sw.load(second)
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    names = sorted(get_records(model_a))
    if sorted(get_records(model_b)) != names:
        raise SystemExit("the checkpoints prune different layers")
    differing = total = 0
    max_diff = 0.0
    identical_layers = 0
    for name in names:
        weight_a, weight_b = modules_a[name].weight.detach(), modules_b[name].weight.detach()
        flips = int(((weight_a != 0) != (weight_b != 0)).sum())
        differing += flips
        total += weight_a.numel()
        identical_layers += flips == 0
        max_diff = max(max_diff, float((weight_a - weight_b).abs().max()))
    print(json.dumps({"layers": len(names), "layers_with_identical_masks": identical_layers,
                      "mask_entries_differing": differing, "mask_entries": total,
                      "max_abs_weight_diff": max_diff}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
