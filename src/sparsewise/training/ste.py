"""N:M training through straight-through estimators: SR-STE and progressive gradient flow (PGF).

Both methods keep dense weights W, which the optimizer updates, and run every forward pass with
an N:M weight derived from W: the mask m keeps the N largest |w| of every M consecutive inputs of
each [out, in] row (``layer.to_rows``: Linear as stored, GPT-2's Conv1D transposed, Conv2d rows
in (kh, kw, in_channel) order so groups run along input channels). m is recomputed from W at
every forward, so the kept set follows the dense weights through training.

``srste`` (Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch")::

    forward   W~ = W ⊙ m
    backward  dL/dW = dL/dW~ + lambda_w (1 - m) ⊙ W        lambda_w = ``decay`` = 2e-4

The extra term decays only the currently pruned weights, which stabilizes the mask (fewer flips
than plain STE, which is ``decay=0``).

``pgf`` (Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity Training in
Transformers")::

    forward   W~ = W ⊙ (m + (1 - m) alpha(t))     alpha(t) = exp(-c t)  or  max(0, 1 - c t)
    backward  dL/dW = dL/dW~                        (passed unchanged, no SR-STE term)

(mask-decay gradient flow, MDGF), t = optimizer steps since the end of the optional dense
warm-up. With ``stages`` the pattern itself also tightens (structure-decay gradient flow, SDGF):
``masks.nm_stages`` gives the stage list (stepwise 1:8 -> 7:8, 4:8, 2:8, 1:8; geometric 2:4 ->
16:32, 8:16, 4:8, 2:4), run as equal-length stages between ``dense_until`` and ``stage_until`` of
total_steps. From ``stage_until`` on the mask is hard (alpha = 0) at the target N:M: the
fine-tuning phase.

Mechanism: ``torch.nn.utils.parametrize`` makes ``module.weight`` the effective weight computed
from the dense original (the same Parameter object the optimizer holds, before and after), and
the forward also writes the current mask into the ``sparsity_mask`` buffer so metrics see it.
``finalize`` removes the parametrization (leaving the dense weight) and sets the final hard N:M
mask from |W|; the controller then writes the zeros.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..patterns import nm_mask
from .base import MethodBase, register
from .controller import MASK_BUFFER
from .masks import nm_stages

if TYPE_CHECKING:
    from .controller import SparseTraining, TrainedLayer


def require_nm(method: str, run: SparseTraining) -> tuple[int, int]:
    """The (N, M) every trained layer uses; ConfigError for other patterns."""
    for item in run.layers.values():
        if item.pattern.kind != "nm":
            raise ConfigError(f"method {method!r} trains N:M sparsity; pattern {item.pattern} is not N:M. Pass "
                              "pattern='2:4' (or another N:M), or use 'rigl', 'gmp' or 'magnitude' for unstructured.")
    pattern = next(iter(run.layers.values())).pattern
    return pattern.n, pattern.m


def stored_nm_mask(item: TrainedLayer, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask of ``weight`` (stored layout) by |w|, groups along the rows' input dim,
    returned in the stored layout. Reads no module attribute: safe inside a parametrization."""
    rows = item.layer.to_rows(weight.detach())
    return item.layer.from_rows(nm_mask(rows.abs(), n, m), weight.shape)


class MaskedSTE(torch.autograd.Function):
    """SR-STE's weight function: forward W ⊙ m; backward g + decay (1 - m) ⊙ W (decay 0: STE)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if not ctx.decay:
            return grad, None, None
        weight, mask = ctx.saved_tensors
        # weight * bool keeps the weight's dtype (a float scalar times the bool would be float32)
        return grad + (weight * ~mask).mul_(ctx.decay), None, None


class DecayingMaskSTE(torch.autograd.Function):
    """PGF's weight function: forward W ⊙ (m + (1 - m) alpha); backward passes g unchanged."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
        if alpha == 1.0:
            return weight.clone()
        return torch.where(mask, weight, weight * alpha)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _ForwardWeight(nn.Module):
    """The parametrization: dense stored weight -> the weight the forward pass uses."""

    def __init__(self, method: _NMStraightThrough, item: TrainedLayer):
        super().__init__()
        # plain attributes (neither is an nn.Module): nothing enters the state_dict
        self.method, self.item = method, item

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.method.forward_weight(self.item, weight)


