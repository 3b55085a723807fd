"""Model plumbing of sparse training: masks as buffers, the optimizer hook, step and finalize.

One :class:`SparseTraining` plugs a registered method into any PyTorch loop::

    sparsity = sw.training.attach(model, optimizer, method="rigl", sparsity=0.9,
                                  distribution="erk", total_steps=T)
    for batch in data:
        loss = task_loss(model, batch) + sparsity.loss_term()   # the term is 0 for most methods
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        sparsity.step()
    records = sparsity.finalize()      # hard zeros + LayerRecords: saves/reports like a pruned model

Masks are bool buffers named ``sparsity_mask`` on each trained module, shaped like its stored
weight, so ``model.state_dict()`` carries them and DDP broadcasts them. Pruned weights get no
gradient: a step pre-hook on the optimizer zeroes their gradients (after recording them when the
method needs dense gradients, RigL) and the weights are re-masked after every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import PrunableLayer
from ..patterns import Pattern
from ..records import LayerRecord, set_records
from .base import TrainingMethod

MASK_BUFFER = "sparsity_mask"


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 / tensor-parallel parameter, gradient or optimizer state)."""
    return type(tensor).__name__ == "DTensor"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for DTensors: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(tensor: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's shard of ``like``, the matching shard of the full-size ``tensor``).

    Masks are kept whole on every rank (one bool per weight); under FSDP2 the parameters,
    gradients and optimizer states are DTensor shards, so each rank multiplies its own shard.
    """
    if not is_sharded(like):
        return like, tensor
    from torch.distributed.tensor import distribute_tensor

    full = tensor.to(like.device)
    try:  # every rank holds the same full mask: cut locally, no scatter
        shard = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # torch without src_data_rank
        shard = distribute_tensor(full, like.device_mesh, like.placements)
    return like.to_local(), shard.to_local()


@dataclass
class TrainedLayer:
    """One trained weight: its layer view, target sparsity and pattern."""

    name: str
    layer: PrunableLayer
    sparsity: float
    pattern: Pattern

    @property
    def module(self) -> nn.Module:
        return self.layer.module

    @property
    def parameter(self) -> nn.Parameter:
        """The trained Parameter (the dense original when a forward wrapper parametrizes it)."""
        parametrizations = getattr(self.module, "parametrizations", None)
        if parametrizations is not None and "weight" in parametrizations:
            return parametrizations.weight.original
        return self.module.weight

    @property
    def mask(self) -> torch.Tensor:
        """Keep-mask buffer, shaped like the stored weight."""
        return getattr(self.module, MASK_BUFFER)

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.layer.to_rows(tensor)

    def weight_rows(self) -> torch.Tensor:
        return self.layer.to_rows(full_tensor(self.parameter.detach()))

    @torch.no_grad()
    def set_weight_rows(self, rows: torch.Tensor) -> None:
        """Write [out, in] rows into the trained parameter in place (its own shard under FSDP2)."""
        parameter = self.parameter.detach()
        new = self.layer.from_rows(rows.to(device=self.mask.device, dtype=parameter.dtype))
        local_weight, local_new = local_part(new, parameter)
        local_weight.copy_(local_new)

    def mask_rows(self) -> torch.Tensor:
        return self.layer.to_rows(self.mask)

    def set_mask_rows(self, mask_rows: torch.Tensor) -> None:
        self.mask.copy_(self.layer.from_rows(mask_rows.to(self.mask.device)))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layer.out_features, self.layer.in_features)


class SparseTraining:
    """Keeps a model's trained layers sparse through training (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, method: TrainingMethod,
                 layers: dict[str, TrainedLayer], *, total_steps: int, seed: int = 0,
                 log: Any = None, log_every: int = 100):
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1 (the planned number of optimizer steps), got {total_steps}.")
        self.model, self.optimizer, self.method = model, optimizer, method
        self.layers = layers
        self.total_steps = int(total_steps)
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.step_count = 0
        self.dense_grads: dict[str, torch.Tensor] = {}
        self.log, self.log_every = log, log_every
        self.finalized = False
        if not getattr(method, "supports_sharding", True) and any(is_sharded(i.parameter) for i in layers.values()):
            raise ConfigError(f"method {method.name!r} rewrites the forward weight and does not run on FSDP2-sharded "
                              "parameters; attach before fully_shard is not enough either. Use DDP, or a mask method "
                              "(magnitude, gmp, set, rigl, issp, cast).")
        for item in layers.values():
            weight = item.module.weight
            if MASK_BUFFER in item.module._buffers:
                raise ConfigError(f"{item.name} already has a sparsity mask: the model is attached twice; "
                                  "finalize() or detach() the first attachment.")
            device = weight.to_local().device if is_sharded(weight) else weight.device
            item.module.register_buffer(MASK_BUFFER, torch.ones(weight.shape, dtype=torch.bool, device=device))
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step) if optimizer is not None else None
        try:
            method.init(self)
            if method.masks_gradients:
                self.apply_masks()
            self.sync_masks()
        except Exception:
            self.detach()
            raise
        if self.log is not None:
            self.log.record(0, self)

    # ------------------------------------------------------------------ loop hooks
    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.finalized:
            return
        want_dense = self.method.wants_dense_grad(self.step_count + 1)
        for name, item in self.layers.items():
            grad = item.parameter.grad
            if grad is None:
                continue
            if want_dense:
                self.dense_grads[name] = item.rows(full_tensor(grad.detach())).abs().float()
            if self.method.masks_gradients:
                local_grad, local_mask = local_part(item.mask, grad)
                local_grad.mul_(local_mask)

    def step(self) -> None:
        """Call once after every ``optimizer.step()``: updates masks on schedule, re-masks weights."""
        if self.finalized:
            raise ConfigError("step() after finalize(): the masks are already fixed into the weights.")
        self.step_count += 1
        self.method.update(self, self.step_count)
        self.dense_grads.clear()
        if self.method.masks_gradients:
            self.apply_masks()
        if self.log is not None and self.step_count % self.log_every == 0:
            self.log.record(self.step_count, self)

    def loss_term(self) -> torch.Tensor:
        """The method's regularizer to add to the task loss (a zero tensor for most methods)."""
        term = self.method.loss_term(self)
        if term is None:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return term

    # ------------------------------------------------------------------ helpers for methods
    @torch.no_grad()
    def apply_masks(self) -> None:
        """w <- w * mask for every trained layer."""
        for item in self.layers.values():
            local_weight, local_mask = local_part(item.mask, item.parameter.detach())
            local_weight.mul_(local_mask)

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, entries_rows: torch.Tensor) -> None:
        """Zero the optimizer's per-weight state (momentum, Adam moments) at ``entries``: a weight
        that is grown or dropped restarts, it does not inherit its predecessor's momentum."""
        if self.optimizer is None:
            return
        item = self.layers[name]
        state = self.optimizer.state.get(item.parameter, {})
        keep = ~item.layer.from_rows(entries_rows.to(item.mask.device))
        for value in state.values():
            if torch.is_tensor(value) and value.shape == item.parameter.shape:
                local_value, local_keep = local_part(keep, value)
                local_value.mul_(local_keep)

    def sync_masks(self) -> None:
        """Under torch.distributed, make every rank hold rank 0's masks (they should already agree:
        same seed, same all-reduced gradients; this guards against non-deterministic reductions)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        nccl = torch.distributed.get_backend() == "nccl"
        for item in self.layers.values():
            mask = item.mask
            as_int = mask.to(torch.uint8)
            if nccl and not as_int.is_cuda:
                as_int = as_int.cuda()
            torch.distributed.broadcast(as_int, src=0)
            mask.copy_(as_int.to(mask.device).bool())

    def masks(self) -> dict[str, torch.Tensor]:
        """Current keep-masks as [out, in] rows (copies)."""
        return {name: item.mask_rows().clone() for name, item in self.layers.items()}

    def layer_sparsity(self) -> dict[str, float]:
        """Measured fraction of zeros of each trained weight (what the forward pass uses)."""
        return {name: float((item.weight_rows() == 0).float().mean()) for name, item in self.layers.items()}

    def global_sparsity(self) -> float:
        """Fraction of zeros over all trained weights."""
        zeros = sum(int((item.weight_rows() == 0).sum()) for item in self.layers.values())
        total = sum(item.layer.numel for item in self.layers.values())
        return zeros / total

    # ------------------------------------------------------------------ checkpoint / finish
    def state_dict(self) -> dict[str, Any]:
        """Controller state for resume (the masks themselves are in ``model.state_dict()``)."""
        return {"step": self.step_count, "method": self.method.name, "seed": self.seed,
                "generator": self.generator.get_state(), "method_state": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method.name:
            raise ConfigError(f"this sparse-training state is from method {state.get('method')!r}, "
                              f"not {self.method.name!r}: attach with the same method before resuming.")
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state.get("method_state", {}))

    def detach(self) -> None:
        """Remove hooks and mask buffers without touching the weights."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for item in self.layers.values():
            with contextlib.suppress(KeyError):
                del item.module._buffers[MASK_BUFFER]

    def finalize(self) -> dict[str, LayerRecord]:
        """Fix the final masks into the weights (exact zeros), undo wrappers and hooks, and attach
        one LayerRecord per layer: the model then saves, reports and accelerates like a pruned one."""
        if self.finalized:
            raise ConfigError("finalize() was already called.")
        self.method.finalize(self)
        self.apply_masks()
        records = {}
        for name, item in self.layers.items():
            mask_rows = item.mask_rows().detach().to("cpu", copy=True).contiguous()
            achieved = 1.0 - float(mask_rows.float().mean())
            records[name] = LayerRecord(
                name=name, pattern=str(item.pattern), sparsity=item.sparsity, achieved=achieved,
                method=f"training:{self.method.name}", shape=item.shape,
                info={"steps": self.step_count}, mask=mask_rows)
        if self.log is not None:
            self.log.record(self.step_count, self)
        self.detach()
        self.finalized = True
        set_records(self.model, records)
        return records
