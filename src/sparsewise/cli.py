"""``sparsewise prune / eval / report``: the command line mirrors the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import GROUPS, Option, PruneConfig
from .errors import ConfigError, SparsewiseError

PRUNE_EXAMPLES = """\
examples:
  # SparseGPT 2:4 on C4, perplexity on WikiText-2, saved compressed in bf16
  sparsewise prune --model smollm2-135m --method sparsegpt --pattern 2:4 \\
      --calib c4-train.00000-of-01024.jsonl --eval wiki.test.raw --out pruned/ --dtype bf16

  # Wanda at 60% with OWL's per-layer ratios and DSnoT refinement, settings from a recipe
  sparsewise prune --recipe recipe.yaml --sparsity 0.6 --allocation owl --allocation-option lam=0.08 \\
      --refine dsnot --out pruned-owl/ --overwrite
"""


def _help(option: Option) -> str:
    """The option's help with its choices and default filled in (``--help`` shows what applies)."""
    text = option.spec.help
    if "{choices}" in text:
        text = text.replace("{choices}", " | ".join(option.choices()))
    default = option.spec.shown_default
    if default is None and option.form == "value" and option.default is not None:
        default = str(option.default)
    if default is not None:
        text = text.replace("{default}", default) if "{default}" in text else f"{text} (default {default})"
    if option.flags[0] != f"--{option.name.replace('_', '-')}":
        text += f" (recipe: {option.name})"
    return text.replace("%", "%%")  # argparse formats help with %


def _add_option(group: argparse._ArgumentGroup, option: Option) -> None:
    """One PruneConfig field as a flag. Its default is None, so that only the flags given override
    a recipe; the config's default is shown in the help."""
    kwargs: dict = {"dest": option.name, "default": None, "help": _help(option)}
    if option.form == "switch":
        kwargs["action"] = "store_true"
    elif option.form == "words":
        kwargs["nargs"] = "+"
    elif option.form == "pairs":
        kwargs.update(action="append", metavar="KEY=VALUE")
    else:
        if option.spec.parse is not str:
            kwargs["type"] = option.spec.parse
        kwargs.update(choices=option.choices(), metavar=option.spec.metavar)
    group.add_argument(*option.flags, **kwargs)


