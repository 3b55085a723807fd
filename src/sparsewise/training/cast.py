"""CAST-style continuous N:M training (after "CAST: Continuous and Differentiable
Semi-Structured Sparsity-Aware Training for Large Language Models", 2025).

Instead of alternating hard masks, the weights that an N:M projection would drop are driven to
zero smoothly, then the projection is enforced once it barely changes anything. After every
optimizer step (``update``), in each group g of M consecutive inputs of a row::

    D_g      = the M - N entries outside the group's top-N by |w|      (re-ranked every step)
    s_g      = mean |w| of the group's top-N (kept) entries;  s_bar = mean of s_g over the layer
    w       <- sign(w) max(|w| - eta_t lambda_t s_g / s_bar, 0)    for w in D_g  (proximal L1 step)
    lambda_t = decay * min(1, t / (ramp T))                        (linear ramp, then constant)

Kept entries are never touched by the decay. eta_t is the learning rate of the optimizer group
holding the weight at that step (so warm-up and lr schedules shape the L1 term, as a decay term
inside the optimizer update would), or ``step_size`` when given.

Adaptivity: the paper's AdamS gives each group an adaptive strength so that all groups sparsify
at a similar rate; its exact rule is not public (unverified). The choice here scales each
group's step by s_g, its own kept magnitude, so groups shrink at the same *relative* rate. The
factor is divided by its layer mean s_bar so that lambda is in the optimizer's update units
(eta lambda sign(w), as an L1 term inside Adam's update would be): Adam moves a weight by up to
about lr per step, so with decay > 1 the shrinkage outpaces a gradient that keeps pushing a
dropped weight back (on a toy MLP with Adam, decay = 1 was borderline, 2 converged; without the
s_bar normalization lambda would need to be ~1/|w|, i.e. depend on the model's weight scale).

The hard N:M mask is enforced and fixed (gradients of pruned weights masked from then on) at
``hard_at`` x total_steps, or earlier as soon as every dropped weight is within ``tol`` x s_g of
zero. The relative change that projection makes is kept in ``projection_change`` and a warning
names it above 1%: the decay was too weak for the schedule (raise ``decay`` or ``step_size``).
``rescale`` (default on) multiplies each row's kept weights by ||row before|| / ||row after||
at the projection, compensating the output scale lost with the dropped residue. The paper
instead learns a per-channel scale during training; this one-shot rescale replaces it (the decay
never shrinks kept weights, so only the dropped residue needs compensating). The paper also
distills from the dense model (a self-teacher): add a distillation loss in the training loop.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ConfigError
from ..patterns import nm_mask
from .base import MethodBase, register
from .ste import require_nm

if TYPE_CHECKING:
    from .controller import SparseTraining

# a hard projection that moves the weights by more than this (relative Frobenius norm) is reported
PROJECTION_WARN = 0.01


def group_keep_and_strength(rows: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-N keep-mask of [out, in] rows and s_g, the mean |w| of each group's kept entries,
    broadcast back to [out, in]."""
    keep = nm_mask(rows.abs(), n, m)
    out_features, in_features = rows.shape
    kept_abs = (rows.abs() * keep).reshape(out_features, in_features // m, m)
    strength = (kept_abs.sum(-1, keepdim=True) / n).expand(-1, -1, m).reshape(out_features, in_features)
    return keep, strength


def proximal_shrink(rows: torch.Tensor, keep: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """sign(w) max(|w| - threshold, 0) on the entries outside ``keep``; kept entries unchanged."""
    shrunk = torch.sign(rows) * torch.clamp(rows.abs() - threshold, min=0.0)
    return torch.where(keep, rows, shrunk)


@register
class ContinuousNM(MethodBase):
    """CAST-style continuous N:M training (see the module docstring).

    decay:      lambda, the final L1 strength in optimizer-update units (2.0)
    ramp:       fraction of total_steps over which lambda grows linearly from 0 (0.5)
    hard_at:    fraction of total_steps at which the hard N:M mask is enforced at the latest (0.9)
    step_size:  eta for the L1 step; None = the optimizer group's current lr
    rescale:    preserve each row's norm at the hard projection (True)
    tol:        dropped weights within tol x s_g of zero everywhere -> project early (1e-3)
    """

    name: ClassVar[str] = "cast"

    def __init__(self, decay: float = 2.0, ramp: float = 0.5, hard_at: float = 0.9,
                 step_size: float | None = None, rescale: bool = True, tol: float = 1e-3):
        if not decay >= 0.0:
            raise ConfigError(f"cast decay (lambda) must be >= 0, got {decay}.")
        if not 0.0 <= ramp <= 1.0 or not 0.0 <= hard_at <= 1.0:
            raise ConfigError(f"cast ramp and hard_at are fractions of total_steps in [0, 1], got {ramp}, {hard_at}.")
        if step_size is not None and not step_size > 0.0:
            raise ConfigError(f"cast step_size must be > 0 (or None for the optimizer's lr), got {step_size}.")
        if not tol >= 0.0:
            raise ConfigError(f"cast tol must be >= 0, got {tol}.")
        self.decay, self.ramp, self.hard_at = float(decay), ramp, hard_at
        self.step_size, self.rescale, self.tol = step_size, rescale, tol
        self.n = self.m = 0
        self.masks_gradients = False  # dense training while shrinking; fixed mask once projected
        self.hard_step: int | None = None
        self.projection_change: float | None = None
        self._groups: dict[str, dict[str, Any]] = {}

    def init(self, run: SparseTraining) -> None:
        self.n, self.m = require_nm(self.name, run)
        if self.step_size is None:
            if run.optimizer is None:
                raise ConfigError("cast scales its L1 step by the optimizer's lr: attach with the optimizer, or "
                                  "pass step_size=...")
            for name, item in run.layers.items():
                group = next((g for g in run.optimizer.param_groups
                              if any(p is item.parameter for p in g["params"])), None)
                if group is None:
                    raise ConfigError(f"cast: {name}.weight is not in the optimizer; add it, or pass step_size=...")
                self._groups[name] = group
        with torch.no_grad():
            for item in run.layers.values():  # the would-be mask, for metrics while shrinking
                item.set_mask_rows(nm_mask(item.weight_rows().abs(), self.n, self.m))
        if self.hard_at == 0.0:
            self.project(run, 0)

    def lambda_at(self, step: int, total_steps: int) -> float:
        ramp_steps = self.ramp * total_steps
        return self.decay if ramp_steps <= 0 else self.decay * min(1.0, step / ramp_steps)

    def _step_size(self, name: str) -> float:
        if self.step_size is not None:
            return self.step_size
        return float(self._groups[name]["lr"])

    @torch.no_grad()
    def update(self, run: SparseTraining, step: int) -> None:
        if self.masks_gradients:  # projected: the controller keeps the fixed mask
            return
        strength_now = self.lambda_at(step, run.total_steps)
        converged = True
        for name, item in run.layers.items():
            rows = item.weight_rows()
            work = rows.float()
            keep, strength = group_keep_and_strength(work, self.n, self.m)
            # s_g / mean(s_g): per-group adaptivity at unit mean, so lambda is in update units
            relative = strength / strength.mean().clamp_min(torch.finfo(work.dtype).tiny)
            new = proximal_shrink(work, keep, self._step_size(name) * strength_now * relative)
            item.set_weight_rows(new)
            item.set_mask_rows(keep)
            converged = converged and bool((new.abs() <= self.tol * strength).logical_or(keep).all())
        if converged or step >= self.hard_at * run.total_steps:
            self.project(run, step)

    @torch.no_grad()
    def project(self, run: SparseTraining, step: int) -> None:
        """Enforce the hard N:M mask (with the optional row-norm rescale) and fix it."""
        moved = total = 0.0
        for name, item in run.layers.items():
            rows = item.weight_rows()
            before = rows.float()
            keep = nm_mask(before.abs(), self.n, self.m)
            after = before * keep
            if self.rescale:
                after = after * _row_norm_ratio(before, after)
            moved += float((after - before).pow(2).sum())
            total += float(before.pow(2).sum())
            item.set_weight_rows(after)
            item.set_mask_rows(keep)
            run.reset_optimizer_state(name, ~keep)  # a pruned weight keeps no momentum
        self.masks_gradients = True
        self.hard_step = step
        self.projection_change = math.sqrt(moved / total) if total > 0 else 0.0
        run.sync_masks()
        if self.projection_change > PROJECTION_WARN:
            warnings.warn(f"cast: the hard {self.n}:{self.m} projection at step {step} moved the weights by "
                          f"{self.projection_change:.1%} (relative norm): the L1 decay had not driven the dropped "
                          f"weights to ~0. Raise decay (now {self.decay}) or step_size, or project later (hard_at).",
                          stacklevel=2)

    def finalize(self, run: SparseTraining) -> None:
        if not self.masks_gradients:  # finalized before the projection: project now
            self.project(run, run.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"hard": self.masks_gradients, "hard_step": self.hard_step, "projection_change": self.projection_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks_gradients = bool(state.get("hard", self.masks_gradients))
        self.hard_step = state.get("hard_step", self.hard_step)
        self.projection_change = state.get("projection_change", self.projection_change)


def _row_norm_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """||row before|| / ||row after|| per row (1 where the projected row is all zero)."""
    norm_before = before.norm(dim=1, keepdim=True)
    norm_after = after.norm(dim=1, keepdim=True)
    return torch.where(norm_after > 0, norm_before / norm_after.clamp_min(torch.finfo(after.dtype).tiny),
                       torch.ones_like(norm_after))
