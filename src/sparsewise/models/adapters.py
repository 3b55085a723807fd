"""Generic model adapters: find the repeated blocks and the prunable linears of any model.

CONTRACT (implemented by the models helper; used by calibration/oneshot/formats/metrics):

PrunableLayer
    name: str                 fully qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module         nn.Linear or transformers' Conv1D (GPT-2, weight stored [in, out])
    in_features / out_features: int
    get_weight() -> Tensor    the weight as [out, in] (a transposed *copy-free view* for Conv1D)
    set_weight(w: Tensor)     write a [out, in] tensor back (in place, keeping dtype/device/layout)

ModelAdapter(model, include=None, exclude=None, targets="blocks")
    model: nn.Module
    family: str               "llama", "gpt2", "opt", "phi3", "bert", "vit", ... or "generic"
    blocks: list[tuple[str, nn.Module]]   the repeated blocks in execution order, with names
    stack_starts: list[int]   index in ``blocks`` of each stack's first block ([0] for one stack)
    stacks: list[list[tuple[str, nn.Module]]]   ``blocks`` split into its stacks
    block_layers(index) -> dict[str, PrunableLayer]   prunable layers of one block, in execution order
    prunable_layers() -> dict[str, PrunableLayer]     all of them (filtered by include/exclude)
    extra_layers() -> dict[str, PrunableLayer]        linears outside blocks that were asked for
                                                      (lm_head / embeddings only when targets asks)
    Include/exclude are lists of regular expressions matched with re.search against full names.
    Raise UnsupportedModelError with a clear message when no block list can be found.

Implementation notes
--------------------
Nothing here knows a model family's attribute paths. The blocks are the ``nn.ModuleList`` whose
children all share one class and hold at least one Linear/Conv1D. A model may hold several such
*stacks* (an encoder-decoder's encoder and decoder): every outermost qualifying list is one
(lists nested in another, such as per-expert MLP lists inside blocks, are not; a list of bare
Linears counts only when it is the largest list, so a pair of heads is no stack). ``blocks``
is the concatenation of the stacks in module-tree order, which is their execution order in
every encoder-decoder of transformers (the calibration engine checks it on the first forward);
``stack_starts`` holds the index of each stack's first block. ``blocks=[...]`` (module names)
overrides the discovery; consecutive names under one parent form one stack.

Selection rules, in order:

* block layers: every ``nn.Linear`` / ``Conv1D`` inside the blocks, in registration order;
* ``include``: each pattern that matches some block layer *restricts* the block layers to the
  matches of such patterns; a pattern that matches only layers outside the blocks *adds* those
  layers as extras. So ``include=["lm_head"]`` keeps every block layer and adds ``lm_head``,
  while ``include=["mlp"]`` keeps only MLP layers. A pattern that matches no layer at all is an
  error (a typo would otherwise silently prune everything);
* ``targets="all"`` adds every Linear/Conv1D outside the blocks (lm_head, poolers, projections);
* ``exclude`` always removes, last.

Mixture-of-experts blocks: a fused expert parameter (3-D, ``[experts, out, in]``, e.g. Mixtral's
``experts.gate_up_proj``; ``[experts, in, out]`` when the experts module says ``is_transposed``) is
split into one :class:`ExpertLayer` per expert, named ``<parameter>.<expert>``
(``model.layers.0.mlp.experts.gate_up_proj.3``), whose get/set_weight read and write that slice.
Per-expert ``nn.Linear`` lists are ordinary linears already. A router (a ``gate``, ``router`` or
``shared_expert_gate`` linear next to an experts module) is never a block layer: a few weights
decide every route. Hooks on an expert layer see the tokens routed to that expert
(:mod:`sparsewise.models.experts`), so calibrated methods get per-expert statistics.

Embeddings (``nn.Embedding``) are never prunable layers. A selected layer whose weight is the
same tensor as an embedding's (a tied ``lm_head``) gets ``tied=True`` so callers can warn that
pruning it also prunes the input embedding.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, PatternError, UnsupportedModelError

__all__ = ["ExpertLayer", "ExpertMatrix", "ModelAdapter", "PrunableLayer", "expert_parameters", "find_block_stacks",
           "is_prunable_module", "stack_starts_of", "unwrap_parallel", "weight_layers"]

TARGETS = ("blocks", "all")


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


_CONV1D = _conv1d_class()


def _is_conv1d(module: nn.Module) -> bool:
    return _CONV1D is not None and isinstance(module, _CONV1D)


def is_prunable_module(module: nn.Module) -> bool:
    """True for the layer types sparsewise prunes: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@dataclass(eq=False)
