"""The post-training pipeline: per-block statistics -> method -> mask -> propagate.

``prune`` is the library's main verb. It modifies the model in place and returns a
:class:`PruneResult`; if anything fails midway, every weight it touched is restored first.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration.distributed import world
from .calibration.engine import sequential_calibration
from .calibration.progress import RunProgress, fingerprint, progress_bar
from .calibration.run import calibration_batches, gpu_peak_mb, peak_rss_mb, pick_device, start_gpu_peak
from .config import PruneConfig, ValidConfig, whole_model_refusal
from .data import as_calibration
from .errors import ConfigError
from .methods import LayerTask, ModelTask, method_capabilities
from .models import ModelAdapter, PrunableLayer
from .models.coverage import Coverage, model_coverage
from .models.experts import calibrate_all_experts
from .patterns import Pattern, global_masks
from .records import LayerRecord, get_records, set_records


@dataclass
class PruneResult:
    """What ``prune`` did: one record per layer plus run facts for the summary."""

    method: str
    pattern: str
    sparsity: float
    records: dict[str, LayerRecord]
    wall_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    device: str
    sequential: str = "layer"
    calibration: dict[str, Any] = field(default_factory=dict)
    allocation: str = "uniform"
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # one entry per refitted block
    coverage: Coverage | None = None  # what share of each kind of parameter was pruned (measure_coverage)
    removed: dict[str, Any] = field(default_factory=dict)  # what a structured method removed (expert_drop)
    notes: list[str] = field(default_factory=list)  # its summary lines

    @property
    def counted_params(self) -> int:
        return sum(rec.shape[0] * rec.shape[1] for rec in self.records.values())

    @property
    def achieved_sparsity(self) -> float:
        total = self.counted_params
        zeros = sum(rec.achieved * rec.shape[0] * rec.shape[1] for rec in self.records.values())
        return zeros / total if total else 0.0

    def measure_coverage(self, model: nn.Module) -> Coverage:
        """Match the records to ``model``'s parameters by kind (attention, mlp, experts, ...) and keep
        the result for the summary; a large matrix left dense then shows up as a warning."""
        self.coverage = model_coverage(model, self.records)
        return self.coverage

    @property
    def warnings(self) -> list[str]:
        notes = list(self.coverage.warnings) if self.coverage is not None else []
        for rec in self.records.values():
            if rec.info.get("damp_raised"):
                notes.append(f"{rec.name}: Hessian needed damp_ratio={rec.info['damp_ratio']:g} to factor")
        if _updates_weights(self.method) and any("refine" in rec.info for rec in self.records.values()):
            # measured on SmolLM2 at 60%: ppl 209 with DSnoT vs 119 without (RESULTS.md, session 11)
            notes.append(f"the refiner kept {self.method}'s masks' dense weights, dropping its reconstruction; "
                         "refiners pair with methods that do not update weights (wanda, magnitude)")
        return notes

    def summary(self) -> str:
        lines = [f"method {self.method}  pattern {self.pattern}  target sparsity {self.sparsity:.2%}"]
        if self.records or not self.removed:  # a structured removal masks nothing
            lines.append(f"layers {len(self.records)}  counted weights {self.counted_params:,}  "
                         f"achieved {self.achieved_sparsity:.4%}")
        lines += [
            f"wall {self.wall_s:.1f} s  peak RSS {self.peak_rss_mb:.0f} MB"
            + (f"  peak GPU {self.peak_gpu_mb:.0f} MB" if self.peak_gpu_mb is not None else "")
            + f"  device {self.device}  sequential-{self.sequential}",
        ]
        lines += self.details
        lines += [f"warning: {note}" for note in self.warnings]
        return "\n".join(lines)

    @property
    def details(self) -> list[str]:
        """Summary lines of the optional steps: the layer-wise allocation and the block refit."""
        lines = [self.allocation] if self.allocation != "uniform" else []
        lines += self.notes
        if self.coverage is not None:
            lines.append("coverage: " + "; ".join(self.coverage.lines()))
        if self.reconstruction:
            before = sorted(entry["loss_before"] for entry in self.reconstruction)
            after = sorted(entry["loss_after"] for entry in self.reconstruction)
            middle = len(before) // 2
            lines.append(f"block reconstruction: {len(before)} blocks, median held-out relative error "
                         f"{before[middle]:.4f} -> {after[middle]:.4f}")
        return lines


def _updates_weights(method: str) -> bool:
    try:
        return method_capabilities(method).updates_weights
    except ConfigError:  # a method registered while pruning and gone since
        return False


def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | Pattern | None = "unstructured",
    calibration=None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    blocks: list[str] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    sequential: str = "layer",
    batch_size: int = 8,
    all_experts: bool = False,
    method_options: dict[str, Any] | None = None,
    resume_dir: str | Path | None = None,
    progress: bool = True,
    allocation: str | dict[str, float] | None = None,
    allocation_options: dict[str, Any] | None = None,
    refine: str | None = None,
    refine_options: dict[str, Any] | None = None,
    reconstruct: bool | dict[str, Any] | None = None,
    config: PruneConfig | ValidConfig | None = None,
) -> PruneResult:
    """Prune ``model`` in place and return a :class:`PruneResult`.

    ``sparsity`` is the fraction of zeros in every targeted layer (N:M patterns fix it at 1-N/M;
    pass None or the matching value). ``calibration`` is required by data-aware methods (wanda,
    sparsegpt): a :class:`sparsewise.data.CalibrationSet`, a tensor of token ids [n, seqlen], a
    list of such tensors, one dict of model inputs holding all samples, or a list of such dicts
    (:func:`sparsewise.data.as_calibration`); whatever form, every pass re-batches the samples by
    its own batch size. ``include``/``exclude`` are regexes on module names; by default every linear inside
    the repeated blocks is pruned, never embeddings or lm_head.

    ``sequential="layer"`` (default) runs all calibration samples through each block in one
    batch and prunes layers in execution order inside that pass (later layers see the pruned
    earlier ones; one forward per block). ``sequential="block"`` is the classic scheme of the
    Wanda/SparseGPT code and llm-compressor: statistics of the whole dense block over batches of
    ``batch_size`` samples, then prune, then a second pass for the pruned outputs; it bounds
    activation memory by ``batch_size`` for calibration sets too large for one batch.

    ``all_experts``: on mixture-of-experts models, every expert's statistics come from every
    calibration token (the block output still follows the router), so rarely chosen experts get
    full Hessians too (:func:`sparsewise.models.calibrate_all_experts`); default: the routed tokens.

    ``resume_dir``: after every block the finished weights and the next block's inputs are
    written there; calling ``prune`` again with the same settings continues after the last
    finished block (the directory is removed on success).

    ``allocation``: per-layer ratios under the global ``sparsity`` (see :mod:`sparsewise.allocation`):
    "uniform" (default), "er", "erk", "owl", "ecoflap", or an explicit {layer name: sparsity};
    ``allocation_options`` go to the allocator (e.g. ``{"m": 5, "lam": 0.08}`` for OWL).

    ``refine``: a mask refiner run on every layer right after the method (see
    :mod:`sparsewise.correction`), e.g. "dsnot" with ``refine_options={"skip_modules": ["mlp"]}``
    for the reference code's attention-only default. The refined weight is the dense weight
    times the refined mask (for SparseGPT this drops its weight update, as the DSnoT code does).

    ``reconstruct``: True or a dict of options (epochs, lr, micro_batch, holdout, patience, seed;
    :mod:`sparsewise.correction.reconstruct`): after each block is pruned, refit its kept weights
    and other parameters, masks fixed, to the dense model's block outputs on the calibration
    samples (EBFT-style block-wise reconstruction; one extra dense pass per block).

    ``method="armor"`` (pattern "2:4") replaces every block linear by an ARMOR factorization
    y = A(S(Bx)) around a 2:4 core S (:mod:`sparsewise.methods.armor`); ``method_options``
    take its block_size, iterations, lr, patience, rtol and select. It runs in block mode and
    takes no allocation, refiner or resume_dir.

    ``config``: the settings as one :class:`~sparsewise.config.PruneConfig` (parsed here) or a
    :class:`~sparsewise.config.ValidConfig` parsed already (``prune_job`` parses before loading the
    model), in place of the keywords from ``method`` to ``reconstruct``, which are then ignored.
    Either way every setting is checked once, before any work; here remain the checks that need
    the model (layer shapes, the layers matched) or the calibration data.
    """
    from .correction.reconstruct import ReconstructConfig

    given_calibration = calibration
    if calibration is not None:  # every accepted form, once: each pass re-batches it by its own batch size
        calibration = as_calibration(calibration)
    if config is None:  # the keywords make one PruneConfig
        reconstruct_options = {}
        if isinstance(reconstruct, (dict, ReconstructConfig)):
            reconstruct_options = reconstruct if isinstance(reconstruct, dict) else reconstruct.to_json()
            reconstruct = True
        config = PruneConfig(
            method=method, sparsity=sparsity, pattern=pattern, include=include or [], exclude=exclude or [],
            device="auto" if device is None else device, seed=seed, sequential=sequential, batch_size=batch_size,
            all_experts=all_experts,
            method_options=dict(method_options or {}), resume_dir=resume_dir,
            allocation="uniform" if allocation is None else allocation, allocation_options=dict(allocation_options or {}),
            refine=refine, refine_options=dict(refine_options or {}), reconstruct=reconstruct,
            reconstruct_options=reconstruct_options,
        )
        valid = config.parse(default_sparsity=None)  # sparsity=None: only an N:M pattern implies a ratio
    else:
        valid = config if isinstance(config, ValidConfig) else config.parse()
    cfg = valid.config  # the settings as read
    pruner, pattern, choices, sparsity = valid.method, valid.pattern, list(valid.choices), valid.sparsity
    include, exclude = cfg.include or None, cfg.exclude or None
    if pruner.capabilities.whole_model:
        if blocks is not None:
            raise ConfigError(whole_model_refusal(pruner.name))
        return _prune_whole_model(pruner, model, calibration, pattern=pattern, sparsity=sparsity, include=include,
                                  exclude=exclude, device=cfg.device, seed=cfg.seed,
                                  batch_size=cfg.batch_size, method_options=cfg.method_options,
                                  progress=progress)
    refiner, reconstruct_config, needs = valid.refiner, valid.reconstruct, valid.needs
    seed, sequential, batch_size, resume_dir = cfg.seed, cfg.sequential, cfg.batch_size, cfg.resume_dir
    adapter = ModelAdapter(model, include=include, exclude=exclude, blocks=blocks)
    extra = adapter.extra_layers()
    if needs and extra:
        raise ConfigError(
            f"{sorted(extra)} lie outside the repeated blocks, but {pruner.name} calibrates block by block: "
            "prune them with magnitude in a second call, or drop them from include."
        )
    layers = {**adapter.prunable_layers(), **extra}
    if not layers:
        raise ConfigError("no layer matched: check include/exclude patterns against the model's module names.")
    for name, layer in layers.items():
        for choice in choices or [pattern]:
            choice.check_shape((layer.out_features, layer.in_features), name)
    if needs and calibration is None:
        raise ConfigError(
            f"method {pruner.name!r}{' with refiner ' + refiner.name if refiner else ''} needs calibration data: pass calibration=sw.data.calibration(...) "
            "(a text/jsonl path, a dataset name, or 'self' to sample from the model)."
        )
    if reconstruct_config is not None and world()[1] > 1:
        raise ConfigError("reconstruct does not run under torch.distributed yet: prune on one process.")

    compute_device = pick_device(cfg.device, model)
    start_gpu_peak(compute_device)
    run = _LayerPruner(model, pruner, pattern, sparsity, compute_device, torch.Generator().manual_seed(seed),
                       dict(cfg.method_options), refiner, needs)
    start = time.perf_counter()
    plan = _allocate(valid.allocation, cfg.allocation_options, pattern, sparsity, model, adapter, layers,
                     calibration, compute_device, seed, choices)
    if plan is not None:
        run.sparsities = plan.sparsities
    if choices:
        by_ratio = {choice.fixed_sparsity: choice for choice in choices}
        run.patterns = {name: by_ratio[value] for name, value in plan.sparsities.items()}
    bar = progress_bar(len(adapter.blocks), f"{pruner.name} {pattern}", progress, unit="block")
    experts_context = calibrate_all_experts() if cfg.all_experts else contextlib.nullcontext()
    try:
        with torch.no_grad(), experts_context:
            if pattern.scope == "global":
                scores = {name: pruner.global_score(layer.get_weight(), run.generator)
                          for name, layer in layers.items()}
                for name, keep in global_masks(scores, sparsity).items():
                    run.apply(name, layers[name], keep=keep.to(compute_device))
            elif not needs:
                for name, layer in layers.items():
                    run.apply(name, layer)
                bar.update(len(adapter.blocks))
            else:
                settings = {"method": pruner.name, "pattern": str(pattern), "sparsity": sparsity, "seed": seed,
                            "sequential": sequential, "batch_size": batch_size, "options": run.options,
                            "refine": refiner.name if refiner else None, "refine_options": dict(cfg.refine_options),
                            "allocation": run.sparsities,
                            "reconstruct": reconstruct_config.to_json() if reconstruct_config else None}
                _prune_calibrated(model, adapter, layers, run, calibration, sequential, batch_size, resume_dir,
                                  settings, bar, reconstruct_config)
    except BaseException:
        run.restore(layers)
        raise
    finally:
        bar.close()
    records = run.records

    set_records(model, {**get_records(model), **records})
    return PruneResult(
        method=pruner.name,
        pattern=",".join(str(choice) for choice in choices) if choices else str(pattern),
        sparsity=sparsity,
        records=records,
        wall_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=gpu_peak_mb(compute_device),
        device=str(compute_device),
        sequential=sequential,
        calibration=_calibration_facts(calibration, given_calibration),
        allocation=plan.summary() if plan is not None else "uniform",
        reconstruction=[run.reconstructed[index] for index in sorted(run.reconstructed)],
        coverage=model_coverage(model, records),
    )


def _prune_whole_model(pruner, model: nn.Module, calibration, *, pattern, sparsity, include, exclude, device,
                       seed: int, batch_size: int, method_options: dict[str, Any] | None,
                       progress: bool) -> PruneResult:
    """A ``whole_model`` method (ARMOR) behind the public verb (``pattern``/``sparsity`` as
    :meth:`PruneConfig.parse` checked them against its capabilities), run on a
    :class:`~sparsewise.methods.ModelTask`, reported in a :class:`PruneResult`."""
    if pruner.capabilities.takes_data and calibration is None:
        raise ConfigError(f"method {pruner.name!r} needs calibration data: pass calibration=sw.data.calibration(...).")
    compute_device = pick_device(device, model)
    start_gpu_peak(compute_device)
    start = time.perf_counter()
    task = ModelTask(model, calibration, pattern, sparsity, include, exclude, compute_device, seed, batch_size,
                     progress, dict(method_options or {}))
    records = pruner.prune_model(task)
    return PruneResult(
        method=pruner.name, pattern=str(pattern), sparsity=sparsity, records=records,
        wall_s=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(), peak_gpu_mb=gpu_peak_mb(compute_device),
        device=str(compute_device), sequential="block", calibration=_calibration_facts(calibration),
        # a method that removed whole parts and masked nothing has no mask coverage to state
        coverage=model_coverage(model, records) if records or not task.removed else None,
        removed=task.removed, notes=task.notes,
    )

def _allocate(allocation, options, pattern: Pattern, sparsity: float, model, adapter, layers, calibration,
              device: torch.device, seed: int, choices: list[Pattern] | None = None):
    """The per-layer plan, or None for the uniform default (every layer at ``sparsity``).

    ``allocation`` is what :meth:`PruneConfig.parse` made of the request (None: uniform), which
    already refused allocations the pattern cannot take. With mixed N:M ``choices`` the
    allocator's continuous ratios are rounded to the choices' sparsities
    (``allocation.budget.assign_levels``), so layers it would keep denser get the denser pattern."""
    if allocation is None:
        return None
    from .allocation import allocate, layer_shapes
    from .allocation.budget import assign_levels

    shapes = layer_shapes(adapter, layers)
    plan = allocate(allocation, target=sparsity, shapes=shapes, model=model, adapter=adapter, layers=layers,
                    calibration=calibration, device=device, seed=seed, **dict(options or {}))
    if choices:
        levels = [choice.fixed_sparsity for choice in choices]
        plan.sparsities = assign_levels(plan.sparsities, shapes, levels, sparsity)
        plan.method = f"{plan.method} -> N:M choices {', '.join(str(choice) for choice in choices)}"
    return plan


class _LayerPruner:
    """Prunes one layer at a time, keeping its original weights until the whole run succeeds."""

    def __init__(self, model: nn.Module, pruner, pattern: Pattern, sparsity: float, device: torch.device,
                 generator: torch.Generator, options: dict[str, Any], refiner, needs: frozenset[str]):
        self.model, self.pruner, self.pattern, self.sparsity, self.device = model, pruner, pattern, sparsity, device
        self.replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original module)
        self.refiner = refiner
        self.needs = needs  # the statistics of the method and the refiner, collected once for both
        self.generator, self.options = generator, options
        self.sparsities: dict[str, float] = {}  # per-layer ratios of an allocation (else ``sparsity``)
        self.patterns: dict[str, Pattern] = {}  # per-layer N:M choice of a mixed allocation (else ``pattern``)
        self.backup: dict[str, torch.Tensor] = {}
        self.param_backup: list[tuple[nn.Parameter, torch.Tensor]] = []  # block parameters a refit changes
        self.records: dict[str, LayerRecord] = {}
        self.reconstructed: dict[int, dict[str, Any]] = {}  # block index -> reconstruct_block's info

    def keep_originals(self, layers: dict[str, PrunableLayer]) -> None:
        """Hold the weights of a block about to be onloaded to the compute device, without a copy.

        Moving a module replaces its parameters' tensors, so the ones it leaves behind are the
        untouched originals: keeping a reference saves a device-to-host copy per layer (at 7B
        scale about a tenth of Wanda's time). Weights already on the compute device are copied in
        :meth:`apply` instead, since pruning writes into them in place.
        """
        for name, layer in layers.items():
            weight = layer.get_weight()
            if weight.device.type != self.device.type and name not in self.backup:  # same type: maybe in place
                self.backup[name] = weight.detach()

    def apply(self, name: str, layer: PrunableLayer, stats=None, keep: torch.Tensor | None = None) -> None:
        weight = layer.get_weight()
        if name not in self.backup:
            self.backup[name] = weight.detach().to("cpu", copy=True)
        work = weight.detach().to(self.device, torch.float32)
        if keep is not None:  # mask decided globally beforehand
            new_weight, mask, info = work * keep, keep, {}
        else:
            bias = layer.bias
            task = LayerTask(name, work, self.sparsities.get(name, self.sparsity), self.patterns.get(name, self.pattern), stats,
                             self.generator, self.options, bias=None if bias is None else bias.detach())
            result = self.pruner.prune_layer(task)
            if result.module is not None:
                self._replace(name, layer, result)
                return
            new_weight, mask, info = result.weight, result.mask, result.info
            if self.refiner is not None:
                from .correction import RefineTask

                refined = self.refiner.refine(RefineTask(name, work, mask, self.patterns.get(name, self.pattern), stats))
                new_weight, mask, info = refined.weight, refined.mask, {**info, "refine": refined.info}
        layer.set_weight(new_weight.to(weight.dtype))
        self.record(name, layer, info, mask)

    def _replace(self, name: str, layer: PrunableLayer, result) -> None:
        """Put the method's module in the layer's place; its pruned core gets the record."""
        if self.refiner is not None:
            raise ConfigError(f"{self.pruner.name} replaces modules; a refiner re-picks masks of plain weights: drop refine.")
        parent_name, _, attribute = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        weight = layer.get_weight()  # the new module computes in the model's dtype, on the layer's device
        module = result.module.to(device=weight.device, dtype=weight.dtype)
        setattr(parent, attribute, module)
        self.replaced.append((parent, attribute, layer.module))
        core = f"{name}.{result.core}" if result.core else name
        mask = result.mask
        self.records[core] = LayerRecord(
            name=core, pattern=str(self.patterns.get(name, self.pattern)), sparsity=self.sparsities.get(name, self.sparsity),
            achieved=float((~mask).sum()) / mask.numel(), method=self.pruner.name, shape=tuple(mask.shape),
            info=result.info, mask=mask,
        )

    def adopt(self, name: str, layer: PrunableLayer, weight: torch.Tensor, record: dict[str, Any]) -> None:
        """Take a layer finished by an earlier, interrupted run (resume)."""
        self.backup[name] = layer.get_weight().detach().to("cpu", copy=True)
        layer.set_weight(weight.to(layer.get_weight()))
        self.record(name, layer, record.get("info", {}), layer.get_weight() != 0)

    def record(self, name: str, layer: PrunableLayer, info: dict[str, Any], mask: torch.Tensor) -> None:
        zeros = (layer.get_weight() == 0).sum().item()
        self.records[name] = LayerRecord(
            name=name, pattern=str(self.patterns.get(name, self.pattern)), sparsity=self.sparsities.get(name, self.sparsity),
            achieved=zeros / (layer.out_features * layer.in_features), method=self.pruner.name,
            shape=(layer.out_features, layer.in_features), info=info, mask=mask,
        )

    def keep_block_params(self, block: nn.Module, layers: dict[str, PrunableLayer]) -> None:
        """Copy the parameters of ``block`` that a refit may change and :meth:`apply` did not back up
        (norm scales, biases), so that :meth:`restore` can put the whole block back."""
        for _name, param in _other_params(block, layers):
            self.param_backup.append((param, param.detach().to("cpu", copy=True)))

    def restore(self, layers: dict[str, PrunableLayer]) -> None:
        for parent, attribute, original in reversed(self.replaced):
            setattr(parent, attribute, original)
        for name, original in self.backup.items():
            layers[name].set_weight(original.to(layers[name].get_weight().device))
        for param, original in self.param_backup:
            param.data = original.to(param.device, param.dtype)


_PARAM_KEY = "param:"  # resume-state key prefix of block parameters that are not layer weights


def _other_params(block: nn.Module, layers: dict[str, PrunableLayer]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of ``block`` besides its layers' weights: what a refit changes beyond them."""
    weights = {id(layer.module.weight) for layer in layers.values()}
    return [(name, param) for name, param in block.named_parameters() if id(param) not in weights]


def _prune_calibrated(model, adapter, layers, run: _LayerPruner, calibration, sequential: str, batch_size: int,
                      resume_dir, settings: dict[str, Any], bar, reconstruct_config=None) -> None:
    """Block-by-block calibration and pruning, optionally resuming from ``resume_dir``."""
    batches = calibration_batches(calibration, None if sequential == "layer" else batch_size)
    start_block, hidden_states, run_progress = 0, None, None
    if resume_dir is not None:
        shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
        run_progress = RunProgress(resume_dir, fingerprint(settings, batches, shapes))
        state = run_progress.load()
        if state is not None:
            start_block, weights, hidden_states, done_records = state
            for data in done_records:
                run.adopt(data["name"], layers[data["name"]], weights[data["name"]], data)
            for key, value in weights.items():  # parameters of refitted blocks besides the layer weights
                if key.startswith(_PARAM_KEY):
                    param = model.get_parameter(key[len(_PARAM_KEY):])
                    run.param_backup.append((param, param.detach().to("cpu", copy=True)))
                    param.data = value.to(param.device, param.dtype)
            for index in range(start_block):
                for name in adapter.block_layers(index):
                    if "reconstruct" in run.records[name].info:
                        run.reconstructed[index] = run.records[name].info["reconstruct"]
            bar.update(start_block)

    def after_block(index: int, _name: str, outputs: list[torch.Tensor]) -> None:
        bar.update(1)
        if run_progress is not None:
            done = adapter.block_layers(index)
            tensors = {name: layer.get_weight() for name, layer in done.items()}
            if reconstruct_config is not None:  # the refit also changed norm scales and biases
                block_name, block = adapter.blocks[index]
                tensors.update({f"{_PARAM_KEY}{block_name}.{name}": param for name, param in _other_params(block, done)})
            run_progress.save(index, tensors, outputs, [record.to_json() for record in run.records.values()])

    refit = None
    if reconstruct_config is not None:
        from .correction.reconstruct import reconstruct_block

        def refit(index: int, block: nn.Module, calls, targets) -> None:
            block_layers = adapter.block_layers(index)
            run.keep_block_params(block, block_layers)
            info = reconstruct_block(block, calls, targets, reconstruct_config)
            run.reconstructed[index] = info
            for name in block_layers:
                run.records[name].info["reconstruct"] = info

    sequential_calibration(
        model, adapter.blocks, adapter.block_layers, batches,
        lambda name, stats: run.apply(name, layers[name], stats),
        wanted=run.needs, device=run.device, mode=sequential,
        start_block=start_block, hidden_states=hidden_states, after_block=after_block,
        before_block=lambda index: run.keep_originals(adapter.block_layers(index)),
        reconstruct=refit, stack_starts=adapter.stack_starts,
    )
    if run_progress is not None:
        run_progress.clear()


def _calibration_facts(calibration, given=None) -> dict[str, Any]:
    """Where the samples came from: a CalibrationSet's own facts; for other forms (a tensor,
    dicts) the normalized set's source, n and seqlen (their seed is not known)."""
    if calibration is None:
        return {}
    keys = ("source", "n", "seqlen", "seed", "note") if given is None or given is calibration else ("source", "n", "seqlen")
    return {key: getattr(calibration, key) for key in keys if getattr(calibration, key, None) is not None}
