"""Find a model's sites, sample their scores block by block, and allocate sparsity per site.

Calibration runs the dense model one block at a time (the engine of ``calibration``): only one
block's activations live at once. For each site a uniform random sample of score entries is
kept (``samples_per_site``, seeded), which is all a threshold at any sparsity needs (inverse CDF).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..calibration.engine import BlockCall, BlockWalk, move_to, run_block
from ..errors import ConfigError, UnsupportedModelError
from ..models.adapters import ExpertLayer, ModelAdapter, PrunableLayer
from .base import ActivationMethod, Site
from .hooks import SiteHook


def _is_activation(module: nn.Module) -> bool:
    # torch's own activations and transformers' ACT2FN classes (GELUActivation, SiLUActivation, ...)
    return (type(module).__module__ == "torch.nn.modules.activation"
            or type(module).__module__.startswith("transformers.activations"))


def _gate_widths(block: nn.Module, call: BlockCall) -> dict[str, tuple[nn.Module, int]]:
    """The block's activation modules that run, with the width of their output (one forward)."""
    found: dict[str, tuple[nn.Module, int]] = {}
    handles = []
    for name, module in block.named_modules():
        if _is_activation(module) and not any(True for _ in module.children()):
            def hook(mod, _args, output, name=name):
                if isinstance(output, torch.Tensor) and output.dim() >= 2:
                    found.setdefault(name, (mod, output.shape[-1]))
            handles.append(module.register_forward_hook(hook))
    try:
        run_block(block, [call])
    finally:
        for handle in handles:
            handle.remove()
    return found


def block_sites(adapter: ModelAdapter, index: int, kind: str, call: BlockCall | None) -> list[Site]:
    """Sites of one block.

    "input": every selected linear's input. "gate": every MLP activation output, paired with the
    linear that reads its width (the down projection) and, for gated MLPs, the projection named
    ``up``. "attention": the inputs of the linears outside the MLP (q/k/v/o), i.e. "input" minus
    the linears that write or read an MLP activation.
    """
    block_name, block = adapter.blocks[index]
    layers: dict[str, PrunableLayer] = adapter.block_layers(index)
    inputs = [Site(name, layer.module, "input", index, layer.get_weight(), layer.numel) for name, layer in layers.items()]
    if kind == "input":
        return inputs  # routed experts included: each ExpertMatrix's input is the tokens routed to it
    experts = [name for name, layer in layers.items() if isinstance(layer, ExpertLayer)]
    if experts:
        raise UnsupportedModelError(
            f"block {block_name}: {len(experts)} routed expert matrices (e.g. {experts[0]}) compute their MLP "
            "activation inside the fused experts forward, which gate/attention sites (cats, chess) cannot reach; "
            "use an input method (teal, wina, topk), which sparsifies every expert's routed input.")
    if call is None:
        raise ValueError(f"{kind} sites need one calibration call to find the MLP activation widths.")
    gates, mlp_linears = [], set()
    for act_name, (module, width) in _gate_widths(block, call).items():
        readers = [layer for layer in layers.values() if layer.in_features == width]
        writers = [layer for layer in layers.values() if layer.out_features == width]
        if len(readers) != 1:
            continue  # not an MLP activation (or an ambiguous one): left dense
        up = next((layer for layer in writers if "up" in layer.name.rsplit(".", 1)[-1]), None)
        params = readers[0].numel + sum(layer.numel for layer in writers)
        gates.append(Site(f"{block_name}.{act_name}", module, "gate", index, readers[0].get_weight(), params,
                          up=up.module if up is not None else None, reader=readers[0].module))
        mlp_linears.update(layer.name for layer in (*readers, *writers))
    if not gates:
        raise UnsupportedModelError(
            f"block {block_name}: no MLP activation module found whose output width matches one linear's input; "
            "gate methods (cats, chess) need an nn.Module activation (e.g. LLaMA's act_fn); use an input method "
            "(teal, wina) for this model.")
    if kind == "gate":
        return gates
    if kind == "attention":
        return [site for site in inputs if site.name not in mlp_linears]
    raise ValueError(f"unknown site kind {kind!r}: 'input', 'gate' or 'attention'.")


