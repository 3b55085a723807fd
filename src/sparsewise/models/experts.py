"""Per-expert calibration: make each expert's matrix of a fused experts module observable.

An experts module (transformers' ``MixtralExperts``, ``Qwen3MoeExperts``, ...) computes every
expert in one forward, so the :class:`~sparsewise.models.adapters.ExpertMatrix` layers never run
and a hook on them would never fire. While such a hook is registered, the experts module is
observed: for the duration of its forward

* transformers' experts implementation is switched to ``"eager"`` (the per-expert loop; the
  default ``grouped_mm`` multiplies all experts in one call), and
* a torch-function mode sends every ``F.linear(x, W[e])`` (or ``x @ W[e]``, gpt-oss's
  ``[experts, in, out]`` storage) whose weight is a slice of a fused expert parameter through
  that expert's ExpertMatrix, so its hooks see exactly the tokens the router sent to expert ``e``
  (nothing family-specific: the slice is found by storage offset, and the product is taken over
  only when its [out, in] view is the ExpertMatrix's, same shape and strides).

Experts the router sent no token get statistics from every token instead (the forward is run once
more with all tokens routed to them, output discarded), and are listed by
:func:`all_token_experts`. Inside ``with calibrate_all_experts():`` every expert's statistics come
from all tokens (llm-compressor's "calibrate all experts"); the block output still follows the
router. An experts module whose forward calls no ``F.linear`` on expert slices raises a
:class:`~sparsewise.errors.ConfigError` rather than leaving experts unpruned.

Whole experts: :func:`moe_blocks` finds every routed MoE layer (an ``experts`` module, fused or a
ModuleList, next to the ``gate``/``router`` with one weight row per expert) and
:func:`remove_experts` slices experts out of it (parameters, biases, router rows, expert counts),
for structured expert dropping (:mod:`sparsewise.methods.expert_drop`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError

__all__ = ["MoEBlock", "all_token_experts", "calibrate_all_experts", "moe_blocks", "observe_experts", "remove_experts",
           "set_config_expert_count"]

_ALL_EXPERTS = False
# experts module -> its observer while at least one hook on one of its matrices is registered
_OBSERVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# experts module -> {(parameter, expert index)} whose statistics came from all tokens (no routed token)
_ALL_TOKEN_EXPERTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def calibrate_all_experts() -> Iterator[None]:
    """Statistics of every expert from every calibration token, not only the routed ones."""
    global _ALL_EXPERTS
    previous, _ALL_EXPERTS = _ALL_EXPERTS, True
    try:
        yield
    finally:
        _ALL_EXPERTS = previous


def all_token_experts(model: nn.Module) -> list[str]:
    """Names (``<parameter>.<expert>``) of expert matrices calibrated on all tokens because the
    router sent them none, in the last observed pass."""
    names = []
    for module_name, module in model.named_modules():
        for attribute, index in sorted(_ALL_TOKEN_EXPERTS.get(module, ())):
            names.append(f"{module_name}.{attribute}.{index}" if module_name else f"{attribute}.{index}")
    return names


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _Routing(TorchFunctionMode):
    """Sends ``F.linear`` on a fused expert slice through that expert's ExpertMatrix."""

    def __init__(self, observer: _Observer, fire: bool, only: int | None = None) -> None:
        super().__init__()
        self.observer, self.fire, self.only = observer, fire, only
        self.hit: set[tuple[str, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        linear = func is nn.functional.linear
        if (linear or func in _MATMULS) and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            # F.linear(x, W) multiplies by W^T, x @ W by W: the [out, in] matrix is W or W^T
            found = self.observer.locate(args[1] if linear else args[1].mT)
            if found is not None:
                self.hit.add(found)
                matrix = self.observer.matrix(*found)
                fire = self.fire and (self.only is None or found[1] == self.only)
                out = matrix(args[0]) if fire else matrix.forward(args[0])
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return out if bias is None else out + bias
        return func(*args, **kwargs)


class _Observer:
    """Hooks on one experts module that route its forward through the ExpertMatrix layers."""

    def __init__(self, experts: nn.Module) -> None:
        from .adapters import expert_parameters

        self.experts = experts
        self.attributes = expert_parameters(experts)
        self.users = 0
        self.routing: _Routing | None = None
        self.saved_implementation: Any = None
        self.handles = [experts.register_forward_pre_hook(self.before, with_kwargs=True),
                        experts.register_forward_hook(self.after, with_kwargs=True, always_call=True)]

    def matrix(self, attribute: str, index: int) -> nn.Module:
        from .adapters import _expert_matrix

        return _expert_matrix(self.experts, attribute, index)

    def locate(self, weight: torch.Tensor) -> tuple[str, int] | None:
        """(parameter, expert) when ``weight`` (a product's [out, in] operand) is exactly one expert's
        ExpertMatrix view of a fused parameter: same storage, offset, shape and strides."""
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            return None
        for attribute in self.attributes:
            param = getattr(self.experts, attribute)
            if weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
                continue
            offset = weight.storage_offset() - param.storage_offset()
            index, rest = divmod(offset, param.stride(0))
            if rest or not 0 <= index < param.shape[0]:
                continue
            view = self.matrix(attribute, index).matrix()
            if view.shape == weight.shape and view.stride() == weight.stride():
                return attribute, index
        return None

    def _hooked(self) -> list[tuple[str, int]]:
        """(parameter, expert) of the matrices someone registered a hook on."""
        keys = []
        for attribute in self.attributes:
            for index in range(getattr(self.experts, attribute).shape[0]):
                matrix = self.matrix(attribute, index)
                if matrix._forward_pre_hooks or matrix._forward_hooks:
                    keys.append((attribute, index))
        return keys

    def _set_eager(self) -> None:
        config = getattr(self.experts, "config", None)
        if config is not None and getattr(config, "_experts_implementation", None) not in (None, "eager"):
            self.saved_implementation = config._experts_implementation
            config._experts_implementation = "eager"

    def _restore_implementation(self) -> None:
        if self.saved_implementation is not None:
            self.experts.config._experts_implementation = self.saved_implementation
            self.saved_implementation = None

    def _all_tokens_pass(self, args: tuple, kwargs: dict, expert: int) -> set[tuple[str, int]]:
        """Run the experts forward with every token routed to ``expert`` (weight 1), firing only its
        matrices' hooks; the output is discarded. Returns the slices it touched."""
        hidden = args[0] if args else kwargs["hidden_states"]
        index = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
        weights = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        routing = _Routing(self, fire=True, only=expert)
        with routing:
            self.experts.forward(hidden, index, weights)
        return routing.hit

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._set_eager()
        if _ALL_EXPERTS:
            _ALL_TOKEN_EXPERTS[module] = set()
            for expert in sorted({index for _, index in self._hooked()}):
                self._all_tokens_pass(args, kwargs, expert)
        self.routing = _Routing(self, fire=not _ALL_EXPERTS)
        self.routing.__enter__()

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        routing, self.routing = self.routing, None
        try:
            if routing is None:
                return
            routing.__exit__(None, None, None)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not routing.hit and isinstance(hidden, torch.Tensor) and hidden.shape[0]:
                raise ConfigError(
                    f"{type(module).__name__}'s forward multiplies no expert slice with F.linear or matmul in the "
                    "orientation its is_transposed flag states, so the tokens routed "
                    "to each expert cannot be observed: prune its experts with a data-free method (magnitude), or "
                    "exclude them (exclude=[r'experts\\.'])."
                )
            if not _ALL_EXPERTS:
                missed = sorted({index for _, index in self._hooked()} - {index for _, index in routing.hit})
                _ALL_TOKEN_EXPERTS[module] = set()
                for expert in missed:  # no routed token: statistics from all of them, stated in the result
                    _ALL_TOKEN_EXPERTS[module] |= self._all_tokens_pass(args, kwargs, expert)
        finally:
            self._restore_implementation()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Release:
    """A hook handle that also stops observing the experts module when its last hook goes."""

    def __init__(self, handle, experts: nn.Module) -> None:
        self.handle, self.experts = handle, experts

    def remove(self) -> None:
        if self.handle is None:
            return
        self.handle.remove()
        self.handle = None
        observer = _OBSERVERS.get(self.experts)
        if observer is not None:
            observer.users -= 1
            if observer.users == 0:
                observer.remove()
                del _OBSERVERS[self.experts]


def observe_experts(experts: nn.Module, handle) -> _Release:
    """Observe ``experts`` while ``handle`` (a hook on one of its matrices) is registered."""
    observer = _OBSERVERS.get(experts)
    if observer is None:
        observer = _OBSERVERS[experts] = _Observer(experts)
    observer.users += 1
    return _Release(handle, experts)


# ---------------------------------------------------------------------------------------------
# Whole experts: where the MoE blocks are, and their physical removal (structured expert dropping)

ROUTER_ATTRIBUTES = ("gate", "router")  # the sibling of an experts module that scores the experts
EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(eq=False)
class MoEBlock:
    """One routed mixture-of-experts layer: its experts module and the router that picks them.

    ``experts`` holds the experts either fused (3-D parameters ``[experts, ...]``) or as an
    ``nn.ModuleList`` of per-expert modules; ``router`` scores them (its ``weight`` has one row per
    expert); ``groups`` > 1 for group-limited routing (DeepSeek's ``n_group``: experts in contiguous
    groups of equal size, so removal must keep the groups equal).
    """

    name: str
    experts: nn.Module
    router_name: str
    router: nn.Module
    num_experts: int
    top_k: int | None
    groups: int = 1


def _count_experts(experts: nn.Module) -> int | None:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    from .adapters import expert_parameters

    sizes = {getattr(experts, attribute).shape[0] for attribute in expert_parameters(experts)}
    return sizes.pop() if len(sizes) == 1 else None


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every routed MoE layer of ``model``: a module named ``experts`` (fused 3-D parameters or a
    ModuleList) next to a ``gate``/``router`` whose weight has one row per expert. An experts
    module without such a router raises a ConfigError naming it."""
    blocks = []
    for name, parent in model.named_modules():
        experts = getattr(parent, "experts", None)
        if not isinstance(experts, nn.Module) or experts not in dict(parent.named_children()).values():
            continue
        count = _count_experts(experts)
        if not count:
            continue
        experts_name = f"{name}.experts" if name else "experts"
        routers = [(attribute, getattr(parent, attribute)) for attribute in ROUTER_ATTRIBUTES
                   if isinstance(getattr(parent, attribute, None), nn.Module)]
        routers = [(attribute, router) for attribute, router in routers
                   if isinstance(getattr(router, "weight", None), torch.Tensor) and router.weight.shape[0] == count]
        if len(routers) != 1:
            raise ConfigError(
                f"{experts_name} ({type(experts).__name__}, {count} experts) has no router next to it (a 'gate' or "
                f"'router' module whose weight has {count} rows) in {type(parent).__name__}: its experts cannot be "
                "dropped generically; exclude it or drop experts by hand."
            )
        attribute, router = routers[0]
        top_k = getattr(router, "top_k", None) or getattr(parent, "top_k", None) or getattr(
            getattr(model, "config", None), "num_experts_per_tok", None)
        groups = int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1)
        blocks.append(MoEBlock(experts_name, experts, f"{name}.{attribute}" if name else attribute, router, count,
                               int(top_k) if top_k else None, groups))
    return blocks


def _slice_rows(module: nn.Module, keep: torch.Tensor, count: int) -> None:
    """Keep rows ``keep`` of every own parameter/buffer whose first dimension is ``count``."""
    index = keep.nonzero().flatten().to(next(iter(module.parameters(recurse=False))).device)
    for name, param in list(module.named_parameters(recurse=False)):
        if param.ndim and param.shape[0] == count:
            setattr(module, name, nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.ndim and buffer.shape[0] == count:
            module._buffers[name] = buffer[index.to(buffer.device)].clone()


def _set_counts(objects: list[Any], old: int, new: int) -> None:
    """Set every expert-count attribute equal to ``old`` (num_experts, num_local_experts, ...) to ``new``."""
    for owner in objects:
        for attribute in EXPERT_COUNT_NAMES:
            if getattr(owner, attribute, None) == old:
                setattr(owner, attribute, new)
        if isinstance(owner, nn.Linear) and owner.out_features == old:
            owner.out_features = new


def remove_experts(model: nn.Module, block: MoEBlock, keep: torch.Tensor) -> None:
    """Physically remove the experts of ``block`` where ``keep`` is False: slice the fused
    parameters (and per-expert biases) or the ModuleList, the router's rows (weight, bias, score
    correction), and update the expert counts of the experts module, the router and their parent.
    The model's config is the caller's (one count for every block, :func:`set_config_expert_count`)."""
    from .adapters import _EXPERT_MATRICES

    keep = keep.bool().cpu()
    new = int(keep.sum())
    if isinstance(block.experts, nn.ModuleList):
        kept = [module for module, kept in zip(block.experts, keep.tolist(), strict=True) if kept]
        block.experts = _replace_child(model, block.name, nn.ModuleList(kept))
    else:
        _slice_rows(block.experts, keep, block.num_experts)
        _EXPERT_MATRICES.pop(block.experts, None)  # ExpertMatrix views are per (parameter, index)
    _slice_rows(block.router, keep, block.num_experts)
    parent = model.get_submodule(block.name.rpartition(".")[0]) if "." in block.name else model
    _set_counts([block.experts, block.router, parent], block.num_experts, new)
    block.num_experts = new


def _replace_child(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, new)
    return new


def set_config_expert_count(model: nn.Module, old: int, new: int) -> list[str]:
    """Set the expert counts of ``model.config`` (and its sub-configs) that equal ``old`` to ``new``;
    returns the attribute names changed, so a saved config rebuilds the smaller model."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    changed = []
    configs = [config] + [value for value in vars(config).values() if hasattr(value, "to_dict")]
    for owner in configs:
        for attribute in EXPERT_COUNT_NAMES:
            if getattr(owner, attribute, None) == old:
                setattr(owner, attribute, new)
                changed.append(attribute)
    return changed