def _prune_parser(sub) -> None:
    cmd = sub.add_parser("prune", help="prune a model (defaults: bundled SmolLM2-135M, Wanda, 50%%)",
                         description="Prune a model and print a before/after summary. Every flag is also a field\n"
                                     "of a YAML recipe (--recipe); flags given here win. --out is checked before\n"
                                     "any work.",
                         epilog=PRUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {title: cmd.add_argument_group(title) for title in GROUPS}
    groups["run"].add_argument("--recipe", type=Path,
                               help="YAML file with the same fields as these flags (dashes or underscores)")
    for option in PruneConfig.options():
        _add_option(groups[option.spec.group], option)
    groups["run"].add_argument("--no-progress", action="store_true",
                               help="no progress bars (without a terminal they are plain periodic lines)")


def _eval_parser(sub) -> None:
    cmd = sub.add_parser("eval", help="perplexity of a saved or named model")
    cmd.add_argument("model", help="sparsewise dir, HF dir, .gguf file, or short name")
    cmd.add_argument("--eval", required=True, help="text file or dataset name")
    cmd.add_argument("--seqlen", type=int, default=512)
    cmd.add_argument("--max-windows", type=int, default=32, help="evenly spaced subset (0 = all windows)")
    cmd.add_argument("--batch-size", type=int, default=1)
    cmd.add_argument("--device", default="auto")
    cmd.add_argument("--accelerate", action="store_true",
                     help="run the pruned linears through the sparse runtime (sparsewise.runtime.accelerate)")
    cmd.add_argument("--activation-method", help="activation sparsity at inference (teal, wina, cats, chess, "
                     "r-sparse, topk): sparsewise.sparsify_activations")
    cmd.add_argument("--activation-sparsity", type=float, default=0.5)
    cmd.add_argument("--activation-allocation", choices=["uniform", "greedy"], default="uniform")
    cmd.add_argument("--calibration", help="calibration text (e.g. a C4 jsonl) for the activation thresholds; "
                     "never the evaluation text")
    cmd.add_argument("--calibration-n", type=int, default=64)
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    cmd.add_argument("--no-progress", action="store_true")


def _report_parser(sub) -> None:
    cmd = sub.add_parser("report", help="how a saved model was made, its sparsity, N:M check and size on disk "
                                        "(--layers, --plot, --html); or the summary of a sparse-training log",
                         description="One screen about a saved model: how it was made (the prune job's settings "
                                     "kept in the checkpoint; 'not recorded' where missing), target vs achieved "
                                     "sparsity, size on disk vs dense, the N:M pattern check and the most/least "
                                     "sparse layers. --layers adds the per-layer table; --plot and --html draw it.")
    cmd.add_argument("path", nargs="?", help="a sparsewise checkpoint directory (or an --save-format hf-dense "
                                             "folder); optional with --training-log")
    cmd.add_argument("--training-log", type=Path, metavar="CSV",
                     help="summarize a sparse-training log (attach(..., log=CSV)): steps, global sparsity, "
                          "mask flips per interval, per-layer final sparsity")
    cmd.add_argument("--layers", action="store_true",
                     help="also print the full per-layer table (shape, zeros, achieved vs target sparsity, "
                          "pattern check, the error the records hold)")
    cmd.add_argument("--plot", type=Path, metavar="PNG",
                     help="write a PNG: for a model, per-layer sparsity along depth per layer kind (and per-layer "
                          "error where recorded); for --training-log, sparsity, mask flips and PQ Index over steps "
                          "(with both, the training plot goes to NAME-training.png)")
    cmd.add_argument("--html", type=Path, metavar="HTML",
                     help="write the same report as one self-contained HTML page (tables, plot embedded)")
    cmd.add_argument("--max-rows", type=int, default=None,
                     help="show at most this many layer rows (implies --layers)")
    cmd.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparsewise", description="Make neural networks sparse, and make it pay.")
    parser.add_argument("--version", action="version", version=f"sparsewise {__version__}")
    sub = parser.add_subparsers(dest="command")
    _prune_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The recipe (if any) with the flags given on top; KEY=VALUE flags add to the recipe's dicts."""
    config = PruneConfig.from_yaml(args.recipe) if args.recipe else PruneConfig()
    given = {}
    for option in PruneConfig.options():
        value = getattr(args, option.name)
        if value is not None and option.form == "pairs":
            value = {**getattr(config, option.name), **_parse_options(value, option.flags[0])}
        given[option.name] = value
    return config.merged(given)


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from .calibration.distributed import init_from_env, world
    from .jobs import JobState, prune_job

    config = config_from_args(args)
    joined = init_from_env()  # torchrun: ranks share the calibration samples, all-reduce statistics
    rank, world_size = world()
    state = JobState()
    try:
        if world_size > 1:
            if config.resume_dir:
                raise ConfigError("--resume-dir is per process: run without it under torchrun.")
            if torch.cuda.is_available() and config.device in ("auto", "cuda"):
                config.device = f"cuda:{torch.cuda.current_device()}"
            if rank != 0:  # every rank prunes the same masks; one writes and reports
                config.out, config.eval = None, None
        report = prune_job(config, progress=not args.no_progress and rank == 0,
                           log=print if rank == 0 else (lambda *_args, **_kwargs: None), state=state)
        if rank == 0:
            print(report.summary())
    except KeyboardInterrupt as exc:
        exc.sparsewise_message = state.interrupted_message()  # what main() prints
        raise
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


def _parse_options(items: list[str], flag: str = "--option") -> dict:
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r} (e.g. {flag} damp_ratio=0.1).")
        options[key.strip()] = yaml.safe_load(value)
    return options


def cmd_eval(args: argparse.Namespace) -> int:

    from .calibration.run import pick_device
    from .metrics import perplexity
    from .metrics.perplexity import check_seqlen
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise SparsewiseError(f"{args.model} has no tokenizer saved beside it; perplexity needs one.")
    check_seqlen(model, args.seqlen, name="--seqlen")  # before any calibration or evaluation
    model.to(pick_device(args.device, model))
    runtime_note = None
    if args.accelerate:
        from .runtime import accelerate

        runtime_note = accelerate(model).summary()
        print(runtime_note, file=sys.stderr)
    activation = None
    if args.activation_method:
        from .activation import sparsify_activations
        from .data import calibration

        calib = None
        if args.calibration:
            calib = calibration(args.calibration, tokenizer, n=args.calibration_n, seqlen=args.seqlen, seed=0)
        handle = sparsify_activations(model, args.activation_method, args.activation_sparsity, calib,
                                      allocation=args.activation_allocation, progress=not args.no_progress)
        activation = {"method": args.activation_method, "sparsity": args.activation_sparsity,
                      "allocation": args.activation_allocation}
        with handle.counting() as measured:
            result = perplexity(model, tokenizer, args.eval, seqlen=args.seqlen,
                                max_windows=args.max_windows or None, batch_size=args.batch_size,
                                progress=not args.no_progress)
        activation["measured_sparsity"] = handle.weighted(measured)
        print(handle.summary(measured), file=sys.stderr)
    else:
        result = perplexity(model, tokenizer, args.eval, seqlen=args.seqlen,
                            max_windows=args.max_windows or None, batch_size=args.batch_size,
                            progress=not args.no_progress)
    if args.json:
        print(json.dumps({"ppl": result.ppl, "mean_nll": result.mean_nll, "seqlen": result.seqlen,
                          "windows": result.n_windows, "total_windows": result.total_windows,
                          "tokens": result.tokens, "source": str(args.eval), "model": args.model,
                          "runtime": runtime_note, "activation": activation}, indent=2))
    else:
        print(f"{args.model}: ppl {result.ppl:.3f} on {args.eval} (seqlen {result.seqlen}, "
              f"{result.n_windows}/{result.total_windows} windows, {result.tokens:,} tokens)")
    return 0


