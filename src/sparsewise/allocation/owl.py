"""OWL: outlier-weighed layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Per block l, on the dense model: A = Wanda scores |W_ij| * ||X_j||_2 of all the block's pruned
layers together; D_l = share of A above M * mean(A) (M = 5). The ratios are normalized to
[0, 1] over blocks, scaled by 2 * lambda (lambda = 0.08), centred:
    s_l = s - (2 lambda norm(D_l) - mean_l 2 lambda norm(D_l)),
so blocks with more outliers keep more weights; every layer of a block gets its block's ratio
and the budget solver keeps the parameter-weighted total at s. The statistics come from one
dense pass of the calibration engine (block by block, nothing is modified).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..calibration.engine import OBSERVE, sequential_calibration
from ..calibration.run import calibration_batches
from ..calibration.stats import STAT_NORMS
from ..errors import ConfigError
from ..scores import wanda_scores
from .base import AllocationContext, register


def outlier_ratio(scores: list[torch.Tensor], multiple: float) -> float:
    """Share of entries above ``multiple`` x the mean over all of ``scores`` together."""
    total = sum(score.numel() for score in scores)
    mean = sum(float(score.sum()) for score in scores) / total
    return sum(int((score > multiple * mean).sum()) for score in scores) / total


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """s - (2 lam norm(D) - mean(2 lam norm(D))), norm = min-max over the blocks."""
    values = torch.tensor(ratios, dtype=torch.float64)
    span = float(values.max() - values.min())
    normalized = (values - values.min()) / span if span > 0 else torch.zeros_like(values)
    spread = normalized * (2 * lam)
    return (target - (spread - spread.mean())).tolist()


@register
class OWL:
    name: ClassVar[str] = "owl"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, m: float = 5.0, lam: float = 0.08, batch_size: int = 8):
        if m <= 0 or lam < 0:
            raise ValueError(f"OWL needs m > 0 and lam >= 0, got m={m}, lam={lam}.")
        self.m, self.lam, self.batch_size = m, lam, batch_size

    def block_outlier_ratios(self, context: AllocationContext) -> dict[int, float]:
        """D_l of every block holding counted layers, from one dense calibration pass."""
        adapter = context.adapter
        if adapter is None or context.calibration is None:
            raise ConfigError("allocation 'owl' needs calibration data (Wanda scores of the dense model).")
        scores: dict[int, list[torch.Tensor]] = {}
        ratios: dict[int, float] = {}
        block_of = {name: shape.block for name, shape in context.shapes.items()}

        def counted(index: int) -> dict:
            return {name: layer for name, layer in adapter.block_layers(index).items() if name in context.shapes}

        def observe(name: str, stats) -> None:
            weight = context.layers[name].get_weight().float()
            scores.setdefault(block_of[name], []).append(wanda_scores(weight, stats.channel_norms.to(weight.device)))

        def finish(index: int, _name: str, _outputs) -> None:
            if index in scores:
                ratios[index] = outlier_ratio(scores.pop(index), self.m)

        sequential_calibration(context.model, adapter.blocks, counted,
                               calibration_batches(context.calibration, self.batch_size), observe,
                               wanted=frozenset({STAT_NORMS}), device=context.device, mode=OBSERVE,
                               after_block=finish, stack_starts=adapter.stack_starts)
        return ratios

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        ratios = self.block_outlier_ratios(context)
        blocks = sorted(ratios)
        per_block = dict(zip(blocks, owl_sparsities([ratios[b] for b in blocks], context.target, self.lam),
                             strict=True))
        missing = sorted({shape.block for shape in context.shapes.values()} - set(per_block))
        if missing:
            raise ConfigError(f"OWL found no statistics for blocks {missing}: every counted layer must sit in a "
                              "repeated block (drop the others from include).")
        return {name: per_block[shape.block] for name, shape in context.shapes.items()}
