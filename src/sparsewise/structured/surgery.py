"""Model surgery on traced channel groups: zero, fold or physically remove channels.

``keep`` maps a group index of a :class:`~.graph.ChannelGraph` to the sorted channel indices to keep.
:func:`remove_channels` rebuilds every producer (Conv2d/Linear output rows and bias), norm
(BatchNorm weight, bias, running statistics) and consumer (Conv2d input channels; Linear input
features, channel c of an [N, C, H, W] map flattened into features c*HW .. (c+1)*HW - 1) so the
model runs with the same forward code at the new widths. :func:`zero_channels` is the masked twin
(the removed channels output exactly 0), so ``remove_channels`` leaves the output unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .graph import ChannelGraph

__all__ = ["fold_removed_into_bias", "keep_all", "nonzero_channels", "remove_channels", "removed_channels",
           "zero_channels"]


def keep_all(graph: ChannelGraph) -> dict[int, torch.Tensor]:
    return {group.index: torch.arange(group.size) for group in graph.prunable()}


def _checked(graph: ChannelGraph, keep: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    checked = {}
    for index, indices in keep.items():
        group = graph.groups[index]
        indices = torch.as_tensor(indices, dtype=torch.long).unique(sorted=True)
        if group.fixed and len(indices) != group.size:
            raise ConfigError(f"channels of {', '.join(group.producers)} are fixed ({group.why_fixed}); "
                              "they cannot be removed.")
        if len(indices) == 0:
            raise ConfigError(f"keeping no channel of {', '.join(group.producers)} would cut the network; "
                              "keep at least one (raise the ratio).")
        if int(indices.min()) < 0 or int(indices.max()) >= group.size:
            raise ConfigError(f"keep indices of {', '.join(group.producers)} must lie in [0, {group.size}).")
        checked[index] = indices
    return checked


def removed_channels(graph: ChannelGraph, keep: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Complement of ``keep`` per group."""
    removed = {}
    for index, indices in _checked(graph, keep).items():
        mask = torch.ones(graph.groups[index].size, dtype=torch.bool)
        mask[indices] = False
        removed[index] = mask.nonzero().flatten()
    return removed


def _features(channels: torch.Tensor, expand: int) -> torch.Tensor:
    """Input features of channels after a flatten: c -> c*expand .. c*expand + expand - 1."""
    return (channels.unsqueeze(1) * expand + torch.arange(expand)).flatten()


@torch.no_grad()
def zero_channels(model: nn.Module, graph: ChannelGraph, keep: dict[int, torch.Tensor], *,
                  keep_norm_bias: bool = False) -> None:
    """Masked original: removed channels' producer rows and biases and BN scales set to 0 (BN biases
    too unless ``keep_norm_bias``, the network-slimming state where gamma = 0 leaves a constant beta)."""
    for index, removed in removed_channels(graph, keep).items():
        group = graph.groups[index]
        for name in group.producers:
            layer = model.get_submodule(name)
            layer.weight[removed] = 0
            if layer.bias is not None:
                layer.bias[removed] = 0
        for name in group.norms:
            norm = model.get_submodule(name)
            norm.weight[removed] = 0
            if not keep_norm_bias:
                norm.bias[removed] = 0


@torch.no_grad()
def fold_removed_into_bias(model: nn.Module, graph: ChannelGraph, keep: dict[int, torch.Tensor],
                           example: torch.Tensor) -> None:
    """Network-slimming bias compensation: a removed channel whose producer is zeroed still carries
    the constant act(beta) (BN) or act(bias); add its contribution to each consumer's bias,
    b' = b + sum_{c removed} W[:, c] * const_c (a conv sums W over its kernel: exact away from zero
    padding; exact for a Linear). The constants are read by one forward pass on ``example`` with the
    removed producers zeroed (model in eval mode)."""
    removed = {index: channels for index, channels in removed_channels(graph, keep).items() if len(channels)}
    if not removed:
        return
    saved = {}
    for index, channels in removed.items():
        group = graph.groups[index]
        for name in group.producers + group.norms:
            weight = model.get_submodule(name).weight
            saved[name] = weight[channels].clone()
            weight[channels] = 0
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(consumer.name).register_forward_pre_hook(
        lambda module, args, name=consumer.name: inputs.__setitem__(name, args[0].detach()))
        for index in removed for consumer in graph.groups[index].consumers]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        for index, channels in removed.items():
            for name in graph.groups[index].producers + graph.groups[index].norms:
                model.get_submodule(name).weight[channels] = saved[name]
    for index, channels in removed.items():
        for consumer in graph.groups[index].consumers:
            layer = model.get_submodule(consumer.name)
            seen = inputs[consumer.name]
            if isinstance(layer, nn.Conv2d):
                constant = seen[:, channels].mean(dim=(0, 2, 3))
                delta = layer.weight[:, channels].sum(dim=(2, 3)) @ constant
            else:
                features = _features(channels, consumer.expand)
                delta = layer.weight[:, features] @ seen[:, features].mean(dim=0)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            layer.bias += delta


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _rebuilt_layer(layer: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None) -> nn.Module:
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    bias = layer.bias
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, groups=1, bias=bias is not None, padding_mode=layer.padding_mode, **factory)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **factory)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach() if rows is None else bias.detach()[rows])
    new.train(layer.training)
    return new


def _rebuilt_norm(norm: nn.Module, channels: torch.Tensor) -> nn.Module:
    new = type(norm)(len(channels), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                     track_running_stats=norm.track_running_stats,
                     device=norm.weight.device if norm.affine else None)
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(norm, key)
            if old is not None:
                getattr(new, key).copy_(old.detach()[channels])
        if norm.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(norm.num_batches_tracked)
    new.train(norm.training)
    return new


def remove_channels(model: nn.Module, graph: ChannelGraph, keep: dict[int, torch.Tensor]) -> dict[str, nn.Module]:
    """Physically keep only ``keep[g]`` channels of each listed group; returns the new modules by
    name. Parameters are new tensors: build the optimizer after this call."""
    keep = _checked(graph, keep)
    rows: dict[str, torch.Tensor] = {}
    columns: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    for index, channels in keep.items():
        group = graph.groups[index]
        if len(channels) == group.size:
            continue
        for name in group.producers:
            rows[name] = channels
        for name in group.norms:
            norms[name] = channels
        for consumer in group.consumers:
            columns[consumer.name] = _features(channels, consumer.expand)
    rebuilt = {}
    for name in sorted(set(rows) | set(columns)):
        rebuilt[name] = _rebuilt_layer(model.get_submodule(name), rows.get(name), columns.get(name))
    for name, channels in norms.items():
        rebuilt[name] = _rebuilt_norm(model.get_submodule(name), channels)
    for name, module in rebuilt.items():
        _replace(model, name, module)
    return rebuilt


@torch.no_grad()
def nonzero_channels(model: nn.Module, graph: ChannelGraph) -> dict[int, torch.Tensor]:
    """Keep-indices per prunable group: channels where any producer row/bias or BatchNorm scale/bias
    is nonzero (after a group-sparse regularizer, the others output exactly 0)."""
    keep = {}
    for group in graph.prunable():
        alive = torch.zeros(group.size, dtype=torch.bool)
        for name in group.producers + group.norms:
            module = model.get_submodule(name)
            alive |= (module.weight.detach().flatten(1) if module.weight.dim() > 1
                      else module.weight.detach().unsqueeze(1)).ne(0).any(dim=1).cpu()
            if module.bias is not None:
                alive |= module.bias.detach().ne(0).cpu()
        keep[group.index] = alive.nonzero().flatten()
    return keep
