"""End-to-end jobs behind the CLI: load -> calibrate -> prune -> evaluate -> save, with a summary.

Everything that can be checked without the model is checked before it is loaded: the settings
(:meth:`PruneConfig.validate`) and the output directory (:func:`check_output`), so a job that
could not save does not spend minutes pruning first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PruneConfig, ValidConfig
from .errors import ConfigError

_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _sparsewise_made(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint sparsewise wrote (either save format)."""
    from .formats.checkpoint import MANIFEST_NAME, RECORDS_NAME

    return (directory / MANIFEST_NAME).is_file() or (directory / RECORDS_NAME).is_file()


def check_output(out: str | os.PathLike, overwrite: bool) -> bool:
    """Refuse (ConfigError) an output directory the save at the end of a job would refuse or that
    must not be touched; run before any work. Returns whether the save may replace ``out``.

    Accepted: a path that does not exist; an empty directory; with ``overwrite``, a directory
    holding a previous sparsewise checkpoint (``sparsewise.json``, or ``sparsewise_records.json``
    of an hf-dense save). Anything else (a file, a non-empty directory of other files, even a plain
    Hugging Face folder) is refused even with ``overwrite``: a job never deletes unrelated files.
    This is stricter than, never looser than, the check inside :func:`sparsewise.save`.
    """
    target = Path(out).expanduser().absolute()
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory: choose another path.")
        if not any(target.iterdir()):
            return True  # an empty directory: nothing to lose
        if not _sparsewise_made(target):
            raise ConfigError(
                f"--out {out} is a non-empty directory that is not a sparsewise checkpoint: it is refused even "
                "with --overwrite (which only replaces a previous sparsewise checkpoint, never other files); "
                "choose another path, or empty it yourself."
            )
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a sparsewise checkpoint: pass --overwrite to replace it, "
                              "or choose another path.")
        return True
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {parent} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be created: {parent} is not writable.")
    return False


def _dtype_name(dtype) -> str:
    text = str(dtype).replace("torch.", "")
    return _DTYPE_NAMES.get(text, text)


def _model_dtype(model) -> str:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return _dtype_name(tensor.dtype)
    return "fp32"


@dataclass
class JobState:
    """Where a job is, so an interruption (Ctrl-C) can say truthfully what it left on disk."""

    out: Path | None = None
    saving: bool = False
    saved: bool = False
    out_id: tuple[int, int] | None = None  # (device, inode) of ``out`` before the save, if it existed
    resume_dir: str | None = None

    def interrupted_message(self) -> str:
        note = ""
        if self.resume_dir and (Path(self.resume_dir) / "progress.json").is_file():
            note = f" (finished blocks are kept in {self.resume_dir}: rerun the same command to resume)"
        if self.saved:
            return f"interrupted after the checkpoint was saved to {self.out}{note}"
        if not self.saving:
            return f"interrupted; nothing written{note}"
        # saves are atomic (written to a temp dir, then renamed in): out is the old or the new one
        try:
            stat = os.stat(self.out)
            now = (stat.st_dev, stat.st_ino)
        except OSError:
            now = None
        if now is not None and now != self.out_id:
            return f"interrupted after the checkpoint was saved to {self.out}{note}"
        left = "left unchanged" if now is not None else "not created"
        return (f"interrupted while saving; nothing written ({self.out} {left}: saves are atomic, no partial copy "
                f"is left){note}")


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
            saved = self.saved
            size = f", {saved['weights_bytes'] / 2**20:.1f} MiB weights" if "weights_bytes" in saved else ""
            if saved.get("ratio") is not None and saved["format"] == "sparsewise":
                size += f", {saved['ratio']:.3f}x dense"
            lines.append(f"saved        {saved['path']} (format {saved['format']}, {saved['dtype']}{size})")
        lines.append(rule)
        return "\n".join(lines)


