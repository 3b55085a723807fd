"""``sparsewise prune / eval / report``: the command line mirrors the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PruneConfig
from .errors import ConfigError, SparsewiseError


def _prune_parser(sub) -> None:
    cmd = sub.add_parser("prune", help="prune a model (defaults: bundled SmolLM2-135M, Wanda, 50%%)",
                         description="Prune a model and print a before/after summary. Every flag is also a "
                                     "field of a YAML recipe (--recipe); flags given here win.")
    add = cmd.add_argument
    add("--recipe", type=Path, help="YAML file with the same fields as these flags (dashes or underscores)")
    add("--model", help="short name (smollm2-135m, minilm-l6), HF dir, .gguf file, hub id or sparsewise dir")
    add("--method", help="magnitude | random | wanda | sparsegpt (default wanda) | armor (with --pattern 2:4; "
                         "--option iterations=N, block_size=32)")
    add("--sparsity", type=float, help="fraction of zeros per layer, e.g. 0.5 (N:M patterns fix it)")
    add("--pattern", help="unstructured (per row) | unstructured:layer | unstructured:global | N:M | block:RxC | "
                          "mixed N:M choices such as 2:4,1:4 (with --sparsity and --allocation)")
    add("--calib", help="calibration: .txt/.raw/.jsonl/.parquet path, dataset name, or 'self' (default)")
    add("--calib-n", type=int, help="calibration windows (default 128; 'self' uses --self-n)")
    add("--calib-seqlen", type=int, help="tokens per calibration window (default 512)")
    add("--self-n", type=int, help="self-generated calibration sequences (default 32)")
    add("--self-seqlen", type=int, help="tokens per self-generated sequence (default 256)")
    add("--seed", type=int, help="seed of every random choice (default 0)")
    add("--eval", help="perplexity text: path or dataset name (optional)")
    add("--eval-seqlen", "--seqlen", dest="eval_seqlen", type=int, help="perplexity window (default 512)")
    add("--max-windows", type=int, help="evenly spaced subset of eval windows (default 32; 0 = all)")
    add("--fidelity-n", type=int, help="held-out self-generated sequences for KL/top-1 (default 8)")
    add("--fidelity-seqlen", type=int, help="tokens per held-out sequence (default 256)")
    add("--sequential", choices=["layer", "block"],
        help="layer: one pass per block, layers pruned in order (default); block: classic two-pass scheme")
    add("--resume-dir", help="checkpoint progress after every block here; rerun the same command to resume")
    add("--option", action="append", metavar="KEY=VALUE",
        help="method option, e.g. --option damp_ratio=0.1 --option block_size=64 (recipe: method_options)")
    add("--allocation", help="per-layer ratios under the global sparsity: uniform (default) | er | erk | owl | ecoflap")
    add("--allocation-option", action="append", metavar="KEY=VALUE",
        help="allocator option, e.g. --allocation-option m=5 --allocation-option lam=0.08 (recipe: "
             "allocation_options)")
    add("--refine", help="mask refiner run after the method on every layer: dsnot")
    add("--refine-option", action="append", metavar="KEY=VALUE",
        help="refiner option, e.g. --refine-option skip_modules=[mlp] (recipe: refine_options)")
    add("--reconstruct", action="store_true", default=None,
        help="after each block is pruned, refit its kept weights to the dense model's block outputs on the "
             "calibration samples (masks fixed; EBFT-style block-wise reconstruction)")
    add("--reconstruct-option", action="append", metavar="KEY=VALUE",
        help="reconstruction option: epochs, lr, micro_batch, holdout, patience, seed (recipe: "
             "reconstruct_options)")
    add("--include", nargs="+", help="regexes of module names to prune (default: every linear in the blocks)")
    add("--exclude", nargs="+", help="regexes of module names to skip")
    add("--device", help="auto | cpu | cuda (default auto)")
    add("--batch-size", type=int, help="calibration batch size (default 8)")
    add("--out", help="directory to save the pruned model to")
    add("--save-format", choices=["sparsewise", "hf-dense"], help="compressed sparsewise (default) or plain HF")
    add("--overwrite", action="store_true", default=None, help="replace an existing --out directory")
    add("--no-progress", action="store_true", help="no progress bars")


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
    cmd = sub.add_parser("report", help="per-layer sparsity table, N:M pattern check, size on disk; "
                                        "or the summary of a sparse-training log")
    cmd.add_argument("path", nargs="?", help="a sparsewise checkpoint directory (or an --save-format hf-dense "
                                             "folder); optional with --training-log")
    cmd.add_argument("--training-log", type=Path, metavar="CSV",
                     help="summarize a sparse-training log (attach(..., log=CSV)): steps, global sparsity, "
                          "mask flips per interval, per-layer final sparsity")
    cmd.add_argument("--plot", type=Path, metavar="PNG",
                     help="with --training-log: write sparsity, mask flips and PQ Index over steps to a PNG")
    cmd.add_argument("--max-rows", type=int, default=None, help="show at most this many layer rows")
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


def cmd_prune(args: argparse.Namespace) -> int:
    from .jobs import prune_job

    config = PruneConfig.from_yaml(args.recipe) if args.recipe else PruneConfig()
    # KEY=VALUE flags add to the recipe's option dicts instead of replacing them
    option_flags = {"method_options": ("option", "--option"),
                    "allocation_options": ("allocation_option", "--allocation-option"),
                    "refine_options": ("refine_option", "--refine-option"),
                    "reconstruct_options": ("reconstruct_option", "--reconstruct-option")}
    overrides = {name: getattr(args, name, None) for name in PruneConfig.field_names() if name not in option_flags}
    config = config.merged(overrides)
    for field_name, (dest, flag) in option_flags.items():
        items = getattr(args, dest)
        if items:
            setattr(config, field_name, {**getattr(config, field_name), **_parse_options(items, flag)})
    if config.max_windows == 0:
        config.max_windows = None
    import torch

    from .calibration.distributed import init_from_env, world

    joined = init_from_env()  # torchrun: ranks share the calibration samples, all-reduce statistics
    rank, world_size = world()
    try:
        if world_size > 1:
            if config.resume_dir:
                raise ConfigError("--resume-dir is per process: run without it under torchrun.")
            if torch.cuda.is_available() and config.device in ("auto", "cuda"):
                config.device = f"cuda:{torch.cuda.current_device()}"
            if rank != 0:  # every rank prunes the same masks; one writes and reports
                config.out, config.eval = None, None
        report = prune_job(config, progress=not args.no_progress and rank == 0,
                           log=print if rank == 0 else (lambda *_args, **_kwargs: None))
        if rank == 0:
            print(report.summary())
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

    from .metrics import perplexity
    from .models import load_model
    from .oneshot import pick_device

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise SparsewiseError(f"{args.model} has no tokenizer saved beside it; perplexity needs one.")
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


def _report_training_log(args: argparse.Namespace) -> None:
    from .training.metrics import format_training_log, read_training_log, summarize_training_log

    rows = read_training_log(args.training_log)
    if args.json:
        print(json.dumps({"training_log": str(args.training_log), **summarize_training_log(rows)}, indent=2))
    else:
        print(f"training log: {args.training_log}")
        print(format_training_log(rows, max_rows=args.max_rows))
    if args.plot is not None:
        from .metrics.plots import plot_training_log

        written = plot_training_log(rows, args.plot, title=args.training_log.name)
        print(f"plot written to {written}", file=sys.stderr if args.json else sys.stdout)


def cmd_report(args: argparse.Namespace) -> int:
    if args.plot is not None and args.training_log is None:
        raise ConfigError("--plot draws a training log: pass --training-log CSV too.")
    if args.training_log is not None:
        _report_training_log(args)
        if args.path is None:
            return 0
        print()
    elif args.path is None:
        raise ConfigError("report needs a model directory, or --training-log CSV.")
    from .formats import checkpoint_size
    from .metrics import sparsity_report
    from .models import load_model
    from .records import get_records

    model, _ = load_model(args.path)  # a sparsewise checkpoint or a plain (hf-dense) HF folder
    report = sparsity_report(model, records=get_records(model) or None)
    size = checkpoint_size(args.path)
    if args.json:
        print(json.dumps({"sparsity": report.to_json(), "size": size}, indent=2))
        return 0
    print(report.table(max_rows=args.max_rows))
    print(f"size on disk: {size['weights_bytes'] / 2**20:.1f} MiB weights vs {size['dense_bytes'] / 2**20:.1f} MiB "
          f"dense ({size['weights_bytes'] / max(size['dense_bytes'], 1):.3f}x)")
    print("pattern check: " + ("every N:M group valid" if report.all_patterns_ok else "VIOLATIONS (see table)"))
    return 0 if report.all_patterns_ok else 1


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


if __name__ == "__main__":
    sys.exit(main())
