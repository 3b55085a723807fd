"""A reduced Tyr-the-Pruner search: per-block ratios chosen by evolutionary search under the budget.

Tyr-the-Pruner (Li et al. 2025, "Tyr-the-Pruner: Structural Pruning LLMs via Global Sparsity
Distribution Optimization") builds a supernet of every layer pruned at 9 levels around the
target and searches per-layer levels with the parameter total fixed, scoring candidates by the
whole model's KL to the dense one. Here, as the issue asks to start small: levels
s + k * step (k = -L..L) per block; each block's cost at each level is the relative error of
its output on the calibration inputs, ||Y - Y_k||^2 / ||Y||^2, with the block's layers
pruned at that level by Wanda (inputs: the dense model's, block by block); a candidate's
fitness is the parameter-weighted sum of its blocks' costs. The search mutates by moving one
level step from one block to another of the same size (equal-size blocks: the total is
unchanged exactly), keeps the best ``survivors`` of ``offspring`` children per generation
(seeded), and returns the best allocation found.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..calibration.engine import BlockWalk, collect_block_stats, run_block
from ..calibration.run import calibration_batches
from ..calibration.stats import STAT_NORMS
from ..errors import ConfigError
from ..patterns import mask_from_scores
from ..scores import wanda_scores
from .base import AllocationContext, register


def evolve_levels(costs: torch.Tensor, sizes: torch.Tensor, *, generations: int = 50, offspring: int = 32,
                  survivors: int = 4, seed: int = 0) -> torch.Tensor:
    """Level index per block (costs [blocks, levels], the middle level = the target) minimizing
    sum_b sizes_b * costs[b, level_b] while sum_b sizes_b * (level_b - middle) stays 0: every
    mutation moves one step up in one block and one step down in another block of equal size."""
    blocks, levels = costs.shape
    middle = levels // 2
    generator = torch.Generator().manual_seed(seed)

    def fitness(choice: torch.Tensor) -> float:
        return float((sizes * costs[torch.arange(blocks), choice]).sum())

    population = [torch.full((blocks,), middle, dtype=torch.long)]
    for _ in range(generations):
        children = []
        for _ in range(offspring):
            child = population[int(torch.randint(len(population), (1,), generator=generator))].clone()
            for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
                up, down = torch.randint(blocks, (2,), generator=generator).tolist()
                if up == down or sizes[up] != sizes[down]:
                    continue
                if child[up] + 1 < levels and child[down] - 1 >= 0:
                    child[up] += 1
                    child[down] -= 1
            children.append(child)
        ranked = sorted(population + children, key=fitness)
        population = []
        for candidate in ranked:  # distinct survivors
            if not any(torch.equal(candidate, kept) for kept in population):
                population.append(candidate)
            if len(population) == survivors:
                break
    return population[0]


@torch.no_grad()
def block_costs(context: AllocationContext, levels: list[float], batch_size: int) -> torch.Tensor:
    """[blocks, levels] relative output error of each block pruned by Wanda at each level."""
    adapter, device = context.adapter, context.device
    block_ids = sorted({shape.block for shape in context.shapes.values()})
    if block_ids and block_ids[0] < 0:
        raise ConfigError("the search allocates per block: every counted layer must sit in a repeated block.")
    costs = torch.zeros(len(block_ids), len(levels), dtype=torch.float64)
    # calls=None: the walk captures each stack's first block's inputs itself (every stack of an encoder-decoder)
    with BlockWalk(context.model, adapter.blocks, None, device, stack_starts=adapter.stack_starts,
                   batches=calibration_batches(context.calibration, batch_size)) as walk:
        for step in walk:
            block = step.block
            outputs = run_block(block, step.calls)
            if step.index in block_ids:
                layers = {name: layer for name, layer in adapter.block_layers(step.index).items()
                          if name in context.shapes}
                stats = collect_block_stats(block, {n: layer.module for n, layer in layers.items()},
                                            {n: layer.in_features for n, layer in layers.items()}, step.calls,
                                            frozenset({STAT_NORMS}))
                originals = {name: layer.get_weight().detach().clone() for name, layer in layers.items()}
                scores = {name: wanda_scores(originals[name].float(), stats[name].channel_norms) for name in layers}
                reference = sum(float((out.float() ** 2).sum()) for out in outputs)
                try:
                    for level_index, level in enumerate(levels):
                        for name, layer in layers.items():
                            keep = mask_from_scores(scores[name], level, "unstructured")
                            layer.set_weight(originals[name] * keep.to(originals[name].dtype))
                        error = sum(float(((run_block(block, [call])[0].float() - out.float()) ** 2).sum())
                                    for call, out in zip(step.calls, outputs, strict=True))
                        costs[block_ids.index(step.index), level_index] = error / max(reference, 1e-30)
                finally:
                    for name, layer in layers.items():
                        layer.set_weight(originals[name])
            step.outputs = outputs
    return costs


@register
class TyrSearch:
    name: ClassVar[str] = "tyr"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, levels: int = 2, step: float = 0.05, generations: int = 50, offspring: int = 32,
                 survivors: int = 4, batch_size: int = 8):
        if levels < 1 or step <= 0:
            raise ValueError(f"the search needs levels >= 1 and step > 0, got levels={levels}, step={step}.")
        self.levels, self.step = levels, step
        self.generations, self.offspring, self.survivors, self.batch_size = generations, offspring, survivors, batch_size
        self.info: dict = {}

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        offsets = [k * self.step for k in range(-self.levels, self.levels + 1)]
        values = [context.target + offset for offset in offsets]
        if values[0] < 0 or values[-1] >= 1:
            raise ConfigError(f"levels {values[0]:.2f}..{values[-1]:.2f} leave [0, 1): use a smaller step or fewer "
                              "levels for this target.")
        costs = block_costs(context, values, self.batch_size)
        block_ids = sorted({shape.block for shape in context.shapes.values()})
        sizes = torch.tensor([sum(shape.params for shape in context.shapes.values() if shape.block == block)
                              for block in block_ids], dtype=torch.float64)
        choice = evolve_levels(costs, sizes, generations=self.generations, offspring=self.offspring,
                               survivors=self.survivors, seed=context.seed)
        per_block = {block: values[int(choice[i])] for i, block in enumerate(block_ids)}
        middle = len(values) // 2
        self.info = {"levels": values, "block_levels": per_block,
                     "proxy_cost": float((sizes * costs[torch.arange(len(block_ids)), choice]).sum()),
                     "uniform_cost": float((sizes * costs[:, middle]).sum())}
        return {name: per_block[shape.block] for name, shape in context.shapes.items()}
