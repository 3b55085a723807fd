"""Static sparse training: masks chosen once at initialization, fixed for the whole run.

``random`` draws each layer's mask uniformly at random at its ratio (the random-pruning paper,
Liu et al. 2022, with uniform / ER / ERK ratios); ``magnitude`` keeps the largest |w| (of a
pretrained model, or at init). The controller re-applies the mask after every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from .base import MethodBase, register
from .masks import magnitude_mask, random_mask

if TYPE_CHECKING:
    from .controller import SparseTraining


def rescale_for_density(run: SparseTraining) -> None:
    """Multiply each layer's kept weights by 1/sqrt(density): a unit then sees the input variance
    of the dense initialization although most of its inputs are cut (the sparse-init scaling of
    Evci et al. 2022, "Gradient Flow in Sparse Neural Networks"). For training from scratch only."""
    for item in run.layers.values():
        density = 1.0 - item.sparsity
        if density > 0:
            item.parameter.data.mul_(density ** -0.5)


@register
class StaticRandom(MethodBase):
    name: ClassVar[str] = "random"

    def __init__(self, rescale: bool = False):
        self.rescale = rescale

    def init(self, run: SparseTraining) -> None:
        for item in run.layers.values():
            if item.pattern.kind != "unstructured":
                raise ConfigError(f"method 'random' draws unstructured masks; pattern {item.pattern} needs "
                                  "'magnitude', 'srste' or 'pgf'.")
            item.set_mask_rows(random_mask(item.shape, item.sparsity, run.generator))
        if self.rescale:
            rescale_for_density(run)


@register
class StaticMagnitude(MethodBase):
    name: ClassVar[str] = "magnitude"

    def init(self, run: SparseTraining) -> None:
        for item in run.layers.values():
            item.set_mask_rows(magnitude_mask(item.weight_rows(), item.sparsity, item.pattern))
