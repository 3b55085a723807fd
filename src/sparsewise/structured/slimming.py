"""L1 on BatchNorm scales (network slimming), stage 1 of the YOLOv8 compression recipe.

Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming":
L = L_task + lambda_t * sum_l sum_c |gamma_l,c| pushes unimportant channels' BN scales to 0, so
:func:`~.channels.prune_channels` (``importance="bn_scale"``) can remove them. The YOLOv8 paper
adjusts lambda during training (its schedule is not in the abstract); ``schedule="decay"`` lowers it
linearly to 10% of lambda_0 over ``total_steps`` (a common choice in public slimming code),
``"constant"`` keeps it. Same loop protocol as the sparse-training controller::

    l1 = BNScaleL1(model, strength=1e-4, total_steps=T)
    loss = task_loss + l1.loss_term(); loss.backward(); optimizer.step(); l1.step()
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["BNScaleL1"]


class BNScaleL1:
    """lambda_t * sum |gamma| over the BatchNorm layers of ``model`` (all of them unless ``names``)."""

    def __init__(self, model: nn.Module, strength: float = 1e-4, *, total_steps: int = 1, schedule: str = "decay",
                 names: list[str] | None = None):
        if strength < 0:
            raise ConfigError(f"BNScaleL1 strength must be >= 0, got {strength}.")
        if schedule not in ("constant", "decay"):
            raise ConfigError(f"BNScaleL1 schedule must be 'constant' or 'decay', got {schedule!r}.")
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}.")
        norms = {name: module for name, module in model.named_modules()
                 if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.affine}
        if names is not None:
            missing = sorted(set(names) - set(norms))
            if missing:
                raise ConfigError(f"BNScaleL1: {missing} are not affine BatchNorm layers of the model.")
            norms = {name: norms[name] for name in names}
        if not norms:
            raise ConfigError("BNScaleL1 found no affine BatchNorm layer; network slimming needs Conv+BN blocks.")
        self.norms, self.strength, self.schedule, self.total_steps = norms, strength, schedule, total_steps
        self.step_count = 0

    def current_strength(self) -> float:
        if self.schedule == "constant":
            return self.strength
        return self.strength * (1.0 - 0.9 * min(self.step_count / self.total_steps, 1.0))

    def loss_term(self) -> torch.Tensor:
        return self.current_strength() * sum(norm.weight.abs().sum() for norm in self.norms.values())

    def step(self) -> None:
        self.step_count += 1