class PrunableLayer:
    """One prunable weight, seen as a [out, in] matrix whatever its storage layout.

    ``block`` is the index of the block that holds it (None for extras such as ``lm_head``);
    ``tied`` is True when the weight is shared with an input embedding.
    """

    name: str
    module: nn.Module
    block: int | None = None
    tied: bool = False

    @property
    def transposed(self) -> bool:
        """True when the module stores its weight as [in, out] (transformers' Conv1D)."""
        return _is_conv1d(self.module)

    @property
    def is_conv(self) -> bool:
        """True for ``nn.Conv2d`` (sparse training only; one-shot pruning targets linears)."""
        return isinstance(self.module, nn.Conv2d)

    @property
    def in_features(self) -> int:
        shape = self.module.weight.shape
        if self.is_conv:  # one row holds kh * kw * in_channels weights
            return int(shape[1] * shape[2] * shape[3])
        return int(shape[0] if self.transposed else shape[1])

    @property
    def out_features(self) -> int:
        shape = self.module.weight.shape
        return int(shape[1] if self.transposed else shape[0])

    def to_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the stored weight, as [out, in] rows (a view except for convs).

        Conv2d rows run (kh, kw, in_channel) with the input channel fastest, so N:M groups of
        consecutive entries lie along input channels (the NHWC order of SR-STE's conv masks).
        """
        if self.is_conv:
            return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
        return tensor.T if self.transposed else tensor

    def from_rows(self, rows: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_rows`: [out, in] rows back to the stored weight's shape.

        ``shape`` is the stored weight's shape (read from the module when None); pass it where
        reading ``module.weight`` would re-enter a parametrization (STE forward weights).
        """
        if self.is_conv:
            out_channels, in_channels, kh, kw = self.module.weight.shape if shape is None else shape
            return rows.reshape(out_channels, kh, kw, in_channels).permute(0, 3, 1, 2)
        return rows.T if self.transposed else rows

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def get_weight(self) -> torch.Tensor:
        """The weight as [out, in]: a detached view sharing storage with the module (no copy;
        a copy for Conv2d, whose rows are reordered, see :meth:`to_rows`)."""
        return self.to_rows(self.module.weight.detach())

    def check_new_weight(self, weight: torch.Tensor) -> None:
        """Refuse a replacement weight that is not [out, in] for this layer."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise PatternError(
                f"{self.name}: new weight has shape {tuple(weight.shape)}, expected [out, in] = {list(expected)}; "
                "pass the weight in [out, in] layout (get_weight() returns it that way)."
            )

    def set_weight(self, weight: torch.Tensor) -> None:
        """Write a [out, in] tensor into the module in place (dtype, device and layout are kept)."""
        self.check_new_weight(weight)
        with torch.no_grad():
            # copy_ converts dtype/device and keeps the Parameter object, so optimizers, tied
            # references and hooks stay valid.
            self.module.weight.copy_(self.from_rows(weight))

    def __repr__(self) -> str:
        kind = "Conv1D" if self.transposed else type(self.module).__name__
        extra = ", tied" if self.tied else ""
        return f"PrunableLayer({self.name!r}, {kind}, out={self.out_features}, in={self.in_features}{extra})"


class ExpertMatrix(nn.Module):
    """One expert's matrix inside a fused 3-D parameter, seen as a module of its own.

    It is not registered in the model (the model's tree and state_dict stay unchanged); one
    instance per (experts module, parameter, expert) is kept, so every adapter hands out the same
    object. ``weight`` is the whole fused parameter (what callers compare by identity, e.g. to
    tell layer weights from a block's other parameters); ``matrix()`` is this expert's [out, in]
    view; calling it computes ``x @ matrix().T``.
    """

    def __init__(self, experts: nn.Module, attribute: str, index: int) -> None:
        super().__init__()
        # a weak reference, not a child module: the cache below must not keep a dropped model alive
        self._experts = weakref.ref(experts)
        self.attribute, self.index = attribute, index

    @property
    def experts(self) -> nn.Module:
        experts = self._experts()
        if experts is None:
            raise ConfigError(f"the experts module of {self.attribute}[{self.index}] no longer exists.")
        return experts

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.experts, self.attribute)

    @property
    def stored_transposed(self) -> bool:
        """True when the experts store [experts, in, out] (transformers' ``is_transposed`` flag)."""
        return bool(getattr(self.experts, "is_transposed", False))

    def matrix(self) -> torch.Tensor:
        """This expert's weight as [out, in], a view of the fused parameter."""
        matrix = self.weight[self.index]
        return matrix.T if self.stored_transposed else matrix

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(inputs, self.matrix())

    # The experts module computes all experts in one forward and never calls this module: while
    # a hook is registered here, the experts module is observed so that its per-expert products
    # run through this module (models.experts), and the hook sees the tokens routed to it.
    def register_forward_pre_hook(self, *args, **kwargs):
        from .experts import observe_experts

        return observe_experts(self.experts, super().register_forward_pre_hook(*args, **kwargs))

    def register_forward_hook(self, *args, **kwargs):
        from .experts import observe_experts

        return observe_experts(self.experts, super().register_forward_hook(*args, **kwargs))

    def extra_repr(self) -> str:
        return f"{type(self.experts).__name__}.{self.attribute}[{self.index}]"


_EXPERT_MATRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # experts module -> {(attr, i): matrix}


def _expert_matrix(experts: nn.Module, attribute: str, index: int) -> ExpertMatrix:
    cache = _EXPERT_MATRICES.setdefault(experts, {})
    if (attribute, index) not in cache:
        cache[(attribute, index)] = ExpertMatrix(experts, attribute, index)
    return cache[(attribute, index)]


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s own fused expert parameters: 3-D parameters of a module that is not a
    convolution (a Conv1d weight is 3-D too), registered directly on it."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    return [name for name, param in module.named_parameters(recurse=False) if param.ndim == 3]


@dataclass(eq=False)
class ExpertLayer(PrunableLayer):
    """Expert ``module.index`` of a fused 3-D parameter as a [out, in] layer (``module`` is its
    :class:`ExpertMatrix`); masks, records and set_weight touch only that slice."""

    @property
    def transposed(self) -> bool:
        return False  # get/set_weight already present [out, in]; the slice's storage order is the matrix's concern

    @property
    def is_conv(self) -> bool:
        return False

    @property
    def in_features(self) -> int:
        return int(self.module.matrix().shape[1])

    @property
    def out_features(self) -> int:
        return int(self.module.matrix().shape[0])

    def to_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the stored (fused) parameter, e.g. its gradient, as this expert's
        [out, in] rows (a view); an [out, in] tensor is returned as it is."""
        if tensor.ndim == 3 and tensor.shape == self.module.weight.shape:
            rows = tensor[self.module.index]
            return rows.T if self.module.stored_transposed else rows
        return tensor

    def from_rows(self, rows: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        return rows

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module.experts, f"{self.module.attribute}_bias", None)  # gpt-oss style expert biases
        return bias[self.module.index] if isinstance(bias, torch.Tensor) and bias.ndim == 2 else None

    def get_weight(self) -> torch.Tensor:
        """This expert's weight as [out, in]: a detached view of the fused parameter (no copy)."""
        return self.module.matrix().detach()

    def set_weight(self, weight: torch.Tensor) -> None:
        self.check_new_weight(weight)
        with torch.no_grad():
            self.module.matrix().copy_(weight)  # a view: writes into the fused parameter in place

    def __repr__(self) -> str:
        return f"ExpertLayer({self.name!r}, out={self.out_features}, in={self.in_features})"


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The real model inside a DistributedDataParallel / DataParallel wrapper (else ``model``):
    hooks, masks and buffers belong on the wrapped modules."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


def weight_layers(model: nn.Module, include: Sequence[str] | str | None = None,
                  exclude: Sequence[str] | str | None = None) -> dict[str, PrunableLayer]:
    """Every Linear / Conv1D / Conv2d of a model, for models without repeated blocks (a small CNN
    or MLP trained sparse). ``include`` keeps only matching names, ``exclude`` removes."""
    keep, drop = _compile(include, "include"), _compile(exclude, "exclude")
    layers: dict[str, PrunableLayer] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not (is_prunable_module(module) or isinstance(module, nn.Conv2d)) or id(module) in seen:
            continue
        seen.add(id(module))
        if (keep and not any(p.search(name) for p in keep)) or any(p.search(name) for p in drop):
            continue
        layers[name] = PrunableLayer(name=name, module=module)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Linear/Conv1D/Conv2d layer matching the selection.")
    return layers


def _unique_param_count(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def _is_router(block: nn.Module, sub_name: str) -> bool:
    """True for the linear that routes tokens to experts (``mlp.gate`` next to ``mlp.experts``,
    Qwen2-MoE's ``shared_expert_gate``): never pruned by default, a few weights decide every route."""
    parent_name, _, attribute = sub_name.rpartition(".")
    if attribute not in ROUTER_NAMES:
        return False
    parent = block.get_submodule(parent_name) if parent_name else block
    return any("expert" in child for child, _ in parent.named_children())


def _holds_prunable(module: nn.Module) -> bool:
    return any(is_prunable_module(sub) for sub in module.modules())


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` whose children share one class and hold Linear/Conv1D layers."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and all(_holds_prunable(child) for child in module):
            found.append((name, module))
    return found


def _inside(name: str, other: str) -> bool:
    """True when module ``name`` lies inside module ``other`` (``""`` is the root, holding all)."""
    return name != other and (other == "" or name.startswith(f"{other}."))


def stack_starts_of(blocks: Sequence[tuple[str, nn.Module]]) -> list[int]:
    """Index of each stack's first block in ``blocks`` ((name, module) in walk order): a new stack
    begins where a block's parent module differs from the previous block's."""
    parents = [name.rpartition(".")[0] for name, _ in blocks]
    return [index for index, parent in enumerate(parents) if index == 0 or parent != parents[index - 1]]


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The block lists to prune, in module-tree order: the largest qualifying list
    (:func:`find_block_lists`, most parameters) plus every other one that is neither nested in
    nor holds another, and whose children are blocks rather than bare Linears (an
    encoder-decoder's second stack, not a list of heads). Empty when no list qualifies."""
    candidates = find_block_lists(model)
    if not candidates:
        return []
    # max() keeps the first of equals, i.e. the outermost/earliest list.
    largest = max(candidates, key=lambda item: _unique_param_count(item[1]))
    names = [name for name, _ in candidates]
    return [(name, block_list) for name, block_list in candidates
            if name == largest[0]
            or (not any(_inside(name, other) or _inside(other, name) for other in names)
                and not any(is_prunable_module(child) for child in block_list))]


def _compile(patterns: Sequence[str] | str | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"{what} pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    return compiled


def _embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


class ModelAdapter:
    """Finds a model's repeated blocks and prunable layers, generically (see module docstring).

    model:    any nn.Module (transformers model or a plain user module)
    include:  regexes (re.search on full module names) restricting block layers / adding extras
    exclude:  regexes removing layers, applied last
    targets:  "blocks" (default: only block layers, plus extras named by ``include``) or "all"
              (also every Linear/Conv1D outside the blocks, e.g. ``lm_head``)
    blocks:   module names of the blocks, overriding discovery (e.g. ["encoder.0", "encoder.1"])

    The adapter reads the module tree at each call, so it stays valid after weights change; build
    a new one after *replacing* modules.
    """

    def __init__(
        self,
        model: nn.Module,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        targets: str = "blocks",
        blocks: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}.")
        if targets not in TARGETS:
            raise ConfigError(f"targets must be one of {', '.join(TARGETS)}; got {targets!r}.")
        self.model = model
        self.targets = targets
        self._exclude = _compile(exclude, "exclude")
        self.blocks: list[tuple[str, nn.Module]] = (
            self._named_blocks(blocks) if blocks is not None else self._discover_blocks()
        )
        self.stack_starts: list[int] = stack_starts_of(self.blocks)
        self._restrict, self._add = self._split_include(_compile(include, "include"))

    # ----------------------------------------------------------------- discovery
    @property
    def family(self) -> str:
        config = getattr(self.model, "config", None)
        model_type = getattr(config, "model_type", None)
        return model_type if isinstance(model_type, str) and model_type else "generic"

    @property
    def stacks(self) -> list[list[tuple[str, nn.Module]]]:
        """``blocks`` split into its stacks (an encoder-decoder: [encoder blocks, decoder blocks])."""
        ends = [*self.stack_starts[1:], len(self.blocks)]
        return [self.blocks[start:end] for start, end in zip(self.stack_starts, ends, strict=True)]

    def _discover_blocks(self) -> list[tuple[str, nn.Module]]:
        stacks = find_block_stacks(self.model)
        if not stacks:
            n_linear = sum(1 for m in self.model.modules() if is_prunable_module(m))
            raise UnsupportedModelError(
                f"could not find the repeated blocks of {type(self.model).__name__} "
                f"({n_linear} Linear/Conv1D layers found): sparsewise needs the model's repeated blocks in an "
                "nn.ModuleList whose children share one class and contain nn.Linear (or Conv1D) layers. "
                "Put the blocks in an nn.ModuleList, or pass blocks=[...] with their module names explicitly."
            )
        blocks = []
        for list_name, block_list in stacks:
            prefix = f"{list_name}." if list_name else ""
            blocks += [(f"{prefix}{index}", child) for index, child in enumerate(block_list)]
        return blocks

    def _named_blocks(self, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
        if isinstance(names, str):
            names = [names]
        if not names:
            raise ConfigError("blocks=[] names no block; pass the module names of the repeated blocks.")
        resolved = []
        for name in names:
            try:
                resolved.append((name, self.model.get_submodule(name)))
            except AttributeError as exc:
                top = ", ".join(n for n, _ in self.model.named_children()) or "none"
                raise ConfigError(
                    f"blocks: {type(self.model).__name__} has no submodule {name!r} (top-level children: {top}); "
                    "use names as printed by model.named_modules()."
                ) from exc
        return resolved

    # ----------------------------------------------------------------- layers
    def _iter_block_candidates(self, index: int) -> Iterator[PrunableLayer]:
        block_name, block = self.blocks[index]
        seen: set[int] = set()
        for sub_name, module in block.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            name = f"{block_name}.{sub_name}" if sub_name else block_name
            if is_prunable_module(module) and not _is_router(block, sub_name):
                yield PrunableLayer(name=name, module=module, block=index)
            for attribute in expert_parameters(module):  # fused experts: one layer per expert
                for expert in range(getattr(module, attribute).shape[0]):
                    yield ExpertLayer(name=f"{name}.{attribute}.{expert}",
                                      module=_expert_matrix(module, attribute, expert), block=index)

    def _iter_outside_candidates(self) -> Iterator[PrunableLayer]:
        inside = {id(m) for _, block in self.blocks for m in block.modules()}
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            if is_prunable_module(module) and id(module) not in inside and id(module) not in seen:
                seen.add(id(module))
                yield PrunableLayer(name=name, module=module, block=None)

    def _split_include(self, include: list[re.Pattern]) -> tuple[list[re.Pattern], list[re.Pattern]]:
        """Sort include patterns into ones restricting block layers and ones adding extras."""
        if not include:
            return [], []
        block_names = [layer.name for i in range(len(self.blocks)) for layer in self._iter_block_candidates(i)]
        outside_names = [layer.name for layer in self._iter_outside_candidates()]
        restrict, add = [], []
        for pattern in include:
            if any(pattern.search(n) for n in block_names):
                restrict.append(pattern)
            elif any(pattern.search(n) for n in outside_names):
                add.append(pattern)
            else:
                examples = ", ".join((block_names + outside_names)[:4])
                raise ConfigError(
                    f"include pattern {pattern.pattern!r} matches no Linear/Conv1D layer of "
                    f"{type(self.model).__name__}; patterns are regexes searched in full module names such as "
                    f"{examples}."
                )
        return restrict, add

    def _excluded(self, name: str) -> bool:
        return any(pattern.search(name) for pattern in self._exclude)

    def _mark_tied(self, layers: Iterable[PrunableLayer]) -> dict[str, PrunableLayer]:
        embedding_ids = _embedding_weight_ids(self.model)
        out = {}
        for layer in layers:
            layer.tied = id(layer.module.weight) in embedding_ids
            out[layer.name] = layer
        return out

    def block_layers(self, index: int) -> dict[str, PrunableLayer]:
        """Prunable layers of block ``index`` (include/exclude applied), in registration order."""
        if not -len(self.blocks) <= index < len(self.blocks):
            raise IndexError(f"block index {index} out of range: the model has {len(self.blocks)} blocks.")
        index %= len(self.blocks)
        selected = (
            layer
            for layer in self._iter_block_candidates(index)
            if (not self._restrict or any(p.search(layer.name) for p in self._restrict))
            and not self._excluded(layer.name)
        )
        return self._mark_tied(selected)

    def extra_layers(self) -> dict[str, PrunableLayer]:
        """Linear/Conv1D layers outside the blocks that were asked for (``include`` or ``targets="all"``)."""
        selected = (
            layer
            for layer in self._iter_outside_candidates()
            if (self.targets == "all" or any(p.search(layer.name) for p in self._add))
            and not self._excluded(layer.name)
        )
        return self._mark_tied(selected)

    def prunable_layers(self) -> dict[str, PrunableLayer]:
        """Every selected layer: block layers in block order, then the extras."""
        layers: dict[str, PrunableLayer] = {}
        for index in range(len(self.blocks)):
            layers.update(self.block_layers(index))
        layers.update(self.extra_layers())
        return layers

    def counted_parameters(self) -> int:
        """Number of weights (biases excluded) in the selected prunable layers."""
        return sum(layer.numel for layer in self.prunable_layers().values())

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return (
            f"ModelAdapter(family={self.family!r}, blocks={len(self.blocks)}, "
            f"layers={len(self.prunable_layers())}, targets={self.targets!r})"
        )