def prune_job(config: PruneConfig | ValidConfig, *, progress: bool = True, log=print,
              state: JobState | None = None) -> JobReport:
    """Run a whole pruning job as configured and return its report (the CLI prints the summary).

    ``config`` is parsed once here (:meth:`PruneConfig.parse`, unless already a :class:`ValidConfig`),
    before the model is loaded; ``sw.prune`` runs on the parsed values. ``state`` (optional) is kept
    up to date with what the job has written, for interruptions.
    """
    from . import data, formats, metrics
    from .calibration.run import pick_device
    from .metrics.perplexity import check_seqlen
    from .models import load_model
    from .oneshot import prune

    state = state if state is not None else JobState()
    valid = config if isinstance(config, ValidConfig) else config.parse()
    config = valid.config  # strings read, max_windows 0 -> None
    replace_out = check_output(config.out, bool(config.overwrite)) if config.out else False
    state.resume_dir = config.resume_dir
    sparsity = config.effective_sparsity()
    report = JobReport(config)
    clock = time.perf_counter()
    log(f"loading {config.model} ...")
    model, tokenizer = load_model(config.model)
    report.timings["load"] = time.perf_counter() - clock
    # windows beyond the model's positions would run and report numbers that mean nothing
    lengths = {"--fidelity-seqlen": config.fidelity_seqlen,
               **({"--self-seqlen": config.self_seqlen} if config.calib == "self" else
                  {"--calib-seqlen": config.calib_seqlen}),
               **({"--eval-seqlen": config.eval_seqlen} if config.eval else {})}
    for flag, length in lengths.items():
        check_seqlen(model, length, name=flag)
    model.to(pick_device(config.device, model))

    clock = time.perf_counter()
    if config.calib == "self":
        log(f"generating calibration text: {config.self_n} x {config.self_seqlen} tokens ...")
        # one batch for all sequences: generation is per-token launch-bound, so fewer, wider steps win
        calib = data.calibration("self", tokenizer, n=config.self_n, seqlen=config.self_seqlen, seed=config.seed,
                                 model=model, batch_size=config.self_n, progress=progress)
        report.calibration_note = f"self-generated, {config.self_n} x {config.self_seqlen} tokens, seed {config.seed}"
    else:
        calib = data.calibration(config.calib, tokenizer, n=config.calib_n, seqlen=config.calib_seqlen,
                                 seed=config.seed)
        report.calibration_note = f"{config.calib}, {config.calib_n} x {config.calib_seqlen} tokens, seed {config.seed}"
    report.timings["calibration data"] = time.perf_counter() - clock
    log("measuring the dense model ...")

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

    shown = f"sparsity {sparsity}" if sparsity is not None else "its implied sparsity"
    log(f"pruning {config.model} with {config.method} ({config.pattern}, {shown}) ...")
    result = prune(model, calibration=calib, progress=progress, config=valid)
    report.prune = result

    log("measuring the pruned model ...")
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
        dtype = config.dtype  # a lower-case name or None (parse read it)
        log(f"saving to {config.out} ({config.save_format}{', ' + dtype if dtype else ''}) ...")
        state.out = Path(config.out).expanduser().absolute()
        with _suppress_os_error():
            stat = os.stat(state.out)
            state.out_id = (stat.st_dev, stat.st_ino)
        state.saving = True
        job = _config_json(config, sparsity=result.sparsity)
        path = formats.save(model, config.out, tokenizer=tokenizer, format=config.save_format,
                            overwrite=replace_out, manifest_extra={"job": job}, **({"dtype": dtype} if dtype else {}))
        state.saving, state.saved = False, True
        report.timings["save"] = time.perf_counter() - clock
        info = getattr(path, "info", None)  # what save wrote (sparsewise.formats.SaveInfo)
        written = _dtype_name(info.dtype) if getattr(info, "dtype", None) else None
        report.saved = {"path": str(path), "format": config.save_format,
                        "dtype": written or dtype or _model_dtype(model)}
        with _suppress_os_error():
            size = formats.checkpoint_size(path)
            report.saved.update(weights_bytes=size["weights_bytes"],
                                ratio=size["weights_bytes"] / max(size["dense_bytes"], 1))
    return report


def _suppress_os_error():
    import contextlib

    from .errors import CheckpointError

    return contextlib.suppress(OSError, CheckpointError)


def _config_json(config: PruneConfig, *, sparsity: float | None = None) -> dict[str, Any]:
    """The job's settings for the manifest, with the sparsity it pruned at (implied by N:M or given)."""
    from dataclasses import asdict

    settings = asdict(config)
    if sparsity is not None:
        settings["sparsity"] = sparsity
    return settings
