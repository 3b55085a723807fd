"""The pruning-method protocol and its name registry.

A method is one small module that declares what it is (:class:`Capabilities`: the patterns and
scopes it takes, the calibration statistics it needs, whether it updates kept weights or puts new
modules in place of the model's) and does one of two things:

* ``prune_layer(LayerTask) -> LayerResult``: one layer's weight (laid out [out, in], float32) plus
  its statistics -> a new weight and keep-mask, optionally a replacement module; the engine walks
  the blocks, collects statistics, and backs every change out on failure;
* ``prune_model(ModelTask) -> dict[str, LayerRecord]`` (``whole_model=True``): methods that need
  their own walk (ARMOR optimizes each layer against its block's recomputed inputs).

``sw.prune`` and the recipe/CLI config check a request against the capabilities before any work,
so no layer of the pipeline has to know a method by name. Model plumbing (hooks, devices, block
order) lives in ``calibration``/``oneshot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..calibration.stats import LayerStats
from ..errors import ConfigError
from ..patterns import Pattern
from ..registry import Registry

PATTERN_KINDS = ("unstructured", "nm")
SCOPES = ("row", "layer", "global")


@dataclass(frozen=True)
class Capabilities:
    """What a method is, declared once and checked at entry.

    ``patterns``: pattern kinds it takes ("unstructured", "nm") or exact patterns ("2:4");
    ``scopes``: unstructured ranking scopes ("global" only where raw scores compare across
    layers); ``needs``: calibration statistics (``calibration.stats.KNOWN_STATS``);
    ``needs_data``: calibration data even without per-layer statistics (whole-model methods);
    ``updates_weights``: kept weights change (a refiner that re-picks the mask drops that);
    ``replaces_modules``: results carry modules that take the layers' places;
    ``whole_model``: the method walks the model itself (``prune_model``); it then takes no
    allocation, refiner, reconstruction, resume or block selection.
    """

    patterns: frozenset[str] = frozenset(PATTERN_KINDS)
    scopes: frozenset[str] = frozenset({"row", "layer"})
    needs: frozenset[str] = frozenset()
    needs_data: bool = False
    updates_weights: bool = False
    replaces_modules: bool = False
    whole_model: bool = False

    @property
    def takes_data(self) -> bool:
        return bool(self.needs) or self.needs_data

    def accepts(self, pattern: Pattern) -> bool:
        return (pattern.kind in self.patterns or str(pattern) in self.patterns) and (
            pattern.kind != "unstructured" or pattern.scope in self.scopes)

    def describe(self) -> str:
        scopes = f" (scopes {', '.join(sorted(self.scopes))})" if "unstructured" in self.patterns else ""
        return f"patterns {', '.join(sorted(self.patterns))}{scopes}"


def check_pattern(method: PruningMethod, pattern: Pattern) -> None:
    """Refuse, before any work, a pattern or ranking scope the method does not declare."""
    caps = method.capabilities
    if caps.accepts(pattern):
        return
    if pattern.kind == "unstructured" and "unstructured" in caps.patterns:
        takers = [name for name in available_methods() if pattern.scope in method_capabilities(name).scopes]
        raise ConfigError(f"{method.name} does not rank with scope {pattern.scope!r} (it takes "
                          f"{', '.join(sorted(caps.scopes))}); {pattern.scope} ranking is for: {', '.join(takers)}.")
    hint = " --pattern 2:4" if caps.patterns == {"2:4"} else ""
    raise ConfigError(f"method {method.name!r} takes {caps.describe()}, not {pattern}{': pass' + hint if hint else ''}.")


@dataclass
class LayerTask:
    """Everything a method may use to prune one layer."""

    name: str
    weight: torch.Tensor  # [out, in] float32, on the compute device; do not modify in place
    sparsity: float
    pattern: Pattern
    stats: LayerStats | None = None  # None for data-free methods
    generator: torch.Generator | None = None  # seeded, for methods with random choices
    options: dict[str, Any] = field(default_factory=dict)
    # the layer's bias (read-only): a method that puts a module in the layer's place carries it over
    bias: torch.Tensor | None = None


@dataclass
class LayerResult:
    weight: torch.Tensor  # [out, in], zeros where mask is False
    mask: torch.Tensor  # bool [out, in], True = kept
    info: dict[str, Any] = field(default_factory=dict)
    # A module to put in the layer's place (``Capabilities.replaces_modules``); ``weight``/``mask``
    # then describe its pruned core, the submodule named ``core`` ("" = the module itself).
    module: nn.Module | None = None
    core: str = ""


@dataclass
class ModelTask:
    """Everything a whole-model method gets (``Capabilities.whole_model``)."""

    model: nn.Module
    calibration: Any  # a CalibrationSet (sparsewise.data.as_calibration), or None
    pattern: Pattern
    sparsity: float
    include: Sequence[str] | str | None
    exclude: Sequence[str] | str | None
    device: torch.device
    seed: int
    batch_size: int | None
    progress: bool
    options: dict[str, Any] = field(default_factory=dict)
    # filled by structured methods that remove parts of the model (nothing left to mask):
    notes: list[str] = field(default_factory=list)  # summary lines of what was removed
    removed: dict[str, Any] = field(default_factory=dict)  # the same, machine-readable


@runtime_checkable
class PruningMethod(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def prune_layer(self, task: LayerTask) -> LayerResult: ...


class Method:
    """Base of the registered methods: ``needs`` read from the capabilities."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    @property
    def needs(self) -> frozenset[str]:
        return self.capabilities.needs


_METHODS = Registry("pruning method")


def register(cls):
    """Class decorator: make a method available by ``cls.name``.

    A class written against the first protocol (``name`` + ``needs``, no capabilities) is taken
    as a per-layer method for unstructured and N:M patterns that needs those statistics."""
    if not isinstance(getattr(cls, "capabilities", None), Capabilities):
        cls.capabilities = Capabilities(needs=frozenset(getattr(cls, "needs", ())))
    return _METHODS.register(cls)


def get_method(name: str | PruningMethod, **options: Any) -> PruningMethod:
    """Instantiate a registered method by name (or pass an instance through)."""
    return _METHODS.get(name, **options)


def available_methods() -> list[str]:
    return _METHODS.names()


def method_capabilities(name: str) -> Capabilities:
    """A registered method's capabilities, without instantiating it."""
    return _METHODS.lookup(name).capabilities
