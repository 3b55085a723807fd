"""Prune-and-grow sparse training: SET and RigL (constant number of nonzeros per layer).

Every ``frequency`` steps until ``stop`` x total_steps, each layer drops the
f_t = alpha/2 (1 + cos(pi t / T_end)) fraction of its kept weights with the smallest |w| and
grows as many new ones, which start at zero with fresh optimizer state:
* SET (Mocanu et al. 2018): grown at random;
* RigL (Evci et al. 2020): grown where |dL/dW| is largest; the dense gradient is read only at
  update steps (the controller records it before masking). Defaults: alpha = 0.3, every 100 steps,
  updates stop at 75% of training, random initialization (``rescale=True`` scales the kept
  weights by 1/sqrt(density), see static.rescale_for_density).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ConfigError
from .base import MethodBase, register
from .masks import cosine_fraction, drop_and_grow, magnitude_mask, random_mask
from .static import rescale_for_density

if TYPE_CHECKING:
    from .controller import SparseTraining


class _PruneAndGrow(MethodBase):
    def __init__(self, fraction: float = 0.3, frequency: int = 100, stop: float = 0.75, init: str = "random",
                 rescale: bool = False):
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"drop fraction must lie in [0, 1], got {fraction}.")
        if frequency < 1:
            raise ConfigError(f"update frequency must be >= 1 step, got {frequency}.")
        if init not in ("random", "magnitude"):
            raise ConfigError(f"init must be 'random' or 'magnitude', got {init!r}.")
        self.fraction, self.frequency, self.stop, self.init_kind = fraction, frequency, stop, init
        self.rescale = rescale
        self.updates: list[dict[str, int]] = []
        self.total_steps = 0

    def init(self, run: SparseTraining) -> None:
        self.total_steps = run.total_steps
        for item in run.layers.values():
            if item.pattern.kind != "unstructured":
                raise ConfigError(f"{self.name} keeps a per-layer nonzero count and grows anywhere in the layer; "
                                  f"pattern {item.pattern} is not supported (use 'srste' or 'pgf' for N:M).")
            mask = (random_mask(item.shape, item.sparsity, run.generator) if self.init_kind == "random"
                    else magnitude_mask(item.weight_rows(), item.sparsity, item.pattern))
            item.set_mask_rows(mask)
        if self.rescale:
            rescale_for_density(run)

    def is_update_step(self, step: int) -> bool:
        return step % self.frequency == 0 and step < self.stop * self.total_steps

    def grow_scores(self, run: SparseTraining, name: str) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, run: SparseTraining, step: int) -> None:
        if not self.is_update_step(step):
            return
        fraction = cosine_fraction(step, self.fraction, round(self.stop * run.total_steps))
        changed = {}
        for name, item in run.layers.items():
            mask, rows = item.mask_rows(), item.weight_rows()
            count = int(fraction * int(mask.sum()))
            new_mask, grown = drop_and_grow(rows, mask, count, self.grow_scores(run, name))
            flips = new_mask ^ mask
            item.set_mask_rows(new_mask)
            # grown weights start at zero and every changed entry restarts its optimizer state
            item.set_weight_rows(rows * ~grown.to(rows.device))
            run.reset_optimizer_state(name, flips)
            changed[name] = int(flips.sum())
        run.sync_masks()
        self.updates.append({"step": step, "flipped": sum(changed.values())})


@register
class SET(_PruneAndGrow):
    name: ClassVar[str] = "set"

    def grow_scores(self, run: SparseTraining, name: str) -> torch.Tensor:
        item = run.layers[name]
        return torch.rand(item.shape, generator=run.generator)


@register
class RigL(_PruneAndGrow):
    name: ClassVar[str] = "rigl"

    def wants_dense_grad(self, step: int) -> bool:
        return self.is_update_step(step)

    def grow_scores(self, run: SparseTraining, name: str) -> torch.Tensor:
        if name not in run.dense_grads:
            raise ConfigError(f"RigL needs the gradient of {name} at update steps: call loss.backward() and "
                              "optimizer.step() before sparsity.step(), and keep the optimizer attached.")
        return run.dense_grads[name]
