"""Mixture-of-experts pruning on tiny random MoEs of every family the installed transformers builds.

Only tiny random MoEs exist offline here (no MoE checkpoint ships via PyPI), so the numbers compare
methods on the same random weights, not model quality. Per family (tests/tiny_moe.py: 2 blocks,
4 experts, top-2, hidden 64), calibration = random token ids 8 x 32 (seed 0), held-out batch =
random token ids 8 x 32 (seed 1):

* SparseGPT 50% unstructured, routed-only statistics (default) vs all-expert calibration
  (``calibrate_all_experts()``): relative reconstruction error of every expert matrix on the
  held-out tokens the dense router sends it, ||(W_pruned - W) X^T||^2 / ||W X^T||^2, median /
  min / max over the 16 expert matrices; coverage of the expert parameters achieved.
* expert_drop 25% against magnitude 25% on the expert matrices only (the same number of expert
  weights gone): KL(dense || pruned) per token and top-1 agreement of the logits on the held-out
  batch (``FidelityProbe``). A random-init model's logits are nearly flat, so KL values are tiny;
  top-1 agreement is the readable column.

    python benchmarks/moe_tiny.py            # ~40 s on 2 idle CPU cores
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oneshot_smollm2 import cpu_header  # noqa: E402
from tiny_moe import MOE_FAMILIES, build_tiny_moe  # noqa: E402  (the tests' tiny configs)

import sparsewise as sw  # noqa: E402
from sparsewise.evaluate import FidelityProbe  # noqa: E402
from sparsewise.models import ModelAdapter  # noqa: E402
from sparsewise.models.adapters import ExpertLayer  # noqa: E402
from sparsewise.models.experts import calibrate_all_experts  # noqa: E402

VOCAB = 256
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def expert_layers(model: torch.nn.Module) -> dict[str, ExpertLayer]:
    return {name: layer for name, layer in ModelAdapter(model).prunable_layers().items()
            if isinstance(layer, ExpertLayer)}


@torch.no_grad()
def routed_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs each expert matrix receives from the router on ``ids`` ([tokens, in])."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, layer in expert_layers(model).items():
        def keep(_module, args, name=name):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(layer.module.register_forward_pre_hook(keep))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def reconstruction_errors(model, dense_weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> list[float]:
    errors = []
    for name, layer in expert_layers(model).items():
        if name not in inputs:
            continue
        x, dense = inputs[name], dense_weights[name]
        reference = x @ dense.T
        errors.append(float((x @ (layer.get_weight() - dense).T).pow(2).sum() / reference.pow(2).sum()))
    return errors


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def family_row(family: str) -> dict[str, str]:
    dense = build_tiny_moe(family)
    dense_weights = {name: layer.get_weight().clone() for name, layer in expert_layers(dense).items()}
    inputs = routed_inputs(dense, HELD_OUT)
    probe = FidelityProbe.capture(dense, HELD_OUT)
    row: dict[str, str] = {"family": family}
    for label, context in (("routed", None), ("all experts", calibrate_all_experts)):
        model = build_tiny_moe(family)
        if context is None:
            result = sw.prune(model, "sparsegpt", 0.5, calibration=CALIB, progress=False)
        else:
            with context():
                result = sw.prune(model, "sparsegpt", 0.5, calibration=CALIB, progress=False)
        tokens = [record.info["tokens"] for name, record in result.records.items() if ".experts." in name]
        experts = result.coverage.kinds["experts"]
        row[f"{label} err"] = spread(reconstruction_errors(model, dense_weights, inputs))
        row[f"{label} tokens"] = f"{min(tokens)}-{max(tokens)}"
        row[f"{label} coverage"] = f"{experts.fraction:.0%} at {experts.achieved:.1%}"
    dropped = build_tiny_moe(family)
    drop = sw.prune(dropped, "expert_drop", 0.25, calibration=CALIB, progress=False)
    magnitude = build_tiny_moe(family)
    sw.prune(magnitude, "magnitude", 0.25, include=[r"\.experts\."], progress=False)
    for label, model in (("expert_drop", dropped), ("magnitude", magnitude)):
        fidelity = probe.compare(model)
        row[f"{label} KL"] = f"{max(fidelity.kl, 0.0):.2e}"  # float noise can dip below 0
        row[f"{label} top1"] = f"{fidelity.top1_agreement:.3f}"
    row["params removed"] = f"{drop.removed['params_removed']:,}"
    return row


def main() -> None:
    torch.manual_seed(0)
    header = cpu_header("tiny random MoEs (tests/tiny_moe.py: 2 blocks, 4 experts, top-2, hidden 64), fp32; "
                        "calibration random ids 8 x 32 (seed 0), held-out random ids 8 x 32 (seed 1)")
    for key, value in header.items():
        print(f"{key}: {value}")
    rows = [family_row(family) for family in MOE_FAMILIES]
    print("\nSparseGPT 50% unstructured: relative reconstruction error per expert matrix on held-out routed tokens, "
          "median [min, max] of 16; routed tokens per expert matrix in calibration; expert coverage")
    print("| family | routed-only error | all-expert error | calibration tokens routed / all | experts pruned |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['family']} | {row['routed err']} | {row['all experts err']} | {row['routed tokens']} / "
              f"{row['all experts tokens']} | {row['routed coverage']} |")
    print("\nexpert_drop 25% vs magnitude 25% on the expert matrices (same expert weights gone): fidelity to the "
          "dense model on the held-out batch")
    print("| family | expert_drop KL | expert_drop top-1 | magnitude KL | magnitude top-1 | params removed by drop |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['family']} | {row['expert_drop KL']} | {row['expert_drop top1']} | {row['magnitude KL']} | "
              f"{row['magnitude top1']} | {row['params removed']} |")


if __name__ == "__main__":
    main()
