"""Block-wise reconstruction: refit a pruned block to the dense model's outputs, masks fixed.

After a block is pruned, its surviving weights (every zero stays zero, so N:M stays N:M) and its
other parameters (norm scales, biases) are fitted by Adam to

    L = sum_b ||f_sparse(X_b) - Y_b||^2  /  sum_b ||Y_b||^2

where X_b is calibration batch b as it enters the block in the *pruned* model (the outputs of the
blocks pruned and refitted before it) and Y_b the *dense* model's output of the block on its own
dense input. Aiming at the dense trajectory rather than at the dense block on the pruned input
lets every block also absorb the error accumulated before it.

This is the block-wise fine-tuning of EBFT (Guo et al. 2024, "EBFT: Effective and Block-Wise
Fine-Tuning for Sparse LLMs") run on the calibration samples alone: one block in memory, no
gradient through the rest of the model, no extra data, so it stays a one-shot post-training step.

Guard against over-fitting the few calibration samples: a held-out share of them is never
trained on, and the block keeps the parameters with the lowest held-out loss seen (including
the pruned block as it came, epoch 0), so its held-out loss never rises; training stops after
``patience`` epochs without a held-out improvement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, NumericalError

RECONSTRUCT_OPTIONS = ("epochs", "lr", "micro_batch", "holdout", "patience", "seed")


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of :func:`reconstruct_block` (defaults measured on SmolLM2 2:4, RESULTS.md)."""

    epochs: int = 20
    lr: float = 1e-3  # SmolLM2 2:4 ppl: 1e-4 98.6, 3e-4 89.1, 1e-3 75.7 (10 epochs) / 69.7 (20), 3e-3 69.9
    micro_batch: int = 8  # calibration samples per Adam step
    holdout: float = 0.125  # share of the samples kept out of training, to choose the epoch to keep
    patience: int = 5  # epochs without a held-out improvement before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.micro_batch < 1 or self.patience < 1:
            raise ConfigError("reconstruct: epochs, micro_batch and patience must be >= 1.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"reconstruct: lr must be a positive number, got {self.lr}.")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"reconstruct: holdout is a share of the calibration samples in [0, 1), got {self.holdout}.")

    @classmethod
    def parse(cls, value: bool | dict[str, Any] | ReconstructConfig | None) -> ReconstructConfig | None:
        """``prune(reconstruct=...)``: None/False = off, True = defaults, a dict of options, or a config."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(RECONSTRUCT_OPTIONS))
            if unknown:
                raise ConfigError(f"unknown reconstruct option(s) {unknown}; known: {', '.join(RECONSTRUCT_OPTIONS)}.")
            return cls(**value)
        raise ConfigError(f"reconstruct takes True, a dict of {RECONSTRUCT_OPTIONS} or a ReconstructConfig, got {value!r}.")

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RECONSTRUCT_OPTIONS}


def split_batch(obj, batch: int, start: int, stop: int):
    """``obj`` (nested tuples/lists/dicts of tensors) cut to samples [start, stop) along dim 0.

    Tensors whose first dimension is the batch size are cut; others (rotary tables of batch 1,
    position ids, flags) are shared by every piece as they are.
    """
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(split_batch(item, batch, start, stop) for item in obj)
    if isinstance(obj, list):
        return [split_batch(item, batch, start, stop) for item in obj]
    if isinstance(obj, dict):
        return {key: split_batch(value, batch, start, stop) for key, value in obj.items()}
    return obj


def _pieces(calls: Sequence, targets: Sequence[torch.Tensor], size: int) -> list[tuple[Any, torch.Tensor]]:
    """(block call, target) pairs of at most ``size`` samples each, in calibration order."""
    pieces = []
    for call, target in zip(calls, targets, strict=True):
        batch = call.hidden_states.shape[0]
        for start in range(0, batch, size):
            stop = min(start + size, batch)
            piece = type(call)(split_batch(call.args, batch, start, stop), split_batch(call.kwargs, batch, start, stop))
            pieces.append((piece, target[start:stop]))
    return pieces


def _output(block: nn.Module, call) -> torch.Tensor:
    from ..calibration.engine import _block_output

    return _block_output(block(*call.args, **call.kwargs))


def _relative_error(block: nn.Module, pieces) -> float:
    """sum ||f(X) - Y||^2 / sum ||Y||^2 over ``pieces`` (no gradient)."""
    error = energy = 0.0
    with torch.no_grad():
        for call, target in pieces:
            out = _output(block, call).float()
            error += float((out - target.float()).pow(2).sum())
            energy += float(target.float().pow(2).sum())
    return error / max(energy, 1e-30)


def reconstruct_block(
    block: nn.Module, calls: Sequence, targets: Sequence[torch.Tensor], config: ReconstructConfig | None = None
) -> dict[str, Any]:
    """Fit ``block``'s parameters in place so that its outputs on ``calls`` approach ``targets``.

    ``calls`` are the block's inputs (:class:`~sparsewise.calibration.engine.BlockCall`), one
    output tensor per call in ``targets``. Every parameter is trained, each zero of a weight
    matrix stays zero (pruning masks are kept). Half-precision blocks are trained in float32
    and cast back. Returns {"loss_before", "loss_after" (held-out, or training when there is no
    held-out sample), "epochs", "best_epoch", "steps"}.
    """
    config = config or ReconstructConfig()
    pieces = _pieces(calls, targets, config.micro_batch)
    samples = sum(call.hidden_states.shape[0] for call in calls)
    # at least one held-out piece when asked for, never all of them
    held = min(len(pieces) - 1, max(1, round(config.holdout * len(pieces)))) if config.holdout > 0 else 0
    train, valid = pieces[: len(pieces) - held], pieces[len(pieces) - held:]
    judge = valid or train  # no held-out piece (one sample): keep the better of before/after on the training loss

    dtypes = {name: param.dtype for name, param in block.named_parameters()}
    params = [param for param in block.parameters() if param.is_floating_point()]
    frozen = [param for param in params if not param.requires_grad]  # e.g. a model loaded frozen for inference
    for param in params:  # Adam on half-precision weights would lose most small updates
        param.data = param.data.float()
        param.requires_grad_(True)
    masks = [(param != 0) if param.dim() >= 2 else None for param in params]
    was_training = block.training
    try:
        best_loss = _relative_error(block, judge)
        if not math.isfinite(best_loss):
            raise NumericalError("reconstruct: the pruned block's output is not finite; check the model weights.")
        loss_before, best_epoch, best_state = best_loss, 0, [param.detach().clone() for param in params]
        steps_total = config.epochs * len(train)
        optimizer = torch.optim.Adam(params, lr=config.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps_total) / steps_total)))
        generator = torch.Generator().manual_seed(config.seed)
        steps, epoch, stale = 0, 0, 0
        block.train(False)  # dropout off: the targets came from the deterministic forward
        with torch.enable_grad():
            for epoch in range(1, config.epochs + 1):
                for index in torch.randperm(len(train), generator=generator).tolist():
                    call, target = train[index]
                    out = _output(block, call).float()
                    target = target.float()
                    loss = (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    for param, mask in zip(params, masks, strict=True):
                        if mask is not None and param.grad is not None:
                            param.grad.mul_(mask)
                    optimizer.step()
                    schedule.step()
                    with torch.no_grad():
                        for param, mask in zip(params, masks, strict=True):
                            if mask is not None:
                                param.mul_(mask)  # Adam's moments of a masked entry are 0, but stay exact
                    steps += 1
                loss_now = _relative_error(block, judge)
                if math.isfinite(loss_now) and loss_now < best_loss:
                    best_loss, best_epoch, stale = loss_now, epoch, 0
                    best_state = [param.detach().clone() for param in params]
                else:
                    stale += 1
                    if stale >= config.patience:
                        break
        with torch.no_grad():
            for param, value in zip(params, best_state, strict=True):
                param.copy_(value)
    finally:
        block.train(was_training)
        for param in params:
            param.grad = None  # a block's worth of gradients must not outlive its refit
        for param in frozen:
            param.requires_grad_(False)
        for name, param in block.named_parameters():
            if param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
    return {"loss_before": loss_before, "loss_after": best_loss, "epochs": epoch, "best_epoch": best_epoch,
            "steps": steps, "samples": samples, "held_out": sum(target.shape[0] for _, target in valid)}
