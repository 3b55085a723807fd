"""Activation sparsity quality on real models, by the project's evaluation protocol.

SmolLM2-135M (fp32, CPU): WikiText-2 test perplexity (seqlen 512, 32 evenly spaced windows) at
25/40/50/65% activation sparsity for every method, uniform and (for the input-site methods)
TEAL's greedy allocation; thresholds calibrated on the C4 sample (never the eval text); the
measured sparsity (exact zeros at the sites, parameter-weighted) is reported beside the nominal.
MiniLM-L6 (real encoder): cosine of mean-pooled sentence embeddings to the dense model's on
WikiText-2 test sentences, calibration on C4 sentences.

    python benchmarks/activation_quality.py                       # everything -> JSON + markdown
    python benchmarks/activation_quality.py --only wina:greedy    # one (method, allocation) row group
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPARSEWISE_SHARED_DATA", REPO.parent / "shared" / "data"))
C4 = DATA / "c4-en-train-00000-first1000" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = DATA / "wikitext-2-raw-orig" / "wiki.test.raw"
METHODS = ["teal", "wina", "cats", "chess", "r-sparse", "topk"]
GREEDY = ["teal", "wina"]  # one site per block for cats/chess: greedy == uniform there


def smollm2_rows(method: str, allocation: str, args) -> list[dict]:
    import torch

    import sparsewise as sw

    torch.manual_seed(0)
    model, tok = sw.load_model("smollm2-135m")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if method == "dense":
        ppl = sw.evaluate.perplexity(model, tok, WIKI, seqlen=args.seqlen, max_windows=args.windows, progress=False)
        return [{"model": "smollm2", "method": "dense", "ppl": ppl.ppl}]
    calib = sw.data.calibration(C4, tok, n=args.calib_n, seqlen=args.calib_seqlen, seed=0)
    clock = time.perf_counter()
    handle = sw.sparsify_activations(model, method, sparsities[0], calib, allocation=allocation, seed=0,
                                     batch_size=args.batch_size, greedy_step=args.greedy_step,
                                     greedy_limit=max(sparsities) + args.greedy_step, greedy_calls=1)
    calibrate_s = time.perf_counter() - clock
    rows = []
    for sparsity in sparsities:
        handle.set_sparsity(sparsity)
        clock = time.perf_counter()
        with handle.counting() as measured:
            ppl = sw.evaluate.perplexity(model, tok, WIKI, seqlen=args.seqlen, max_windows=args.windows,
                                         progress=False)
        rows.append({"model": "smollm2", "method": method, "allocation": allocation, "sparsity": sparsity,
                     "ppl": ppl.ppl, "measured_sparsity": handle.weighted(measured),
                     "measured_min": min(measured.values()), "measured_max": max(measured.values()),
                     "calibrate_s": calibrate_s, "eval_s": time.perf_counter() - clock})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def pplp_rows(args) -> list[dict]:
    """Sparsing Law's PPL-p% sparsity of SmolLM2's FFNs (p = 1 and 5), thresholds from C4."""
    import sparsewise as sw
    from sparsewise.activation import ppl_p_sparsity

    model, tok = sw.load_model("smollm2-135m")
    calib = sw.data.calibration(C4, tok, n=8, seqlen=args.calib_seqlen, seed=0)
    rows = []
    for p in (1.0, 5.0):
        result = ppl_p_sparsity(
            model, lambda m: sw.evaluate.perplexity(m, tok, WIKI, seqlen=args.seqlen, max_windows=args.windows,
                                                     progress=False).ppl,
            list(calib.batches(4)), p=p, steps=8)
        rows.append({"model": "smollm2", "method": f"ppl-{p:g}%", "dense_ppl": result.dense_ppl, "ppl": result.ppl,
                     "cett": result.cett, "sparsity": result.sparsity, "activation_ratio": result.activation_ratio,
                     "steps": result.steps})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def minilm_rows(args) -> list[dict]:
    import torch

    import sparsewise as sw
    from sparsewise.data import documents, read_text

    model, tok = sw.load_model("minilm-l6")
    sentences = [line.strip() for line in read_text(WIKI).split("\n") if len(line.split()) >= 8][: args.sentences]
    calib_texts = [doc[:600] for doc in documents(C4)[:64]]

    def encode(texts):
        batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}

    def embed(texts):
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 32):
                batch = encode(texts[start:start + 32])
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    dense = embed(sentences)
    calibration = [encode(calib_texts[i:i + 16]) for i in range(0, len(calib_texts), 16)]
    rows = []
    for method in ("teal", "wina", "cats", "chess", "topk"):
        handle = sw.sparsify_activations(model, method, 0.25, None if method == "topk" else calibration, seed=0)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            handle.set_sparsity(sparsity)
            with handle.counting() as measured:
                cosine = (embed(sentences) * dense).sum(-1)
            rows.append({"model": "minilm", "method": method, "sparsity": sparsity,
                         "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                         "measured_sparsity": handle.weighted(measured)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        sw.remove_activation_sparsity(model)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="method:allocation (e.g. wina:greedy), dense:-, or minilm")
    parser.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1, help="calibration sequences per block call; the "
                        "greedy allocation scores moves on the first call (TEAL uses a few sequences too)")
    parser.add_argument("--greedy-step", type=float, default=0.1)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--jobs", help="comma-separated subset of the jobs (method:allocation, dense:-, minilm)")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --json-out")
    parser.add_argument("--json-out", type=Path, default=REPO / ".bench" / "activation_quality.json")
    args = parser.parse_args()
    passthrough = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                   if key not in ("only", "json_out", "jobs", "append")]
    if args.only:
        if args.only in ("minilm", "pplp"):
            rows = minilm_rows(args) if args.only == "minilm" else pplp_rows(args)
        else:
            rows = smollm2_rows(*args.only.split(":"), args)
        print(json.dumps(rows), flush=True)
        return

    from oneshot_smollm2 import cpu_header

    header = cpu_header(
        f"SmolLM2-135M fp32 CPU; calibration C4 {args.calib_n} x {args.calib_seqlen} seed 0 ({args.batch_size} per "
        f"block call; greedy step {args.greedy_step} on the first call); eval WikiText-2 test seqlen {args.seqlen}, "
        f"{args.windows} windows; MiniLM: {args.sentences} WikiText-2 test lines, 64 C4 docs")
    every = ["dense:-"] + [f"{m}:uniform" for m in METHODS] + [f"{m}:greedy" for m in GREEDY] + ["minilm", "pplp"]
    jobs = args.jobs.split(",") if args.jobs else every
    rows = json.loads(args.json_out.read_text())["rows"] if args.append and args.json_out.exists() else []
    for job in jobs:
        out = subprocess.run([sys.executable, __file__, "--only", job, *passthrough], stdout=subprocess.PIPE,
                             text=True, check=False)  # its progress lines go straight to our stderr
        if out.returncode:
            raise SystemExit(f"run {job} failed")
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
        print(f"{job} done", file=sys.stderr, flush=True)
    print("\n".join(f"{key}: {value}" for key, value in header.items()) + "\n")
    dense = next((row["ppl"] for row in rows if row["method"] == "dense"), float("nan"))
    print(f"SmolLM2 WikiText-2 ppl (dense {dense:.2f}); cell = ppl (measured sparsity)\n")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print("| method | allocation | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("| --- | --- |" + " ---: |" * len(sparsities))
    for job in every[1:-2]:
        method, allocation = job.split(":")
        cells = {row["sparsity"]: row for row in rows if row.get("model") == "smollm2" and row["method"] == method
                 and row.get("allocation") == allocation}
        print(f"| {method} | {allocation} | " + " | ".join(
            f"{cells[s]['ppl']:.2f} ({cells[s]['measured_sparsity']:.2f})" if s in cells else "-"
            for s in sparsities) + " |")
    print("\nMiniLM-L6 embedding cosine to dense (mean / min); measured sparsity\n")
    print("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("| --- |" + " ---: |" * len(sparsities))
    for method in ("teal", "wina", "cats", "chess", "topk"):
        cells = {row["sparsity"]: row for row in rows if row.get("model") == "minilm" and row["method"] == method}
        print(f"| {method} | " + " | ".join(
            f"{cells[s]['cosine_mean']:.4f} / {cells[s]['cosine_min']:.3f} ({cells[s]['measured_sparsity']:.2f})"
            if s in cells else "-" for s in sparsities) + " |")


if __name__ == "__main__":
    main()