def _sample(scores: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() <= count:
        return flat.float().cpu()
    index = torch.randint(flat.numel(), (count,), generator=generator)
    return flat[index.to(flat.device)].float().cpu()


@torch.no_grad()
def calibrate(model: nn.Module, adapter: ModelAdapter, method: ActivationMethod, batches: list[dict], *,
              samples_per_site: int, seed: int, device: torch.device, greedy: dict | None = None,
              progress=None) -> tuple[list[SiteHook], list[list[tuple[float, dict[str, float]]]]]:
    """Hooks (not yet attached) for every site, with score samples; plus, when ``greedy`` is given,
    each block's allocation trajectory [(block sparsity, {site: sparsity}), ...].

    On failure the model is left as it was (the engine's :class:`BlockWalk`: blocks back on their
    devices, no hook left behind)."""
    generator = torch.Generator().manual_seed(seed)
    hooks: list[SiteHook] = []
    trajectories = []
    # calls=None: the walk captures each stack's first block's inputs itself (every stack of an encoder-decoder)
    with BlockWalk(model, adapter.blocks, None, device, stack_starts=adapter.stack_starts, batches=batches) as walk:
        for step in walk:
            block = step.block
            sites = [site for kind in method.site_kinds
                     for site in block_sites(adapter, step.index, kind, step.calls[0])]
            for site in sites:
                site.weight = site.weight.to(device)
                method.prepare(site)
            if method.observes_up:
                _observe_up(block, sites, method, step.calls)
            for site in sites:
                method.finish_observing(site)
            samples = {site.name: [] for site in sites}
            outputs = _sampled_forward(block, sites, method, step.calls, samples, samples_per_site, generator) \
                if method.selection == "threshold" else run_block(block, step.calls)
            block_hooks = [SiteHook(site, method, torch.cat(samples[site.name]) if samples[site.name] else None)
                           for site in sites]
            if greedy is not None:
                count = greedy["calls"]
                trajectories.append(greedy_trajectory(block, step.calls[:count], outputs[:count], block_hooks,
                                                      step=greedy["step"], limit=greedy["limit"]))
            hooks += block_hooks
            for site in sites:  # the hooks keep these: they go where the block goes back to
                site.weight = site.weight.to(step.home)
                site.constants = {key: value.to(step.home) if isinstance(value, torch.Tensor) else value
                                  for key, value in site.constants.items() if not key.startswith("_")}
            step.outputs = outputs
            if progress is not None:
                progress(step.index)
    return hooks, trajectories


def _observe_up(block, sites, method, calls) -> None:
    handles = []
    for site in sites:
        if site.up is not None:
            handles.append(site.up.register_forward_hook(
                lambda _m, _a, output, site=site: method.observe(site, output)))
    try:
        run_block(block, calls)
    finally:
        for handle in handles:
            handle.remove()


def _sampled_forward(block, sites, method, calls, samples, total, generator) -> list[torch.Tensor]:
    per_call = math.ceil(total / len(calls))
    handles = []
    for site in sites:
        def grab(tensor, site=site):
            samples[site.name].append(_sample(method.score(site, tensor), per_call, generator))

        if site.kind == "input":
            handles.append(site.module.register_forward_pre_hook(lambda _m, args, grab=grab: grab(args[0])))
        else:
            handles.append(site.module.register_forward_hook(lambda _m, _a, out, grab=grab: grab(out)))
    try:
        return run_block(block, calls)
    finally:
        for handle in handles:
            handle.remove()


def _relative_error(block, calls, targets) -> float:
    outputs = run_block(block, calls)
    error = sum(float((out.float() - ref.float()).square().sum()) for out, ref in zip(outputs, targets, strict=True))
    scale = sum(float(ref.float().square().sum()) for ref in targets)
    return error / max(scale, 1e-30)


def greedy_trajectory(block: nn.Module, calls: list[BlockCall], targets: list[torch.Tensor],
                      hooks: list[SiteHook], *, step: float, limit: float) -> list[tuple[float, dict[str, float]]]:
    """TEAL's greedy block-wise allocation, with any criterion.

    All sites start dense; each move raises one site's sparsity so that every candidate move
    zeroes the same number of weight reads (step x the mean site size: a small projection moves
    further than a large one), and the move that raises the block's output error least is
    kept. Stops at parameter-weighted block sparsity ``limit``. Returns the trajectory.
    """
    if not hooks:
        return [(0.0, {})]
    if not 0.0 < limit < 1.0:
        raise ConfigError(f"the greedy allocation limit must be in (0, 1), got {limit}.")
    total = sum(hook.site.params for hook in hooks)
    mean = total / len(hooks)
    levels = {hook.site.name: 0.0 for hook in hooks}
    trajectory = [(0.0, dict(levels))]
    for hook in hooks:
        hook.attach()
    try:
        weighted = 0.0
        while weighted < limit - 1e-9:
            best = None
            for hook in hooks:
                current = levels[hook.site.name]
                proposal = min(current + step * mean / hook.site.params, 0.99)
                if proposal <= current + 1e-9:
                    continue
                hook.set_sparsity(proposal)
                error = _relative_error(block, calls, targets)
                hook.set_sparsity(current)
                if best is None or error < best[0]:
                    best = (error, hook, proposal)
            if best is None:
                break
            _, hook, proposal = best
            hook.set_sparsity(proposal)
            levels[hook.site.name] = proposal
            weighted = sum(levels[h.site.name] * h.site.params for h in hooks) / total
            trajectory.append((weighted, dict(levels)))
    finally:
        for hook in hooks:
            hook.detach()
            hook.set_sparsity(0.0)
    return trajectory


def read_trajectory(trajectory: list[tuple[float, dict[str, float]]], target: float) -> dict[str, float]:
    """The first point of a trajectory whose block sparsity reaches ``target`` (the last if none)."""
    for weighted, levels in trajectory:
        if weighted >= target - 1e-9:
            return levels
    return trajectory[-1][1]


__all__ = ["Site", "block_sites", "calibrate", "greedy_trajectory", "move_to", "read_trajectory"]
