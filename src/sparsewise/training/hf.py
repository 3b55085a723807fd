"""Sparse training inside a transformers ``Trainer``: a thin callback over ``attach``.

    callback = SparseTrainingCallback(method="rigl", sparsity=0.8, distribution="erk")
    Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
    callback.sparsity.global_sparsity()          # the SparseTraining; records are on the model

The callback attaches when training begins (``total_steps`` = the Trainer's ``max_steps``),
calls ``step()`` after every optimizer step and ``finalize()`` when training ends, so the model
leaves ``train()`` with hard zeros and LayerRecords, ready to save or report. Not imported by
``sparsewise.training`` itself (transformers is slow to import): ``sparsewise.training.hf``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import ConfigError
from ..records import LayerRecord
from .base import MethodBase
from .controller import SparseTraining

__all__ = ["SparseTrainingCallback"]


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    # accelerate's AcceleratedOptimizer wraps the real one without running Optimizer.__init__, so
    # step hooks registered on the wrapper never fire; the controller hooks the wrapped optimizer
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class SparseTrainingCallback(TrainerCallback):
    """``transformers.TrainerCallback`` running :func:`sparsewise.training.attach` in a Trainer.

    Takes attach's keyword arguments (method, sparsity, pattern, distribution, seed, include,
    exclude, log, log_every and method options) except ``total_steps``, which is the Trainer's.
    ``.sparsity`` is the :class:`SparseTraining` once training has begun, ``.records`` the
    LayerRecords after it ends.

    A method with a regularizer (``loss_term``) needs the term in the loss: subclass the Trainer's
    ``compute_loss`` and add ``callback.sparsity.loss_term()``; the callback warns when that applies.
    """

    def __init__(self, method: str = "rigl", sparsity: float | None = None, **attach_options: Any):
        if "total_steps" in attach_options:
            raise ConfigError("SparseTrainingCallback takes total_steps from the Trainer (max_steps); drop it.")
        self.options: dict[str, Any] = {"method": method, "sparsity": sparsity, **attach_options}
        self.sparsity: SparseTraining | None = None
        self.records: dict[str, LayerRecord] | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, optimizer: Any = None,
                       **kwargs: Any):
        from . import attach

        if model is None:
            raise ConfigError("the Trainer passed no model to SparseTrainingCallback.on_train_begin.")
        if self.sparsity is not None and not self.sparsity.finalized:
            raise ConfigError("this SparseTrainingCallback is already attached to a running training.")
        if state.global_step > 0:
            warnings.warn(f"resuming at step {state.global_step}: the masks and the method's schedule restart "
                          "from attach (the controller state is not in the Trainer checkpoint).", stacklevel=2)
        self.sparsity = attach(model, _inner_optimizer(optimizer), total_steps=max(int(state.max_steps), 1),
                               **self.options)
        if getattr(type(self.sparsity.method), "loss_term", None) is not MethodBase.loss_term:
            warnings.warn(f"method {self.sparsity.method.name!r} adds a loss term the Trainer does not know about: "
                          "add callback.sparsity.loss_term() to the loss in Trainer.compute_loss.", stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs: Any):
        if self.sparsity is not None and not self.sparsity.finalized:
            self.sparsity.step()

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.sparsity is not None and not self.sparsity.finalized:
            self.records = self.sparsity.finalize()
