"""The activation-sparsity protocol, its registry, and the site a method acts on.

A *site* is one tensor a method zeroes entries of at inference: the input of a block linear
(TEAL, WINA, top-k, CHESS's attention part, R-Sparse) or the output of an MLP's activation
function (CATS, CHESS's FFN part). A method scores the entries of that tensor; a calibrated
threshold on the score (or a per-token top-k) decides which survive. Hooks, calibration and
allocation live in ``apply.py`` / ``calibrate.py``; the math in ``thresholds.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

SITE_KINDS = ("input", "gate", "attention")


@dataclass
class Site:
    """One place activations are sparsified.

    ``module``: the linear whose input is masked ("input"), or the activation module whose
    output is masked ("gate"). ``weight``: the consuming linear's weight [out, in] (for "gate",
    the down projection's, ``reader``), used by weight-aware scores. ``up``: the up projection beside a
    gate (CHESS), if the MLP has one. ``params``: the weights that read the site (allocation).
    """

    name: str
    module: nn.Module
    kind: str
    block: int
    weight: torch.Tensor
    params: int
    up: nn.Module | None = None
    reader: nn.Module | None = None  # "gate" sites: the linear that reads them (the down projection)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # per-channel, set by the method

    @property
    def width(self) -> int:
        return self.weight.shape[1]


@runtime_checkable
class ActivationMethod(Protocol):
    """score(x) >= 0 per entry; entries whose score is at or below the site's threshold are zeroed
    (or, with ``selection == "topk"``, all but each token's top-k)."""

    name: ClassVar[str]
    site_kinds: ClassVar[tuple[str, ...]]  # of "input", "gate", "attention" (see calibrate.block_sites)
    selection: str  # "threshold" (calibrated) or "topk" (per token, no calibration)

    def prepare(self, site: Site) -> None:
        """Per-site constants from the weights (e.g. column norms), stored in ``site.constants``."""

    def finish_observing(self, site: Site) -> None:
        """Turn statistics observed in a first calibration pass (methods with ``observes_up``:
        ``observe(site, up_output)``) into constants, before scores are sampled."""

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor: ...


class ScoreMethod:
    """Defaults for methods that are a score and nothing else."""

    site_kinds: ClassVar[tuple[str, ...]] = ("input",)

    def __init__(self, selection: str = "threshold"):
        if selection not in ("threshold", "topk"):
            raise ConfigError(f"selection must be 'threshold' or 'topk', got {selection!r}.")
        self.selection = selection

    observes_up: ClassVar[bool] = False

    def prepare(self, site: Site) -> None:
        pass

    def column_thresholds(self, site: Site, threshold: float) -> torch.Tensor | None:
        """This method's rule at ``threshold`` as per-input thresholds t_j on |x_j| (keep where
        |x_j| > t_j), or None when the score is not |x_j| times a per-input constant. The sparse
        runtime applies such a rule inside its kernels (runtime.accelerate_activations)."""
        return None

    def finish_observing(self, site: Site) -> None:
        pass


_METHODS = Registry("activation method")
register = _METHODS.register


def get_method(name: str | ActivationMethod, **options: Any) -> ActivationMethod:
    """Instantiate a registered activation method by name (or pass an instance through)."""
    return _METHODS.get(name, **options)


def available_methods() -> list[str]:
    return _METHODS.names()
