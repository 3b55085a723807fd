"""The sparse-training method protocol and its name registry.

A training method is one small module. The controller (:class:`~.controller.SparseTraining`)
owns the plumbing: masks as module buffers, the optimizer hook that masks gradients, the step
counter, logging and finalization. A method only decides *which* weights are kept and *how* the
kept set changes over training:

* ``init(run)``: first masks (and any weight change, e.g. a forward wrapper for STE methods);
* ``wants_dense_grad(step)``: True when the next ``update`` needs |dL/dW| of the pruned weights
  (RigL); the controller then records the gradient before masking it;
* ``update(run, step)``: called after every ``optimizer.step()``, with the 1-based step number;
* ``loss_term(run)``: an optional regularizer added to the task loss (None for most methods);
* ``finalize(run)``: undo forward wrappers and leave hard zeros under the final masks.

``masks_gradients`` says whether the controller zeroes the gradients of pruned weights before
each optimizer step (true for fixed-topology methods; STE methods train the dense weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from .controller import SparseTraining


@runtime_checkable
class TrainingMethod(Protocol):
    name: ClassVar[str]
    masks_gradients: ClassVar[bool]

    def init(self, run: SparseTraining) -> None: ...

    def wants_dense_grad(self, step: int) -> bool: ...

    def update(self, run: SparseTraining, step: int) -> None: ...

    def loss_term(self, run: SparseTraining) -> torch.Tensor | None: ...

    def finalize(self, run: SparseTraining) -> None: ...


class MethodBase:
    """Defaults for the protocol's optional parts (a method overrides what it needs)."""

    name: ClassVar[str] = ""
    masks_gradients: ClassVar[bool] = True
    supports_nm: ClassVar[bool] = True
    supports_sharding: ClassVar[bool] = True  # False: needs whole weights in its forward (STE, BDWP)

    def init(self, run: SparseTraining) -> None:
        raise NotImplementedError

    def wants_dense_grad(self, step: int) -> bool:
        return False

    def update(self, run: SparseTraining, step: int) -> None:
        return None

    def loss_term(self, run: SparseTraining) -> torch.Tensor | None:
        return None

    def finalize(self, run: SparseTraining) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the masks (e.g. a stage index), for checkpoint/resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


_METHODS = Registry("sparse-training method")
register = _METHODS.register


def get_training_method(name: str | TrainingMethod, **options: Any) -> TrainingMethod:
    """Instantiate a registered training method by name (an instance passes through)."""
    return _METHODS.get(name, **options)


def available_training_methods() -> list[str]:
    return _METHODS.names()
