"""Sparsing Law's PPL-p% sparsity (Luo et al., 2024): the highest FFN activation sparsity whose
perplexity rises by at most p% over the dense model, found by a CETT binary search.

Neuron i of an FFN with intermediate activation a and down projection W contributes
n_i = |a_i| * ||W[:, i]||. For a shared CETT value c, every layer gets the threshold t_l with
CETT_l(t_l) = c on calibration activations (thresholds.cett_threshold); neurons with n_i <= t_l are
zeroed at inference (WINA's score on the down projection's input, a per-layer threshold). A
bisection on c finds the largest c whose perplexity stays within (1 + p/100) x dense; the
measured fraction of zeroed down-projection inputs at that c is the PPL-p% sparsity
(activation ratio = 1 - sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.engine import capture_block_inputs, model_inputs
from ..models.adapters import ModelAdapter
from .base import Site, get_method
from .calibrate import block_sites
from .hooks import SiteHook
from .thresholds import cett_threshold


@dataclass
class PPLpResult:
    p: float
    dense_ppl: float
    ppl: float
    cett: float
    sparsity: float  # measured: zeroed down-projection inputs, parameter-weighted over layers
    per_layer: dict[str, float] = field(default_factory=dict)  # layer name -> threshold t_l
    steps: list[tuple[float, float, float]] = field(default_factory=list)  # (c, ppl, sparsity) tried

    @property
    def activation_ratio(self) -> float:
        return 1.0 - self.sparsity


def _down_projections(model: nn.Module, adapter: ModelAdapter, batches: list[dict]) -> list[Site]:
    """An "input" site on every MLP down projection (the reader of each MLP activation)."""
    device = next(model.parameters()).device
    # one call per stack (an encoder-decoder's decoder blocks take other arguments than its encoder's)
    calls = {start: capture_block_inputs(model, adapter.blocks[start][1], batches[:1], device)[0]
             for start in adapter.stack_starts}
    names = {module: name for name, module in model.named_modules()}
    sites = []
    for index in range(len(adapter.blocks)):
        call = calls[max(start for start in adapter.stack_starts if start <= index)]
        for gate in block_sites(adapter, index, "gate", call):
            sites.append(Site(names[gate.reader], gate.reader, "input", index, gate.weight, gate.weight.numel()))
    return sites


@torch.no_grad()
def _activations(model: nn.Module, sites: list[Site], batches: list[dict], tokens: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    grabbed: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
    handles = [site.module.register_forward_pre_hook(
        lambda _m, args, site=site: grabbed[site.name].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu()))
        for site in sites]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(**{key: value.to(device) for key, value in model_inputs(model, batch).items()})
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, parts in grabbed.items():
        rows = torch.cat(parts)
        pick = torch.randperm(rows.shape[0], generator=generator)[:tokens]
        out[name] = rows[pick]
    return out


def ppl_p_sparsity(model: nn.Module, perplexity_of: Any, calibration: list[dict], *, p: float = 1.0,
                   tokens: int = 256, steps: int = 10, seed: int = 0) -> PPLpResult:
    """PPL-p% sparsity of ``model``'s FFNs.

    ``perplexity_of(model) -> float`` evaluates the model (e.g. a lambda around
    ``sw.evaluate.perplexity`` on a held-out text); ``calibration``: model-input dicts whose
    down-projection inputs (``tokens`` sampled rows per layer) set the per-layer thresholds.
    """
    if p < 0:
        raise ValueError(f"p must be >= 0 (a percentage of perplexity increase), got {p}.")
    adapter = ModelAdapter(model)
    sites = _down_projections(model, adapter, calibration)
    activations = _activations(model, sites, calibration, tokens, seed)
    method = get_method("wina")
    hooks = []
    for site in sites:
        method.prepare(site)
        hooks.append(SiteHook(site, method, None))
    dense = perplexity_of(model)
    limit = dense * (1.0 + p / 100.0)
    result = PPLpResult(p=p, dense_ppl=dense, ppl=dense, cett=0.0, sparsity=0.0)

    def evaluate(c: float) -> tuple[float, float, dict[str, float]]:
        thresholds = {site.name: cett_threshold(activations[site.name], site.weight.float().cpu(), c)
                      for site in sites}
        for hook in hooks:
            hook.set_threshold(thresholds[hook.site.name])
            hook.count, hook.zeros, hook.total = True, 0, 0
            hook.attach()
        try:
            ppl = perplexity_of(model)
        finally:
            for hook in hooks:
                hook.detach()
                hook.count = False
        total = sum(hook.site.params for hook in hooks)
        sparsity = sum(hook.measured * hook.site.params for hook in hooks) / total
        return ppl, sparsity, thresholds

    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = 0.5 * (low + high)
        ppl, sparsity, thresholds = evaluate(middle)
        result.steps.append((middle, ppl, sparsity))
        if ppl <= limit:
            low = middle
            result.ppl, result.cett, result.sparsity, result.per_layer = ppl, middle, sparsity, thresholds
        else:
            high = middle
    return result
