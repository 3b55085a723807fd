"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Every ``frequency`` steps between ``start`` and ``end`` (fractions of total_steps), each layer is
pruned by magnitude to s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3 of its final ratio
s_f; pruned weights stay pruned (the mask only shrinks) and get no gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from ..patterns import mask_from_scores
from .base import MethodBase, register
from .masks import cubic_sparsity

if TYPE_CHECKING:
    from .controller import SparseTraining


@register
class GradualMagnitude(MethodBase):
    name: ClassVar[str] = "gmp"

    def __init__(self, start: float = 0.0, end: float = 0.75, frequency: int = 100, initial_sparsity: float = 0.0):
        if not 0.0 <= start <= end <= 1.0:
            raise ConfigError(f"gmp needs 0 <= start <= end <= 1 (fractions of total_steps), got {start}, {end}.")
        if frequency < 1:
            raise ConfigError(f"gmp frequency must be >= 1 step, got {frequency}.")
        self.start, self.end, self.frequency, self.initial = start, end, frequency, initial_sparsity

    def _steps(self, run: SparseTraining) -> tuple[int, int]:
        return round(self.start * run.total_steps), round(self.end * run.total_steps)

    def sparsity_at(self, run: SparseTraining, final: float, step: int) -> float:
        start, end = self._steps(run)
        return cubic_sparsity(step, final, initial=min(self.initial, final), start=start, end=end)

    def init(self, run: SparseTraining) -> None:
        for item in run.layers.values():
            if item.pattern.kind == "nm":
                raise ConfigError("gmp prunes gradually to a ratio; for N:M use 'pgf' (stepwise N:M) or 'srste'.")
            self._prune(item, self.sparsity_at(run, item.sparsity, 0))

    @staticmethod
    def _prune(item, sparsity: float) -> None:
        # rank only among kept weights: a pruned weight (already zero) stays pruned
        scores = item.weight_rows().abs().float().masked_fill(~item.mask_rows(), -1.0)
        item.set_mask_rows(mask_from_scores(scores, sparsity, item.pattern))

    def update(self, run: SparseTraining, step: int) -> None:
        start, end = self._steps(run)
        if step < start or step > end or ((step - start) % self.frequency and step != end):
            return
        for item in run.layers.values():
            self._prune(item, self.sparsity_at(run, item.sparsity, step))
