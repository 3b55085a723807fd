"""Channel coupling of a conv net, found once by tracing (the dependency graph of structured pruning).

``trace_channels(model, example)`` runs ``torch.fx.symbolic_trace`` plus shape propagation and
follows the channel dimension of every tensor from the layer that writes it (a Conv2d or Linear:
its *producer*) through channel-wise ops (BatchNorm, activations, pooling, dropout) to the layers
that read it (*consumers*: a Conv2d's input channels, or a Linear's input features, where a flatten
in between turns channel c into the ``c*HW .. (c+1)*HW - 1`` block of features). A residual add
merges the channel sets of its operands into one :class:`ChannelGroup`: every producer in a group
must keep the same channel indices. Channels that reach the model output, or meet the input, are
``fixed`` (not prunable). Ops whose effect on channels is unknown raise
:class:`~sparsewise.errors.UnsupportedModelError` naming the node, never a silent guess.

The graph holds names and sizes only; :mod:`.surgery` changes the modules.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError

__all__ = ["ChannelGraph", "ChannelGroup", "Consumer", "LayerShape", "trace_channels"]

# modules and functions that act on each channel separately (channel dim passes through unchanged)
CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                       nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
NORM_MODULES = (nn.BatchNorm2d, nn.BatchNorm1d)
CHANNELWISE_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish,
                         F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                         torch.relu, torch.sigmoid, torch.tanh, operator.neg}
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to"}
ADD_OPS = {operator.add, operator.iadd, torch.add}
FLATTEN_FUNCTIONS = {torch.flatten}
RESHAPE_METHODS = {"view", "reshape", "flatten"}


@dataclass
class Consumer:
    """A layer reading a group's channels: ``expand`` input features per channel (1 for a Conv2d,
    H*W for a Linear after a flatten of an [N, C, H, W] map)."""

    name: str
    expand: int = 1


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together (a residual add couples its operands)."""

    index: int
    size: int
    producers: list[str] = field(default_factory=list)  # Conv2d / Linear whose output rows are these channels
    norms: list[str] = field(default_factory=list)  # BatchNorm layers over these channels
    consumers: list[Consumer] = field(default_factory=list)
    fixed: bool = False
    why_fixed: str = ""


@dataclass
class LayerShape:
    """One Conv2d/Linear: its group of input and output channels (None = fixed input) and the
    multiply-accumulates per sample when every channel is kept."""

    name: str
    in_group: int | None
    out_group: int
    macs: int
    params_per_pair: int  # weights per (input channel, output channel) pair: k*k / groups, 1 for Linear
    in_expand: int = 1


class ChannelGraph:
    """The traced channel groups of a model (see the module docstring)."""

    def __init__(self, groups: list[ChannelGroup], layers: dict[str, LayerShape]):
        self.groups, self.layers = groups, layers

    def prunable(self) -> list[ChannelGroup]:
        return [group for group in self.groups if not group.fixed]

    def group_of(self, producer: str) -> ChannelGroup:
        for group in self.groups:
            if producer in group.producers:
                return group
        raise KeyError(f"{producer!r} is not a Conv2d/Linear producer of the traced model")

    def macs(self, widths: dict[int, int] | None = None) -> int:
        """Multiply-accumulates per sample of every traced Conv2d/Linear at the given group widths
        (missing groups keep their full size): each layer scales by kept_in/in * kept_out/out."""
        widths = widths or {}
        total = 0.0
        for layer in self.layers.values():
            scale = widths.get(layer.out_group, self.groups[layer.out_group].size) / self.groups[layer.out_group].size
            if layer.in_group is not None:
                group = self.groups[layer.in_group]
                scale *= widths.get(group.index, group.size) / group.size
            total += layer.macs * scale
        return int(round(total))

    def describe(self) -> str:
        lines = []
        for group in self.groups:
            state = f"fixed ({group.why_fixed})" if group.fixed else "prunable"
            readers = ", ".join(f"{c.name}x{c.expand}" if c.expand > 1 else c.name for c in group.consumers)
            lines.append(f"group {group.index}: {group.size} ch, {state}; written by {', '.join(group.producers)}; "
                         f"norms {', '.join(group.norms) or '-'}; read by {readers or '-'}")
        return "\n".join(lines)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)
        return min(a, b)


