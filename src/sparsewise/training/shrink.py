"""ISS-P: iterative soft shrinkage (Wang et al. 2023, "Iterative Soft Shrinkage Learning for
Efficient Image Super-Resolution").

After every optimizer step, each layer's lowest-|w| ``sparsity`` fraction (re-ranked every step,
so the set can change) is multiplied by ``shrink`` (rho, default 0.99; rho = 0 is iterative hard
thresholding). At ``hard_at`` x total_steps the lowest-|w| set is pruned to exact zeros and the
mask is fixed for the rest of training (fine-tuning phase).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ConfigError
from .base import MethodBase, register
from .masks import magnitude_mask, soft_shrink

if TYPE_CHECKING:
    from .controller import SparseTraining


@register
class IterativeSoftShrinkage(MethodBase):
    name: ClassVar[str] = "issp"

    def __init__(self, shrink: float = 0.99, hard_at: float = 0.8):
        if not 0.0 <= shrink <= 1.0:
            raise ConfigError(f"shrink (rho) must lie in [0, 1], got {shrink}.")
        if not 0.0 <= hard_at <= 1.0:
            raise ConfigError(f"hard_at must be a fraction of total_steps in [0, 1], got {hard_at}.")
        self.shrink, self.hard_at = shrink, hard_at
        self.masks_gradients = False  # dense training while shrinking; fixed mask after hard_at

    def init(self, run: SparseTraining) -> None:
        for item in run.layers.values():
            if item.pattern.kind != "unstructured":
                raise ConfigError("issp shrinks the lowest-|w| fraction of each layer; N:M is not supported here "
                                  "(use 'srste' or 'pgf').")
            item.set_mask_rows(magnitude_mask(item.weight_rows(), item.sparsity, item.pattern))
        if self.hard_at == 0.0:
            self.masks_gradients = True

    @torch.no_grad()
    def update(self, run: SparseTraining, step: int) -> None:
        if self.masks_gradients:
            return
        hard = step >= self.hard_at * run.total_steps
        for item in run.layers.values():
            rows = item.weight_rows()
            new_rows, keep = soft_shrink(rows, item.sparsity, 0.0 if hard else self.shrink)
            item.set_weight_rows(new_rows)
            item.set_mask_rows(keep)
        if hard:
            self.masks_gradients = True
            run.sync_masks()

    def finalize(self, run: SparseTraining) -> None:
        if not self.masks_gradients:  # finalized before the hard phase: prune now
            for item in run.layers.values():
                item.set_mask_rows(magnitude_mask(item.weight_rows(), item.sparsity, item.pattern))
            self.masks_gradients = True

    def state_dict(self) -> dict:
        return {"hard": self.masks_gradients}

    def load_state_dict(self, state: dict) -> None:
        self.masks_gradients = bool(state.get("hard", self.masks_gradients))
