"""End-to-end jobs behind the CLI: load -> calibrate -> prune -> evaluate -> save, with a summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PruneConfig


@dataclass
class JobReport:
    """Everything a prune job measured, printable as one screen."""

    config: PruneConfig
    timings: dict[str, float] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    prune: Any = None
    calibration_note: str = ""
    saved: dict[str, Any] | None = None

    def summary(self) -> str:
        cfg = self.config
        result = self.prune
        rule = "-" * 66
        lines = [
            rule,
            f"sparsewise prune | {cfg.model} | {result.method} {result.pattern} at {result.sparsity:.0%}",
            rule,
            f"calibration  {self.calibration_note}",
            f"layers       {len(result.records)} pruned, {result.counted_params:,} counted weights, "
            f"achieved sparsity {result.achieved_sparsity:.2%}",
            f"time         prune {result.wall_s:.1f} s | "
            + " | ".join(f"{key} {value:.1f} s" for key, value in self.timings.items()),
            f"memory       peak RSS {result.peak_rss_mb:.0f} MB"
            + (f", peak GPU {result.peak_gpu_mb:.0f} MB" if result.peak_gpu_mb is not None else ""),
            *(f"{'steps' if index == 0 else '':13}{line}" for index, line in enumerate(result.details)),
            "",
            f"{'':28}{'dense':>14}{'sparse':>14}",
        ]
        for key, label, fmt in (
            ("kl", "KL(dense || sparse) /token", "{:.4f}"),
            ("top1", "top-1 agreement", "{:.2%}"),
            ("ppl", "perplexity", "{:.3f}"),
        ):
            if key in self.after:
                lines.append(f"{label:28}{fmt.format(self.before[key]):>14}{fmt.format(self.after[key]):>14}")
        if "fidelity_note" in self.after:
            lines.append(f"  fidelity on {self.after['fidelity_note']}")
        if "ppl_note" in self.after:
            lines.append(f"  perplexity on {self.after['ppl_note']}")
        for warning in result.warnings:
            lines.append(f"warning: {warning}")
        if self.saved:
            lines.append(
                f"saved        {self.saved['path']} ({self.saved['weights_bytes'] / 2**20:.1f} MiB weights, "
                f"{self.saved['ratio']:.3f}x dense)"
            )
        lines.append(rule)
        return "\n".join(lines)


def prune_job(config: PruneConfig, *, progress: bool = True, log=print) -> JobReport:
    """Run a whole pruning job as configured and return its report (the CLI prints the summary)."""
    from . import data, formats, metrics
    from .models import load_model
    from .oneshot import pick_device, prune

    config.validate()
    report = JobReport(config)
    clock = time.perf_counter()
    model, tokenizer = load_model(config.model)
    report.timings["load"] = time.perf_counter() - clock
    model.to(pick_device(config.device, model))

    clock = time.perf_counter()
    if config.calib == "self":
        # one batch for all sequences: generation is per-token launch-bound, so fewer, wider steps win
        calib = data.calibration("self", tokenizer, n=config.self_n, seqlen=config.self_seqlen, seed=config.seed,
                                 model=model, batch_size=config.self_n, progress=progress)
        report.calibration_note = f"self-generated, {config.self_n} x {config.self_seqlen} tokens, seed {config.seed}"
    else:
        calib = data.calibration(config.calib, tokenizer, n=config.calib_n, seqlen=config.calib_seqlen,
                                 seed=config.seed)
        report.calibration_note = f"{config.calib}, {config.calib_n} x {config.calib_seqlen} tokens, seed {config.seed}"
    report.timings["calibration data"] = time.perf_counter() - clock

    # Held-out fidelity text: sampled from the dense model with a different seed than calibration.
    clock = time.perf_counter()
    held_out = data.calibration("self", tokenizer, n=config.fidelity_n, seqlen=config.fidelity_seqlen,
                                seed=config.seed + 1_000_003, model=model, batch_size=config.fidelity_n,
                                progress=progress)
    probe = metrics.FidelityProbe.capture(model, held_out.input_ids)
    report.before.update(kl=0.0, top1=1.0)
    if config.eval:
        dense_ppl = metrics.perplexity(model, tokenizer, config.eval, seqlen=config.eval_seqlen,
                                       max_windows=config.max_windows, progress=progress)
        report.before["ppl"] = dense_ppl.ppl
    report.timings["dense eval"] = time.perf_counter() - clock

    log(f"pruning {config.model} with {config.method} ({config.pattern}, sparsity {config.sparsity}) ...")
    result = prune(
        model, method=config.method, sparsity=config.sparsity, pattern=config.pattern, calibration=calib,
        include=config.include or None, exclude=config.exclude or None, device=config.device,
        seed=config.seed, sequential=config.sequential, batch_size=config.batch_size,
        method_options=config.method_options, resume_dir=config.resume_dir, progress=progress,
        allocation=config.allocation, allocation_options=config.allocation_options,
        refine=config.refine, refine_options=config.refine_options,
        reconstruct=(config.reconstruct_options or True) if config.reconstruct else None,
    )
    report.prune = result

    clock = time.perf_counter()
    fidelity = probe.compare(model)
    report.after.update(kl=fidelity.kl, top1=fidelity.top1_agreement,
                        fidelity_note=f"{config.fidelity_n} x {config.fidelity_seqlen} held-out self-generated tokens")
    if config.eval:
        sparse_ppl = metrics.perplexity(model, tokenizer, config.eval, seqlen=config.eval_seqlen,
                                        max_windows=config.max_windows, progress=progress)
        report.after["ppl"] = sparse_ppl.ppl
        report.after["ppl_note"] = (f"{Path(config.eval).name}, seqlen {sparse_ppl.seqlen}, "
                                    f"{sparse_ppl.n_windows}/{sparse_ppl.total_windows} windows")
    report.timings["sparse eval"] = time.perf_counter() - clock

    if config.out:
        clock = time.perf_counter()
        path = formats.save(model, config.out, tokenizer=tokenizer, format=config.save_format,
                            overwrite=config.overwrite, manifest_extra={"job": _config_json(config)})
        report.timings["save"] = time.perf_counter() - clock
        if config.save_format == "sparsewise":
            size = formats.checkpoint_size(path)
            report.saved = {"path": str(path), "weights_bytes": size["weights_bytes"],
                            "ratio": size["weights_bytes"] / max(size["dense_bytes"], 1)}
    return report


def _config_json(config: PruneConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)
