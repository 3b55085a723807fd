"""Activation sparsity at inference: TEAL, WINA, CATS, CHESS, R-Sparse, per-token top-k.

    handle = sw.sparsify_activations(model, method="wina", sparsity=0.5, calibration=calib)
    handle.set_sparsity(0.4)              # re-threshold from the kept samples, no recalibration
    handle.measure(batches)               # measured zeros per site on real inputs
    sw.remove_activation_sparsity(model)  # back to the dense model

Methods are one module each behind :class:`ActivationMethod` (a score; calibrated thresholds
or per-token top-k); ``allocation="greedy"`` runs TEAL's block-wise greedy allocation with
whichever score the method uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.engine import model_inputs
from ..calibration.progress import progress_bar
from ..calibration.run import calibration_batches, pick_device
from ..errors import ConfigError
from ..models.adapters import ModelAdapter
from ..registry import import_plugins
from .base import ActivationMethod, Site, available_methods, get_method, register
from .calibrate import calibrate, read_trajectory
from .hooks import SiteHook
from .sparsing_law import PPLpResult, ppl_p_sparsity

import_plugins(__name__, __path__, infrastructure=("base", "calibrate", "hooks", "sparsing_law", "thresholds"))

_ATTRIBUTE = "_sparsewise_activation"


@dataclass
class ActivationSparsity:
    """The sparsifiers attached to one model (returned by :func:`sparsify_activations`)."""

    model: nn.Module
    method: ActivationMethod
    hooks: list[SiteHook]
    allocation: str
    trajectories: list = field(default_factory=list)
    sparsity: float = 0.0

    def set_sparsity(self, sparsity: float) -> None:
        """Target sparsity: every site at it ("uniform"), or each block's greedy allocation read
        at it (parameter-weighted over the block's sites)."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"activation sparsity must be in [0, 1), got {sparsity}.")
        if self.allocation == "greedy":
            reached = min(trajectory[-1][0] for trajectory in self.trajectories)
            if sparsity > reached + 1e-6:
                raise ConfigError(f"the greedy allocation was recorded up to {reached:.2f} block sparsity; "
                                  f"recalibrate with greedy_limit >= {sparsity} to ask for {sparsity}.")
            levels = {}
            for trajectory in self.trajectories:
                levels.update(read_trajectory(trajectory, sparsity))
            for hook in self.hooks:
                hook.set_sparsity(levels[hook.site.name])
        else:
            for hook in self.hooks:
                hook.set_sparsity(sparsity)
        self.sparsity = sparsity

    def site_sparsity(self) -> dict[str, float]:
        """Nominal sparsity of each site (what the thresholds were set for)."""
        return {hook.site.name: hook.sparsity for hook in self.hooks}

    @contextmanager
    def counting(self):
        """Count zeros at every site while the block runs; yields a dict filled on exit with the
        fraction of exact zeros each site passed on (masking plus natural zeros): the sparsity a
        column-skipping kernel can use, not the nominal one."""
        measured: dict[str, float] = {}
        for hook in self.hooks:
            hook.count, hook.zeros, hook.total = True, 0, 0
        try:
            yield measured
        finally:
            for hook in self.hooks:
                hook.count = False
                measured[hook.site.name] = hook.measured

    @torch.no_grad()
    def measure(self, batches: list[dict]) -> dict[str, float]:
        """Measured sparsity per site (see :meth:`counting`) over a forward of ``batches``."""
        device = next(self.model.parameters()).device
        with self.counting() as measured:
            for batch in batches:
                self.model(**{key: value.to(device) for key, value in model_inputs(self.model, batch).items()})
        return measured

    def weighted(self, per_site: dict[str, float]) -> float:
        """Parameter-weighted mean of a per-site quantity (e.g. :meth:`measure`'s result)."""
        total = sum(hook.site.params for hook in self.hooks)
        return sum(per_site[hook.site.name] * hook.site.params for hook in self.hooks) / total

    def summary(self, measured: dict[str, float] | None = None) -> str:
        """One screen: method, allocation, sites, nominal (and measured) sparsity, range over sites."""
        nominal = self.site_sparsity()
        kinds = sorted({hook.site.kind for hook in self.hooks})
        lines = [f"activation sparsity: {self.method.name}, {self.allocation} allocation, target {self.sparsity:.0%}, "
                 f"{len(self.hooks)} sites ({', '.join(kinds)})",
                 f"  nominal per site {min(nominal.values()):.1%}-{max(nominal.values()):.1%}, "
                 f"parameter-weighted {self.weighted(nominal):.1%}"]
        if measured:
            lines.append(f"  measured per site {min(measured.values()):.1%}-{max(measured.values()):.1%}, "
                         f"parameter-weighted {self.weighted(measured):.1%}")
        return "\n".join(lines)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.detach()
        if getattr(self.model, _ATTRIBUTE, None) is self:
            delattr(self.model, _ATTRIBUTE)


def sparsify_activations(model: nn.Module, method: str | ActivationMethod = "teal", sparsity: float = 0.5,
                         calibration: Any = None, *, allocation: str = "uniform", seed: int = 0,
                         samples_per_site: int = 1 << 16, batch_size: int = 8, device: str | torch.device | None = None,
                         include: list[str] | None = None, exclude: list[str] | None = None,
                         greedy_step: float = 0.05, greedy_limit: float = 0.7, greedy_calls: int = 1,
                         progress: bool = False, **method_options: Any) -> ActivationSparsity:
    """Attach activation sparsity to every block linear input (or MLP activation, for cats/chess).

    Thresholds come from ``calibration`` (a CalibrationSet, input_ids tensor or list of input
    dicts; never the evaluation text): a seeded uniform sample of each site's scores, whose
    quantile at the target is the threshold. ``allocation="greedy"`` records TEAL's greedy
    per-block allocation up to ``greedy_limit`` on the first ``greedy_calls`` calibration
    batches. Reversible with :func:`remove_activation_sparsity`; the model's weights never change.

    Mixture-of-experts: input methods (teal, wina, topk) treat each routed expert matrix as a site
    whose input is the tokens the router sends it (thresholds calibrated on those tokens); while
    attached, the experts forward runs its eager per-expert loop (:mod:`sparsewise.models.experts`).
    Gate methods (cats, chess) refuse blocks with routed experts.
    """
    if allocation not in ("uniform", "greedy"):
        raise ConfigError(f"allocation must be 'uniform' or 'greedy', got {allocation!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"activation sparsity must be in [0, 1), got {sparsity}; 1.0 would zero every input.")
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise ConfigError("this model already has activation sparsity attached; call "
                          "sw.remove_activation_sparsity(model) first.")
    chosen = get_method(method, **method_options)
    if calibration is None and (chosen.selection == "threshold" or allocation == "greedy"):
        raise ConfigError(f"method {chosen.name!r} with {allocation} allocation needs calibration data "
                          "(e.g. sw.data.calibration('c4.jsonl', tokenizer, n=64)); per-token top-k needs none.")
    if isinstance(calibration, torch.Tensor):
        calibration = [{"input_ids": calibration[i:i + batch_size]} for i in range(0, len(calibration), batch_size)]
    batches = calibration_batches(calibration, batch_size) if calibration is not None else []
    adapter = ModelAdapter(model, include=include, exclude=exclude)
    compute = pick_device(device, model)
    greedy = {"step": greedy_step, "limit": greedy_limit, "calls": greedy_calls} if allocation == "greedy" else None
    if batches:
        with progress_bar(len(adapter.blocks), f"calibrating {chosen.name}", progress, unit="block") as bar:
            hooks, trajectories = calibrate(model, adapter, chosen, batches, samples_per_site=samples_per_site,
                                            seed=seed, device=compute, greedy=greedy,
                                            progress=lambda _index: bar.update(1))
    else:
        hooks, trajectories = _uncalibrated_hooks(adapter, chosen), []
    handle = ActivationSparsity(model, chosen, hooks, allocation, trajectories)
    handle.set_sparsity(sparsity)
    for hook in hooks:
        hook.attach()
    setattr(model, _ATTRIBUTE, handle)
    return handle


def _uncalibrated_hooks(adapter: ModelAdapter, method: ActivationMethod) -> list[SiteHook]:
    from .calibrate import block_sites

    if method.site_kinds != ("input",):
        raise ConfigError(f"{method.name} acts on MLP activations and needs calibration data to find them.")
    hooks = []
    for index in range(len(adapter.blocks)):
        for site in block_sites(adapter, index, "input", None):
            method.prepare(site)
            hooks.append(SiteHook(site, method, None))
    return hooks


def remove_activation_sparsity(model: nn.Module) -> int:
    """Detach every activation sparsifier from ``model``; returns how many sites were removed."""
    handle = getattr(model, _ATTRIBUTE, None)
    if handle is None:
        return 0
    count = len(handle.hooks)
    handle.remove()
    return count


__all__ = ["ActivationMethod", "ActivationSparsity", "PPLpResult", "Site", "SiteHook", "available_methods", "get_method",
           "ppl_p_sparsity", "register", "remove_activation_sparsity", "sparsify_activations"]