@dataclass
class _Flow:
    """What dim 1 of a traced tensor holds: channels of ``group`` (``expand`` features each)."""

    group: int
    expand: int = 1


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def trace_channels(model: nn.Module, example: torch.Tensor) -> ChannelGraph:
    """Trace ``model`` on ``example`` (one input batch) and return its channel groups."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError on data-dependent control flow)
        raise UnsupportedModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}); structured pruning "
            "needs a traceable forward: move data-dependent Python control flow out of forward(), or wrap "
            "the untraceable part with torch.fx.wrap.") from error
    was_training = model.training
    traced.eval()
    with torch.no_grad():
        ShapeProp(traced).propagate(example)
    model.train(was_training)
    modules = dict(traced.named_modules())
    sets = _UnionFind()
    sizes: list[int] = []
    producers: dict[int, list[str]] = {}
    norms: dict[int, list[str]] = {}
    consumers: dict[int, list[Consumer]] = {}
    fixed: dict[int, str] = {}
    layers: dict[str, LayerShape] = {}
    flows: dict[fx.Node, _Flow | None] = {}
    seen_modules: set[str] = set()

    def tensor_args(node: fx.Node) -> list[fx.Node]:
        return [arg for arg in _flat_nodes((node.args, node.kwargs)) if _shape(arg) is not None]

    def unknown(node: fx.Node, flow: _Flow) -> UnsupportedModelError:
        writers = producers.get(sets.find(flow.group), [])
        return UnsupportedModelError(
            f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}) reads the channels written by "
            f"{', '.join(writers) or 'a traced layer'} and structured pruning does not know how it maps channels; "
            "keep that op out of the pruned path (e.g. express it as a supported module: Conv2d groups=1, "
            "BatchNorm, activations, pooling, Flatten, Linear, residual +).")

    for node in traced.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr":
            flows[node] = None
            continue
        if node.op == "output":
            for arg in _flat_nodes(node.args):
                flow = flows.get(arg)
                if flow is not None:
                    fixed[sets.find(flow.group)] = "reaches the model output"
            continue
        inputs = [flows.get(arg) for arg in tensor_args(node)]
        tracked = [flow for flow in inputs if flow is not None]
        out_shape = _shape(node)
        if node.op == "call_module":
            module = modules[node.target]
            name = str(node.target)
            if isinstance(module, (nn.Conv2d, nn.Linear, *NORM_MODULES)):
                if name in seen_modules:
                    raise UnsupportedModelError(f"layer {name!r} is called more than once in forward(); shared "
                                                "layers cannot be pruned per call: give each call its own module.")
                seen_modules.add(name)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                flow = inputs[0] if inputs else None
                if isinstance(module, nn.Conv2d):
                    if module.groups != 1:
                        raise UnsupportedModelError(
                            f"layer {name!r} is a grouped/depthwise Conv2d (groups={module.groups}); channel "
                            "surgery handles groups=1 only: exclude this part of the model or use plain convs.")
                    if flow is not None and flow.expand != 1:
                        raise unknown(node, flow)
                    per_pair = module.kernel_size[0] * module.kernel_size[1]
                    positions = out_shape[2] * out_shape[3]
                    macs = positions * module.in_channels * module.out_channels * per_pair
                else:
                    in_shape = _shape(tensor_args(node)[0])
                    if len(in_shape) != 2 and flow is not None:
                        raise UnsupportedModelError(
                            f"layer {name!r} is a Linear applied to a {len(in_shape)}-D tensor whose dim 1 holds "
                            "pruned channels; flatten to [batch, features] before it.")
                    per_pair = 1
                    macs = module.in_features * module.out_features
                group = sets.new()
                sizes.append(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)
                producers[group] = [name]
                in_group = None
                if flow is not None:
                    in_group = flow.group
                    consumers.setdefault(flow.group, []).append(Consumer(name, flow.expand))
                layers[name] = LayerShape(name, in_group, group, macs, per_pair, flow.expand if flow else 1)
                flows[node] = _Flow(group)
                continue
            if isinstance(module, NORM_MODULES):
                flow = inputs[0] if inputs else None
                if flow is not None:
                    if flow.expand != 1:
                        raise unknown(node, flow)
                    norms.setdefault(flow.group, []).append(name)
                flows[node] = flow
                continue
            if isinstance(module, CHANNELWISE_MODULES):
                flows[node] = inputs[0] if inputs else None
                continue
            if isinstance(module, nn.Flatten):
                flows[node] = _flatten(node, inputs[0] if inputs else None, module.start_dim, unknown)
                continue
            if tracked:
                raise unknown(node, tracked[0])
            flows[node] = None
            continue
        # call_function / call_method
        target = node.target
        if out_shape is None:  # x.size(0), x.shape: not a tensor
            flows[node] = None
            continue
        if target in ADD_OPS or target in (operator.mul, torch.mul, operator.sub, torch.sub, operator.truediv):
            if len(tracked) == len(tensor_args(node)) and len(tracked) >= 1:
                first = tracked[0]
                for other in tracked[1:]:
                    if other.expand != first.expand:
                        raise unknown(node, other)
                    sets.union(first.group, other.group)
                flows[node] = _Flow(sets.find(first.group), first.expand)
            elif tracked:  # a traced channel set meets a tensor with untraced channels (e.g. the input)
                for flow in tracked:
                    fixed[sets.find(flow.group)] = f"combined with an untraced tensor at {node.name!r}"
                flows[node] = _Flow(sets.find(tracked[0].group), tracked[0].expand)
            else:
                flows[node] = None
            continue
        if target in CHANNELWISE_FUNCTIONS or (node.op == "call_method" and target in CHANNELWISE_METHODS):
            flows[node] = inputs[0] if inputs else None
            continue
        if target in FLATTEN_FUNCTIONS or (node.op == "call_method" and target in RESHAPE_METHODS):
            flow = inputs[0] if inputs else None
            if flow is not None and target in ("view", "reshape"):
                _check_reshape(node, flow, unknown)
            if target in ("view", "reshape"):
                start = 1  # checked by _flatten: [N, ...] -> [N, features]
            else:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            flows[node] = _flatten(node, flow, start, unknown)
            continue
        if tracked:
            raise unknown(node, tracked[0])
        flows[node] = None

    # collapse the union-find into numbered groups
    roots = sorted({sets.find(i) for i in range(len(sizes))})
    number = {root: index for index, root in enumerate(roots)}
    groups = [ChannelGroup(index, sizes[root]) for index, root in enumerate(roots)]
    for raw in range(len(sizes)):
        group = groups[number[sets.find(raw)]]
        if sizes[raw] != group.size:
            raise UnsupportedModelError(f"residual add of {producers[raw]} ({sizes[raw]} channels) and "
                                        f"{group.producers} ({group.size} channels): sizes differ.")
        group.producers += producers.get(raw, [])
        group.norms += norms.get(raw, [])
        group.consumers += consumers.get(raw, [])
        if raw in fixed:
            group.fixed, group.why_fixed = True, fixed[raw]
    for layer in layers.values():
        layer.out_group = number[sets.find(layer.out_group)]
        if layer.in_group is not None:
            layer.in_group = number[sets.find(layer.in_group)]
    return ChannelGraph(groups, layers)


def _flat_nodes(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, lambda node: found.append(node) or node)
    return found


def _flatten(node: fx.Node, flow: _Flow | None, start_dim: int, unknown) -> _Flow | None:
    """Flatten of [N, C, H, W] from dim 1: channel c becomes features c*HW .. (c+1)*HW - 1."""
    if flow is None:
        return None
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if start_dim != 1 or len(out_shape) != 2 or out_shape[0] != in_shape[0]:
        raise unknown(node, flow)
    positions = 1
    for extent in in_shape[2:]:
        positions *= extent
    return _Flow(flow.group, flow.expand * positions)


def _check_reshape(node: fx.Node, flow: _Flow, unknown) -> None:
    """x.view(N, -1) is fine; a literal feature count (x.view(-1, 32*7*7)) would break after pruning."""
    in_shape = _shape(node.args[0])
    features = 1
    for extent in in_shape[1:]:
        features *= extent
    sizes = [arg for arg in node.args[1:] if isinstance(arg, int)]
    if features in sizes and features != 1:
        raise UnsupportedModelError(
            f"node {node.name!r} reshapes to a literal {features} features, which changes when channels are "
            "removed; write x.flatten(1) or x.view(x.size(0), -1) instead.")
