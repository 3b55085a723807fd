"""Side by side with llm-compressor 0.14: same machine, model, calibration tokens and evaluation.

Protocol (benchmarks/oneshot_smollm2.py): SmolLM2-135M fp32 on CPU, C4 calibration 64 x 512 seed 0,
WikiText-2 test ppl at seqlen 512 over 32 evenly spaced windows. For each configuration both tools
prune a fresh copy of the model, and the pruned weights of both are evaluated by the same code
(``sw.evaluate.perplexity``) in the sparsewise environment.

llm-compressor lives in its own virtual environment made here (default ``.bench/llmc-venv``,
``--system-site-packages``; pip installs inside it whatever versions llmcompressor 0.14 pins, e.g.
transformers <= 5.17) and is never a dependency of sparsewise. Its worker gets:
  * the fp32 model saved once as a plain Hugging Face directory (its ``oneshot`` rejects the GGUF
    loader's model),
  * the exact calibration token ids sparsewise uses (a safetensors file written here), as a
    ``datasets.Dataset`` of input_ids/attention_mask, unshuffled,
  * ``ignore=["re:.*lm_head"]`` (its default Linear targets would prune the tied lm_head/embedding).
OWL in llm-compressor 0.14 fails as shipped (``sparsity_profile="owl"`` has no owl_m/owl_lmbda
defaults; given them, its statistics pass calls the calibration pipeline inside ``on_initialize``:
"Cannot invoke event before initializing"; and the ratios come back as a dict where a list is
expected). The worker therefore runs llm-compressor's own ``_infer_owl_layer_sparsity`` with its
activation statistics (same formula as its ``_get_activations``) gathered in a plain forward loop,
and passes the per-block ratios as a list with ``targets=["LlamaDecoderLayer"]``. That statistics
pass is inside the timed prune.

    python benchmarks/vs_llmcompressor.py                                  # everything
    python benchmarks/vs_llmcompressor.py --configs wanda:0.5 --tools sparsewise,llmc
    python benchmarks/vs_llmcompressor.py --configs sparsegpt:2:4,sparsegpt+owl:0.7 --tools llmc
    python benchmarks/vs_llmcompressor.py --table                          # print the table only

Results are appended to ``.bench/vs_llmcompressor.json``; configurations already measured are
skipped (``--force`` re-runs them; rows that failed are always retried).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from oneshot_smollm2 import C4, WIKI  # noqa: E402  (stdlib-only module; constants of the protocol)

LLMC_SPEC = "llmcompressor==0.14.*"
MODEL = "smollm2-135m"
DEFAULT_CONFIGS = ("wanda:0.5,wanda:0.6,wanda:0.7,wanda:4:8,wanda:2:4,"
                   "sparsegpt:0.5,sparsegpt:0.6,sparsegpt:0.7,sparsegpt:4:8,sparsegpt:2:4,"
                   "sparsegpt+owl:0.5,sparsegpt+owl:0.6,sparsegpt+owl:0.7")
IGNORE = ["re:.*lm_head"]
OWL_NOTE = ("llm-compressor OWL: its _infer_owl_layer_sparsity on activation statistics gathered in a plain "
            "forward loop (0.14's own pass fails), ratios passed as a list with targets=['LlamaDecoderLayer']")


# --------------------------------------------------------------------------- configurations
def parse_config(spec: str) -> dict:
    """'wanda:0.5' | 'sparsegpt:2:4' | 'sparsegpt+owl:0.7' | 'sparsegpt+owl+dsnot:0.7' (sparsewise only)
    | 'sparsegpt+fp64:2:4' (sparsewise only: SparseGPT computed in float64, the float-rounding reference)
    -> method, owl, dsnot, fp64, pattern, sparsity."""
    method, _, rest = spec.strip().partition(":")
    base, *extras = method.split("+")
    if base not in ("wanda", "sparsegpt") or set(extras) - {"owl", "dsnot", "fp64"} or not rest:
        raise SystemExit(f"bad config {spec!r}: expected wanda|sparsegpt[+owl][+dsnot][+fp64]:SPARSITY|N:M")
    if "fp64" in extras and base != "sparsegpt":
        raise SystemExit(f"{spec}: +fp64 is SparseGPT's float64 reference mode")
    if ":" in rest:
        n, m = (int(part) for part in rest.split(":"))
        pattern, sparsity = f"{n}:{m}", 1 - n / m
    else:
        pattern, sparsity = "unstructured", float(rest)
    if "owl" in extras and pattern != "unstructured":
        raise SystemExit(f"{spec}: OWL allocates per-layer ratios, only with unstructured sparsity")
    return {"method": method, "base": base, "owl": "owl" in extras, "dsnot": "dsnot" in extras, "fp64": "fp64" in extras,
            "pattern": pattern, "sparsity": sparsity,
            "label": f"{pattern}" if pattern != "unstructured" else f"{sparsity:.0%}"}


def row_key(tool: str, config: dict, sequential: str) -> str:
    return f"{tool}|{config['method']}|{config['pattern']}|{config['sparsity']:.4f}|{sequential}"


# --------------------------------------------------------------------------- shared helpers
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_sparsity(model) -> dict:
    """Zeros of the Linear layers inside the decoder blocks (what both tools prune), and of lm_head/embedding."""
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    return {"achieved": zeros / total, "pruned_params": total,
            "lm_head_zero_frac": float((head == 0).float().mean()),
            "embed_zero_frac": float((embed == 0).float().mean())}


def versions_here() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import sparsewise

        out["sparsewise"] = sparsewise.__version__
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------- setup (sparsewise env)
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, log) -> Path:
    """The llm-compressor venv: created and filled once (pip resolves its pins inside the venv only)."""
    py = venv_python(venv)
    if py.exists() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return py
    if not py.exists():
        log(f"creating {venv} (--system-site-packages)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    log(f"installing {LLMC_SPEC} into {venv}")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", LLMC_SPEC], check=True)
    return py


def prepare_inputs(work: Path, args, log) -> tuple[Path, Path]:
    """fp32 HF directory of the model and the calibration token ids, written once."""
    hf_dir = work / f"{MODEL}-fp32-hf"
    calib_file = work / f"calib_c4_{args.calib_n}x{args.calib_seqlen}_seed0.safetensors"
    if (hf_dir / "config.json").is_file() and calib_file.is_file():
        return hf_dir, calib_file
    from safetensors.torch import save_file

    import sparsewise as sw

    model, tok = sw.load_model(MODEL)
    if not (hf_dir / "config.json").is_file():
        log(f"saving the fp32 model as a plain HF directory: {hf_dir}")
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
    if not calib_file.is_file():
        calib = sw.data.calibration(C4, tok, n=args.calib_n, seqlen=args.calib_seqlen, seed=0, progress=False)
        save_file({"input_ids": calib.input_ids.contiguous()}, str(calib_file),
                  metadata={"source": str(C4), "seed": "0", "note": calib.note})
        log(f"calibration windows {tuple(calib.input_ids.shape)} -> {calib_file}")
    return hf_dir, calib_file


# --------------------------------------------------------------------------- workers
def sparsewise_worker(args) -> dict:
    """One sparsewise prune on the saved calibration ids, timed, then the protocol's eval."""
    import torch
    from safetensors.torch import load_file

    import sparsewise as sw

    config = parse_config(args.config)
    torch.manual_seed(0)
    model, tok = sw.load_model(MODEL)
    calib = sw.data.calibration(load_file(args.calib)["input_ids"], seed=0)
    allocation, options = (("owl", {"m": args.owl_m, "lam": args.sw_owl_lambda}) if config["owl"] else (None, None))
    cpu = time.process_time()
    result = sw.prune(model, method=config["base"], sparsity=config["sparsity"], pattern=config["pattern"],
                      calibration=calib, sequential=args.sequential, batch_size=args.batch_size, progress=False,
                      allocation=allocation, allocation_options=options,
                      refine="dsnot" if config["dsnot"] else None,
                      method_options={"precision": "float64"} if config["fp64"] else None)
    row = {"prune_wall_s": result.wall_s, "prune_cpu_s": time.process_time() - cpu,
           "sw_achieved": result.achieved_sparsity, "warnings": result.warnings,
           "allocation": result.allocation, **layer_sparsity(model), "peak_rss_mb_prune": peak_rss_mb()}
    if config["owl"]:
        row["owl"] = {"m": args.owl_m, "lam": args.sw_owl_lambda}
    row.update(evaluate(model, tok, args))
    row["versions"] = versions_here()
    return row