class _NMStraightThrough(MethodBase):
    """Shared plumbing of the STE methods: parametrize in init, unparametrize in finalize."""
    supports_sharding: ClassVar[bool] = False

    masks_gradients: ClassVar[bool] = False  # the dense weights train; the mask lives in the forward
    n: int = 0
    m: int = 0

    def init(self, run: SparseTraining) -> None:
        self.n, self.m = require_nm(self.name, run)
        for item in run.layers.values():
            if parametrize.is_parametrized(item.module, "weight"):
                raise ConfigError(f"{item.name}.weight is already parametrized (weight norm, another STE run?); "
                                  f"{self.name} needs the plain weight: remove that parametrization first.")
        self.prepare(run)
        # unparametrizing re-registers the weight last: remember the order to restore it
        self._parameter_order = {name: list(item.module._parameters) for name, item in run.layers.items()}
        for item in run.layers.values():
            # unsafe: the effective weight has the original's shape and dtype, skip the checks
            parametrize.register_parametrization(item.module, "weight", _ForwardWeight(self, item), unsafe=True)
        with torch.no_grad():  # one evaluation fills the mask buffer before the first forward
            for item in run.layers.values():
                self.forward_weight(item, item.parameter)

    def prepare(self, run: SparseTraining) -> None:
        """Per-run setup before the forward weights are installed."""

    def mask_and_weight(self, item: TrainedLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_weight(self, item: TrainedLayer, weight: torch.Tensor) -> torch.Tensor:
        mask, effective = self.mask_and_weight(item, weight)
        buffer = item.module._buffers.get(MASK_BUFFER)
        if buffer is not None:  # absent after detach(): the forward still works
            buffer.copy_(mask)
        return effective

    def finalize(self, run: SparseTraining) -> None:
        for name, item in run.layers.items():
            if parametrize.is_parametrized(item.module, "weight"):
                # leave_parametrized=False keeps the dense original, the same Parameter object
                parametrize.remove_parametrizations(item.module, "weight", leave_parametrized=False)
                # same parameter (and state_dict key) order as before attach: weight before bias
                parameters = item.module._parameters
                for key in self._parameter_order.get(name, []):
                    if key in parameters:
                        parameters[key] = parameters.pop(key)
            item.set_mask_rows(nm_mask(item.weight_rows().abs(), self.n, self.m))


@register
class SRSTE(_NMStraightThrough):
    """SR-STE: N:M forward weight, sparse-refined gradient (see the module docstring)."""

    name: ClassVar[str] = "srste"

    def __init__(self, decay: float = 2e-4):
        if not decay >= 0.0:
            raise ConfigError(f"srste decay (lambda_w) must be >= 0 (0 = plain STE), got {decay}.")
        self.decay = float(decay)

    def mask_and_weight(self, item: TrainedLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mask = stored_nm_mask(item, weight, self.n, self.m)
        return mask, MaskedSTE.apply(weight, mask, self.decay)


DECAY_SCHEDULES = ("exponential", "linear")


@register
class ProgressiveGradientFlow(_NMStraightThrough):
    """PGF: decaying N:M mask (MDGF) and optional stage-wise N:M tightening (SDGF).

    decay_schedule:  "exponential" alpha = exp(-c t) | "linear" alpha = max(0, 1 - c t) | None
                     (hard mask in every stage: SDGF alone)
    decay_rate:      c; default 1e-4 for exponential (the paper's ViT-B config), for linear
                     1 / (steps between dense_until and stage_until), so alpha reaches 0 there
    stages:          None | "stepwise" | "geometric" (masks.nm_stages), equal-length stages
    dense_until:     dense warm-up, fraction of total_steps (0: none)
    stage_until:     end of the soft phase; from here on the target N:M mask is hard (fine-tune)

    A geometric stage whose group size M' does not divide a layer's input dim uses the next
    finer stage for that layer (same density, smaller groups).
    """

    name: ClassVar[str] = "pgf"

    def __init__(self, decay_schedule: str | None = "exponential", decay_rate: float | None = None,
                 stages: str | None = None, stage_until: float = 0.8, dense_until: float = 0.0):
        if decay_schedule is not None and decay_schedule not in DECAY_SCHEDULES:
            raise ConfigError(f"pgf decay_schedule must be 'exponential', 'linear' or None, got {decay_schedule!r}.")
        if stages is not None and stages not in ("stepwise", "geometric"):
            raise ConfigError(f"pgf stages must be 'stepwise', 'geometric' or None, got {stages!r}.")
        if not 0.0 <= dense_until <= stage_until <= 1.0:
            raise ConfigError(f"pgf needs 0 <= dense_until <= stage_until <= 1 (fractions of total_steps), "
                              f"got dense_until={dense_until}, stage_until={stage_until}.")
        if decay_rate is not None and not decay_rate >= 0.0:
            raise ConfigError(f"pgf decay_rate must be >= 0, got {decay_rate}.")
        self.decay_schedule, self.decay_rate, self.stages = decay_schedule, decay_rate, stages
        self.stage_until, self.dense_until = stage_until, dense_until
        self.step = 0
        self.total_steps = 1
        self.rate = 0.0
        self.layer_stages: dict[str, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------------ schedule
    def prepare(self, run: SparseTraining) -> None:
        self.total_steps = run.total_steps
        soft_steps = (self.stage_until - self.dense_until) * self.total_steps
        if self.decay_rate is not None:
            self.rate = float(self.decay_rate)
        elif self.decay_schedule == "linear":
            self.rate = 1.0 / soft_steps if soft_steps > 0 else 0.0
        else:
            self.rate = 1e-4
        stage_list = nm_stages(self.n, self.m, self.stages) if self.stages else [(self.n, self.m)]
        for name, item in run.layers.items():
            width = item.layer.in_features
            # stage k, or the next one that tiles this layer; the last (target N:M) always does
            self.layer_stages[name] = [next(s for s in stage_list[k:] if width % s[1] == 0)
                                       for k in range(len(stage_list))]

    def alpha(self, step: int) -> float:
        """Scale of the pruned weights at ``step`` (1 during dense warm-up, 0 once hard)."""
        start = self.dense_until * self.total_steps
        if step < start:
            return 1.0
        if step >= self.stage_until * self.total_steps or self.decay_schedule is None:
            return 0.0
        t = step - start
        if self.decay_schedule == "exponential":
            return math.exp(-self.rate * t)
        return max(0.0, 1.0 - self.rate * t)

    def stage_index(self, step: int) -> int | None:
        """Index into the stage list at ``step``; None during the dense warm-up."""
        start, end = self.dense_until * self.total_steps, self.stage_until * self.total_steps
        if step < start:
            return None
        count = len(nm_stages(self.n, self.m, self.stages)) if self.stages else 1
        if step >= end:
            return count - 1
        return min(count - 1, int((step - start) / (end - start) * count))

    # ------------------------------------------------------------------ forward / loop
    def mask_and_weight(self, item: TrainedLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.stage_index(self.step)
        if index is None:  # dense warm-up: every weight flows, the forward is the dense one
            return torch.ones_like(weight, dtype=torch.bool), weight
        n, m = self.layer_stages[item.name][index]
        with torch.no_grad():
            mask = stored_nm_mask(item, weight, n, m)
        return mask, DecayingMaskSTE.apply(weight, mask, self.alpha(self.step))

    def update(self, run: SparseTraining, step: int) -> None:
        self.step = step  # t for alpha(t) and the stage; the next forward uses it

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", self.step))
