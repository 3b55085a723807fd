"""WGSEF: k-level structured sparsity by a proximal step over parameter groups after each optimizer step.

Refael, Arbel, Huleihel 2022, "Learning k-Level Structured Sparse Neural Networks Using Group
Envelope Regularization" (methods.md, ``wgsef``). From the abstract only: groups G_1..G_n with
weights omega_g, a weighted group sparse envelope function that is small when the energy sits in
k groups, a prox computable in linear time, proximal SGD, removal of zero groups after training.
The paper's exact envelope and prox are NOT reproduced here (unverified). What this module uses is
a penalty with the same behaviour and an exact closed-form prox:

    R_k(w) = lambda * sum_{g not in T_k(w)} omega_g * phi(||w_g||)

where T_k(w) are the k groups that are cheapest to leave untouched (no penalty on them), and phi is
||w_g|| (``shrinkage="group_lasso"``, exact zeros) or ||w_g||^2 / 2 (``"ridge"``, the envelope's
squared-norm form, shrinks without zeroing). Given the kept set S the prox separates per group:
kept groups are unchanged; the others are scaled by

    group_lasso: max(0, 1 - lambda*omega_g / ||w_g||)        ridge: 1 / (1 + lambda*omega_g)

and S = the k groups with the largest saving from not shrinking them (the cost of shrinking g):

    group_lasso: lambda*omega_g*||w_g|| - (lambda*omega_g)^2/2 if ||w_g|| > lambda*omega_g else ||w_g||^2/2
    ridge:       ||w_g||^2/2 * lambda*omega_g / (1 + lambda*omega_g)

which makes the prox exact for R_k. The k-th largest saving is found by selection (torch.kthvalue),
so one prox is linear in the number of groups. Under strong shrinkage (lambda*omega_g >= ||w_g||)
at most k groups stay nonzero; a w with at most k nonzero groups is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .graph import ChannelGraph

__all__ = ["GroupSpec", "ProxRegularizer", "channel_group_specs", "wgsef_penalty", "wgsef_scales"]


@dataclass(frozen=True)
class GroupSpec:
    """One parameter group: slices ``(parameter name, dim, index)`` of a model, its weight omega_g,
    and the family it competes in (k groups are kept per family)."""

    name: str
    slices: tuple[tuple[str, int, int], ...]
    weight: float = 1.0
    family: str = ""


def _check(norms: torch.Tensor, weights: torch.Tensor, k: int, strength: float, shrinkage: str) -> None:
    if norms.dim() != 1 or weights.shape != norms.shape:
        raise ConfigError(f"group norms and weights must be 1-D of equal length, got {tuple(norms.shape)} and "
                          f"{tuple(weights.shape)}.")
    if not 0 <= k <= len(norms):
        raise ConfigError(f"k={k} groups to keep must lie in [0, {len(norms)}].")
    if strength < 0 or bool((weights < 0).any()):
        raise ConfigError("WGSEF strength and group weights must be >= 0.")
    if shrinkage not in ("group_lasso", "ridge"):
        raise ConfigError(f"shrinkage must be 'group_lasso' or 'ridge', got {shrinkage!r}.")


def _shrink_cost(norms: torch.Tensor, thresholds: torch.Tensor, shrinkage: str) -> torch.Tensor:
    if shrinkage == "ridge":
        return 0.5 * norms.square() * thresholds / (1 + thresholds)
    return torch.where(norms > thresholds, thresholds * norms - 0.5 * thresholds.square(), 0.5 * norms.square())


def _kept(saving: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest savings (ties: lower index), by linear-time selection."""
    n = len(saving)
    keep = torch.zeros(n, dtype=torch.bool, device=saving.device)
    if k == 0:
        return keep
    if k >= n:
        return ~keep
    threshold = torch.kthvalue(saving, n - k + 1).values  # the k-th largest
    keep = saving > threshold
    ties = (saving == threshold).nonzero().flatten()
    keep[ties[: k - int(keep.sum())]] = True
    return keep