def _report_training_log(args: argparse.Namespace) -> tuple[str, bytes | None]:
    """Print (or --json) the training log's summary, write its plot; return (text, PNG) for --html."""
    from .training.metrics import format_training_log, read_training_log, summarize_training_log

    rows = read_training_log(args.training_log)
    text = f"training log: {args.training_log}\n{format_training_log(rows, max_rows=args.max_rows)}"
    if args.json:
        print(json.dumps({"training_log": str(args.training_log), **summarize_training_log(rows)}, indent=2))
    else:
        print(text)
    png = None
    if args.plot is not None or args.html is not None:
        from .metrics.plots import plot_training_log, png_bytes

        title = args.training_log.name
        # with a model too, the model's plot takes --plot and this one goes beside it
        target = args.plot if args.plot is None or args.path is None else \
            args.plot.with_name(f"{args.plot.stem}-training{args.plot.suffix or '.png'}")
        png = _plot_for_report(plot_training_log, png_bytes, rows, target, args.html is not None, title,
                               sys.stderr if args.json else sys.stdout)
    return text, png


def _plot_for_report(plot, png_bytes, data, target, want_png: bool, title: str, notes) -> bytes | None:
    """Write ``plot(data)`` to ``target`` if given; return its PNG bytes when the HTML page needs them
    (drawn in memory without a target; None, with a note, when matplotlib is missing)."""
    if target is not None:
        written = plot(data, target, title=title)
        print(f"plot written to {written}", file=notes)
        return written.read_bytes() if want_png else None
    try:
        return png_bytes(plot, data, title=title)
    except ConfigError as exc:  # no matplotlib: the page goes without the plot
        print(f"sparsewise: note: {exc}; the HTML page has no plot.", file=sys.stderr)
        return None


def cmd_report(args: argparse.Namespace) -> int:
    if args.path is None and args.training_log is None:
        raise ConfigError("report needs a model directory, or --training-log CSV (--plot and --html draw either).")
    from .metrics.report import checkpoint_report, html_page, text_section, write_html

    notes = sys.stderr if args.json else sys.stdout
    sections = []
    if args.training_log is not None:
        text, png = _report_training_log(args)
        sections.append((f"Training log: {args.training_log.name}", text_section(text, png, "training log plot")))
        if args.path is None:
            if args.html is not None:
                written = write_html(args.html, html_page(f"sparsewise report: {args.training_log}", sections))
                print(f"html report written to {written}", file=notes)
            return 0
        if not args.json:
            print()

    report = checkpoint_report(args.path)  # a sparsewise checkpoint or a plain (hf-dense) HF folder
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        if args.layers or args.max_rows is not None:
            print(report.layers_table(max_rows=args.max_rows))
            print()
        print(report.summary())
    png = None
    if args.plot is not None or args.html is not None:
        from .metrics.plots import plot_model_report, png_bytes

        title = f"{Path(args.path).name}: per-layer sparsity"
        png = _plot_for_report(plot_model_report, png_bytes, report, args.plot, args.html is not None, title, notes)
    if args.html is not None:
        written = write_html(args.html, report.to_html(png, layers_open=args.layers, extra_sections=sections))
        print(f"html report written to {written}", file=notes)
    return 0 if report.sparsity.all_patterns_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # The embedded default job: `sparsewise` alone behaves like `sparsewise prune`.
        args = parser.parse_args(["prune", *(argv or [])])
    handlers = {"prune": cmd_prune, "eval": cmd_eval, "report": cmd_report}
    try:
        return handlers[args.command](args)
    except SparsewiseError as exc:
        print(f"sparsewise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, not a traceback (saves are atomic)
        print(f"sparsewise: {getattr(exc, 'sparsewise_message', None) or 'interrupted; nothing written'}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