def evaluate(model, tok, args) -> dict:
    import sparsewise as sw

    clock = time.perf_counter()
    ppl = sw.evaluate.perplexity(model, tok, WIKI, seqlen=args.seqlen, max_windows=args.windows, progress=False)
    return {"ppl": ppl.ppl, "eval_wall_s": time.perf_counter() - clock, "windows": ppl.n_windows,
            "total_windows": ppl.total_windows}


def eval_worker(args) -> dict:
    """Evaluate llm-compressor's pruned weights with sparsewise's loader and perplexity code."""
    from safetensors.torch import load_file

    import sparsewise as sw

    model, tok = sw.load_model(MODEL)
    state = load_file(args.weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    row = layer_sparsity(model)
    row.update(evaluate(model, tok, args))
    row["peak_rss_mb_eval"] = peak_rss_mb()
    return row


def _owl_activations(model, dataloader, nsamples: int = 128) -> dict:
    """llm-compressor 0.14's SparsityModifierBase._get_activations, in a plain forward loop.

    Same statistic (per Linear input, sum over batches of the L2 norm over batch and tokens, / nsamples;
    lm_head skipped); only the calibration loop differs (its run_calibration fails inside on_initialize).
    """
    from collections import defaultdict
    from functools import partial

    import torch

    acts = defaultdict(int)

    def save_acts(_module, inputs, name):
        inp = inputs[0] if isinstance(inputs, tuple) else inputs
        acts[name] += 1.0 / nsamples * inp.pow(2).sum(dim=(0, 1)).sqrt()

    handles = [module.register_forward_pre_hook(partial(save_acts, name=name))
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and "lm_head" not in name]
    try:
        with torch.no_grad():
            for batch in dataloader:
                model(**{key: value.to(model.device) for key, value in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    return acts


def llmc_worker(args) -> dict:
    """One llm-compressor oneshot prune (run by the venv's python); saves the pruned parameters."""
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.utils import match_named_modules
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = parse_config(args.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    ids = load_file(args.calib)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier_cls = WandaPruningModifier if config["base"] == "wanda" else SparseGPTModifier
    mask_structure = config["pattern"] if config["pattern"] != "unstructured" else "0:0"
    # llm-compressor's "N:M" = prune N of every M; 2:4 and 4:8 (keep half) read the same either way
    kwargs = {"sparsity": config["sparsity"], "mask_structure": mask_structure, "ignore": IGNORE}
    row: dict = {"llmc_batch_size": args.llmc_batch_size,
                 "versions": {"python": platform.python_version(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "llmcompressor": llmcompressor.__version__,
                              "compressed_tensors": compressed_tensors.__version__}}

    start, cpu = time.perf_counter(), time.process_time()
    if config["owl"]:
        # 0.14's own OWL pass fails (see the module docstring): run its ratio formula on statistics from a
        # plain forward loop over the same calibration batches, then hand the ratios over as a list.
        from torch.utils.data import DataLoader

        batches = DataLoader(dataset.with_format("torch"), batch_size=args.llmc_batch_size, shuffle=False)
        blocks = dict(match_named_modules(model, ["LlamaDecoderLayer"]))
        probe = modifier_cls(sparsity=config["sparsity"], sparsity_profile="owl", owl_m=args.owl_m,
                             owl_lmbda=args.llmc_owl_lambda, ignore=IGNORE)
        original = SparsityModifierBase._get_activations
        SparsityModifierBase._get_activations = lambda self, model, dataloader, nsamples=128: _owl_activations(
            model, dataloader, nsamples)
        try:
            ratios = probe._infer_owl_layer_sparsity(model, blocks, batches)
        finally:
            SparsityModifierBase._get_activations = original
        kwargs["sparsity"] = [float(ratios[name]) for name in blocks]
        kwargs["targets"] = ["LlamaDecoderLayer"]
        row["owl"] = {"m": args.owl_m, "lam": args.llmc_owl_lambda, "block_sparsities": kwargs["sparsity"],
                      "stats_wall_s": time.perf_counter() - start}
    recipe = modifier_cls(**kwargs)
    row["recipe"] = repr(recipe)
    clock = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=dataset,
            num_calibration_samples=int(ids.shape[0]), max_seq_length=int(ids.shape[1]),
            shuffle_calibration_samples=False, batch_size=args.llmc_batch_size)
    end = time.perf_counter()
    row.update(prune_wall_s=end - start, prune_cpu_s=time.process_time() - cpu, oneshot_wall_s=end - clock,
               peak_rss_mb_prune=peak_rss_mb(),
               **layer_sparsity(model))
    state = {name: param.detach().contiguous() for name, param in model.named_parameters()}  # tied: listed once
    save_file(state, args.weights)
    return row


# --------------------------------------------------------------------------- driver
def run_worker(cmd: list[str], cwd: Path, log) -> tuple[dict | None, str]:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1]), ""
    tail = (out.stderr or out.stdout)[-4000:]
    log(f"worker failed (rc {out.returncode}):\n{tail[-1500:]}")
    return None, f"rc {out.returncode}: {tail}"


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": []}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def header() -> dict:
    from oneshot_smollm2 import cpu_header

    return cpu_header("")


def print_table(data: dict, keys: list[str] | None, args) -> None:
    rows = [row for row in data["rows"] if keys is None or row["key"] in keys]
    if keys is not None:
        rows.sort(key=lambda row: keys.index(row["key"]))
    head = data.get("header", {})
    llmc_versions = next((row["versions"] for row in rows if row["tool"] == "llmc" and row.get("versions")), None)
    print(f"\ndate: {head.get('date', '?')} (rows: see 'date' in the JSON)\nmachine: {head.get('machine', '?')}")
    print(f"versions (sparsewise env): {head.get('versions', '?')}")
    if llmc_versions:
        print("versions (llm-compressor venv): " + ", ".join(f"{k} {v}" for k, v in llmc_versions.items()))
    print(f"settings: SmolLM2-135M fp32 CPU; calibration: the same C4 token ids for both tools "
          f"({args.calib_n} x {args.calib_seqlen}, seed 0); eval: sparsewise perplexity for both, WikiText-2 test "
          f"seqlen {args.seqlen}, {args.windows} evenly spaced windows; llm-compressor ignore={IGNORE}, "
          f"unshuffled, sequential pipeline per decoder layer")
    print("\n| tool | method | pattern | mode | ppl | prune wall s | prune CPU s | achieved sparsity | notes |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        notes = []
        if row.get("owl"):
            notes.append(f"OWL m={row['owl']['m']} lambda={row['owl']['lam']}" + (" [a]" if row["tool"] == "llmc" else ""))
        if row.get("error"):
            notes.append("FAILED: " + row["error"].strip().splitlines()[-1][:120])
        if row.get("lm_head_zero_frac", 0) > 0.05:  # the dense (dequantized Q4_1) embedding is ~1% zeros
            notes.append(f"lm_head/embedding pruned: {row['lm_head_zero_frac']:.3f} zeros")
        ppl = f"{row['ppl']:.2f}" if row.get("ppl") is not None else "-"
        wall = f"{row['prune_wall_s']:.1f}" if row.get("prune_wall_s") is not None else "-"
        achieved = f"{row['achieved']:.4f}" if row.get("achieved") is not None else "-"
        cpu = f"{row['prune_cpu_s']:.0f}" if row.get("prune_cpu_s") is not None else "-"
        tool = "sparsewise" if row["tool"] == "sparsewise" else "llm-compressor 0.14"
        print(f"| {tool} | {row['method']} | {row['pattern_label']} | {row['mode']} | {ppl} | {wall} | {cpu} | {achieved} | "
              f"{'; '.join(notes)} |")
    if any(row.get("owl") and row["tool"] == "llmc" for row in rows):
        print(f"\n[a] {OWL_NOTE}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma list: wanda:0.5, sparsegpt:2:4, sparsegpt+owl:0.7, ... (default: the full table)")
    parser.add_argument("--tools", default="sparsewise,llmc")
    parser.add_argument("--sequential", default="block", choices=["block", "layer"],
                        help="sparsewise calibration scheme (block = llm-compressor's two-pass scheme)")
    parser.add_argument("--batch-size", type=int, default=8, help="sparsewise calibration batch (block mode)")
    parser.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor calibration batch (its default 1)")
    parser.add_argument("--owl-m", type=float, default=5)
    parser.add_argument("--sw-owl-lambda", type=float, default=0.08)
    parser.add_argument("--llmc-owl-lambda", type=float, default=0.08,
                        help="llm-compressor owl_lmbda (its tests use 0.05; 0.08 = the OWL paper and sparsewise)")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--venv", type=Path, default=REPO / ".bench" / "llmc-venv")
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "llmc-work")
    parser.add_argument("--json-out", type=Path, default=REPO / ".bench" / "vs_llmcompressor.json")
    parser.add_argument("--force", action="store_true", help="re-run configurations already in the JSON")
    parser.add_argument("--keep-weights", action="store_true", help="keep llm-compressor's pruned weights files")
    parser.add_argument("--table", action="store_true", help="only print the table of the JSON's rows")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["sparsewise", "llmc", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker = {"sparsewise": sparsewise_worker, "llmc": llmc_worker, "eval": eval_worker}[args.worker]
        print(json.dumps(worker(args)), flush=True)
        return

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    configs = [parse_config(spec) for spec in args.configs.split(",") if spec.strip()]
    tools = [tool.strip() for tool in args.tools.split(",") if tool.strip()]
    if set(tools) - {"sparsewise", "llmc"}:
        raise SystemExit(f"--tools takes sparsewise and/or llmc, got {args.tools}")
    if "llmc" in tools and any(config["dsnot"] or config["fp64"] for config in configs):
        raise SystemExit("+dsnot and +fp64 are sparsewise-only: run them with --tools sparsewise")
    modes = {"sparsewise": args.sequential, "llmc": f"sequential (batch {args.llmc_batch_size})"}
    keys = [row_key(tool, config, modes[tool]) for config in configs for tool in tools]
    data = load_results(args.json_out)
    if args.table:
        print_table(data, keys, args)
        return

    data["header"] = header()
    args.work.mkdir(parents=True, exist_ok=True)
    hf_dir, calib_file = prepare_inputs(args.work, args, log)
    py = ensure_venv(args.venv, log) if "llmc" in tools else None
    common = [f"--calib={calib_file}", f"--seqlen={args.seqlen}", f"--windows={args.windows}",
              f"--owl-m={args.owl_m}"]
    done = {row["key"] for row in data["rows"] if not row.get("error")}

    for config in configs:
        for tool in tools:
            key = row_key(tool, config, modes[tool])
            if key in done and not args.force:
                log(f"skip {key} (in {args.json_out})")
                continue
            log(f"run {key}")
            row = {"key": key, "tool": tool, "method": config["method"], "pattern": config["pattern"],
                   "sparsity": config["sparsity"], "pattern_label": config["label"], "mode": modes[tool],
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            if tool == "sparsewise":
                result, error = run_worker(
                    [sys.executable, __file__, "--worker=sparsewise", f"--config={config_spec(config)}", *common,
                     f"--sequential={args.sequential}", f"--batch-size={args.batch_size}",
                     f"--sw-owl-lambda={args.sw_owl_lambda}"], REPO, log)
            else:
                weights = args.work / f"pruned-{config['method']}-{config['pattern'].replace(':', 'of')}-{config['sparsity']:.2f}.safetensors"
                result, error = run_worker(
                    [str(py), __file__, "--worker=llmc", f"--config={config_spec(config)}", *common,
                     f"--hf-dir={hf_dir}", f"--weights={weights}", f"--llmc-batch-size={args.llmc_batch_size}",
                     f"--llmc-owl-lambda={args.llmc_owl_lambda}"], args.work, log)
                if result is not None:
                    prune_side = {k: result[k] for k in ("achieved", "lm_head_zero_frac", "embed_zero_frac")}
                    evaluated, error = run_worker(
                        [sys.executable, __file__, "--worker=eval", f"--weights={weights}", *common], REPO, log)
                    if evaluated is not None:
                        result.update(evaluated)
                        result["achieved_in_llmc_process"] = prune_side["achieved"]
                    if not args.keep_weights:
                        weights.unlink(missing_ok=True)
            if result is not None:
                row.update(result)
            if error:
                row["error"] = error
            data["rows"] = [old for old in data["rows"] if old["key"] != key] + [row]
            save_results(args.json_out, data)
            log(f"done {key}: ppl {row.get('ppl')}, prune {row.get('prune_wall_s')} s"
                + (" (FAILED)" if error else ""))
    print_table(data, keys, args)


def config_spec(config: dict) -> str:
    rest = config["pattern"] if config["pattern"] != "unstructured" else f"{config['sparsity']:g}"
    return f"{config['method']}:{rest}"


if __name__ == "__main__":
    main()