def wgsef_scales(norms: torch.Tensor, weights: torch.Tensor, k: int, strength: float,
                 shrinkage: str = "group_lasso") -> torch.Tensor:
    """Per-group factors of the prox (see the module docstring): w_g <- factor_g * w_g."""
    _check(norms, weights, k, strength, shrinkage)
    norms = norms.float()
    thresholds = strength * weights.float()
    keep = _kept(_shrink_cost(norms, thresholds, shrinkage), k)
    if shrinkage == "ridge":
        shrunk = 1.0 / (1.0 + thresholds)
    else:
        shrunk = (1.0 - thresholds / norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp_min(0.0)
    return torch.where(keep, torch.ones_like(norms), shrunk)


def wgsef_penalty(norms: torch.Tensor, weights: torch.Tensor, k: int, strength: float,
                  shrinkage: str = "group_lasso") -> torch.Tensor:
    """R_k(w) = lambda * sum_{g outside the k largest weighted groups} omega_g * phi(||w_g||)."""
    _check(norms, weights, k, strength, shrinkage)
    terms = weights.float() * (norms.float() if shrinkage == "group_lasso" else 0.5 * norms.float().square())
    if k == 0:
        return strength * terms.sum()
    return strength * (terms.sum() - torch.topk(terms, min(k, len(terms))).values.sum())


class _Family:
    """A family's groups compiled to index tensors per (parameter, dim) for vectorized norms/scaling."""

    def __init__(self, specs: Sequence[GroupSpec], parameters: dict[str, nn.Parameter]):
        self.specs = list(specs)
        self.weights = torch.tensor([spec.weight for spec in specs], dtype=torch.float32)
        slices: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for group, spec in enumerate(specs):
            for name, dim, index in spec.slices:
                if name not in parameters:
                    raise ConfigError(f"group {spec.name!r} names parameter {name!r}, which the model does not have.")
                if not 0 <= index < parameters[name].shape[dim]:
                    raise ConfigError(f"group {spec.name!r}: index {index} out of range for {name} dim {dim}.")
                positions, owners = slices.setdefault((name, dim), ([], []))
                positions.append(index)
                owners.append(group)
        self.slices = {key: (torch.tensor(pos), torch.tensor(own)) for key, (pos, own) in slices.items()}

    def norms(self, parameters: dict[str, nn.Parameter]) -> torch.Tensor:
        squares = torch.zeros(len(self.specs))
        for (name, dim), (positions, owners) in self.slices.items():
            tensor = parameters[name].detach().float().movedim(dim, 0)
            per_slice = tensor.reshape(tensor.shape[0], -1).square().sum(dim=1).cpu()
            squares.index_add_(0, owners, per_slice[positions])
        return squares.sqrt()

    @torch.no_grad()
    def scale(self, parameters: dict[str, nn.Parameter], factors: torch.Tensor) -> None:
        for (name, dim), (positions, owners) in self.slices.items():
            parameter = parameters[name]
            per_slice = torch.ones(parameter.shape[dim])
            per_slice[positions] = factors[owners]
            shape = [1] * parameter.dim()
            shape[dim] = -1
            parameter.mul_(per_slice.to(parameter.device, parameter.dtype).view(shape))


class ProxRegularizer:
    """Proximal WGSEF step over ``groups`` after every optimizer step (proximal SGD).

    keep:      groups kept per family: an int k, or a fraction of the family's groups
    strength:  lambda; the step uses lambda * lr (the optimizer's current learning rate)

    Call ``step()`` after ``optimizer.step()`` or ``attach(optimizer)`` to run it as a step post-hook.
    """

    def __init__(self, model: nn.Module, groups: Sequence[GroupSpec], keep: int | float, strength: float, *,
                 shrinkage: str = "group_lasso"):
        if not groups:
            raise ConfigError("ProxRegularizer needs at least one GroupSpec (see channel_group_specs).")
        self.parameters = dict(model.named_parameters())
        by_family: dict[str, list[GroupSpec]] = {}
        for spec in groups:
            by_family.setdefault(spec.family, []).append(spec)
        self.families = {name: _Family(specs, self.parameters) for name, specs in by_family.items()}
        self.k = {name: self._count(keep, len(specs), name) for name, specs in by_family.items()}
        self.strength, self.shrinkage = strength, shrinkage
        _check(torch.zeros(1), torch.zeros(1), 0, strength, shrinkage)
        self._hook = None

    @staticmethod
    def _count(keep: int | float, size: int, family: str) -> int:
        if isinstance(keep, float) and 0 < keep <= 1:
            return max(1, int(round(keep * size)))
        if isinstance(keep, int) and 1 <= keep <= size:
            return keep
        raise ConfigError(f"keep={keep!r} for family {family!r} of {size} groups: give an int k in [1, {size}] "
                          "or a fraction in (0, 1].")

    def attach(self, optimizer: torch.optim.Optimizer) -> ProxRegularizer:
        self._hook = optimizer.register_step_post_hook(
            lambda opt, args, kwargs: self.step(opt.param_groups[0]["lr"]))
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def step(self, lr: float = 1.0) -> None:
        for name, family in self.families.items():
            factors = wgsef_scales(family.norms(self.parameters), family.weights, self.k[name],
                                   self.strength * lr, self.shrinkage)
            family.scale(self.parameters, factors)

    def penalty(self) -> float:
        return float(sum(wgsef_penalty(family.norms(self.parameters), family.weights, self.k[name], self.strength,
                                       self.shrinkage) for name, family in self.families.items()))

    def nonzero(self) -> dict[str, torch.Tensor]:
        """Per family, a bool per group: any of its entries nonzero."""
        return {name: family.norms(self.parameters) > 0 for name, family in self.families.items()}


def channel_group_specs(model: nn.Module, graph: ChannelGraph, exclude: Sequence[str] = ()) -> list[GroupSpec]:
    """One group per output channel of every prunable channel group of ``graph``: the producers'
    filter rows and biases plus the BatchNorm scale and bias of that channel (so a zero group is a
    channel that outputs exactly 0 and can be removed). Family = the channel group."""
    parameters = dict(model.named_parameters())
    specs = []
    for group in graph.prunable():
        if set(group.producers) & set(exclude):
            continue
        names = [f"{layer}.{kind}" for layer in group.producers + group.norms for kind in ("weight", "bias")]
        names = [name for name in names if name in parameters]
        family = f"group{group.index}:{group.producers[0]}"
        specs += [GroupSpec(f"{family}[{channel}]", tuple((name, 0, channel) for name in names), 1.0, family)
                  for channel in range(group.size)]
    return specs
