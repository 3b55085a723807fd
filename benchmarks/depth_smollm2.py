"""Depth pruning of SmolLM2-135M (issue 19 point 2): remove 10% / 20% of the 30 blocks (3 / 6)
by ShortGPT's Block Influence and by removal loss (KL when one block alone is skipped).

Per row: WikiText-2 ppl (``sw.evaluate.perplexity``, seqlen 512, 32 windows, the one-shot table's
protocol), parameters removed, the removed blocks, and measured CPU batch-1 latency vs dense:
prefill of a 256-token prompt and one cached decode step, each the median over rounds, dense and
pruned timed in alternation (speedup = median of per-round dense/pruned ratios). Scores are
computed once per importance on the dense model; each row removes the lowest-scored blocks from
a fresh copy.

    PYTHONPATH=src python benchmarks/depth_smollm2.py [--calib-n 32] [--calib-seqlen 512]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oneshot_smollm2 import cpu_header  # noqa: E402

import sparsewise as sw  # noqa: E402
from sparsewise.structured.depth import (  # noqa: E402
    block_influence_scores,
    blocks_to_remove,
    removal_loss_scores,
    remove_blocks,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C4 = SHARED / "c4-en-train-00000-first1000" / "c4-train.00000-of-01024.first1000.jsonl"
WIKI = SHARED / "wikitext-2-raw-orig" / "wiki.test.raw"


@torch.no_grad()
def latency(dense: torch.nn.Module, pruned: torch.nn.Module, rounds: int, prompt: int = 256) -> dict:
    """Median batch-1 prefill (``prompt`` tokens) and cached decode-step latency (ms), alternating models."""
    ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    step = ids[:, -1:]
    times: dict[str, dict[str, list[float]]] = {"dense": {"prefill": [], "decode": []},
                                                "pruned": {"prefill": [], "decode": []}}

    def once(model: torch.nn.Module) -> tuple[float, float]:
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        decode = []
        for _ in range(8):
            start = time.perf_counter()
            out = model(step, past_key_values=cache, use_cache=True)
            decode.append(time.perf_counter() - start)
            cache = out.past_key_values
        return prefill, statistics.median(decode)

    for model in (dense, pruned):  # warm-up
        once(model)
    for _ in range(rounds):
        for name, model in (("dense", dense), ("pruned", pruned)):
            prefill, decode = once(model)
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
    row = {}
    for mode in ("prefill", "decode"):
        ratios = [d / p for d, p in zip(times["dense"][mode], times["pruned"][mode], strict=True)]
        row[f"{mode}_ms_dense"] = round(1e3 * statistics.median(times["dense"][mode]), 2)
        row[f"{mode}_ms"] = round(1e3 * statistics.median(times["pruned"][mode]), 2)
        row[f"{mode}_speedup"] = round(statistics.median(ratios), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-n", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--loss-n", type=int, default=8, help="calibration samples for removal loss (1 fwd/block)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--counts", default="3,6")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    header = cpu_header(f"C4 calibration {args.calib_n} x {args.calib_seqlen} (seed 0; removal loss on the first "
                        f"{args.loss_n}), WikiText-2 seqlen 512 x {args.windows} windows, latency medians of "
                        f"{args.rounds} rounds")
    print(json.dumps(header))
    model, tok = sw.load_model("smollm2-135m")
    model.eval()
    calib = sw.data.calibration(C4, tok, n=args.calib_n, seqlen=args.calib_seqlen, seed=0, progress=False)
    rows = []
    start = time.perf_counter()
    dense_ppl = sw.evaluate.perplexity(model, tok, WIKI, seqlen=512, max_windows=args.windows, progress=False).ppl
    dense_params = sum(p.numel() for p in model.parameters())
    rows.append({"config": "dense", "ppl": round(dense_ppl, 3), "params": dense_params})
    print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
    scores = {}
    start = time.perf_counter()
    scores["bi"] = block_influence_scores(model, calib, batch_size=4)
    print(f"BI scores ({time.perf_counter() - start:.0f} s):", [round(s, 4) for s in scores["bi"]], flush=True)
    start = time.perf_counter()
    loss_calib = calib.input_ids[: args.loss_n]
    losses = removal_loss_scores(model, loss_calib, batch_size=2)
    scores["removal_loss"] = losses["kl"]
    print(f"removal-loss KL ({time.perf_counter() - start:.0f} s):", [round(s, 4) for s in losses["kl"]], flush=True)
    for count in (int(c) for c in args.counts.split(",")):
        for importance in ("bi", "removal_loss"):
            pruned = copy.deepcopy(model)
            chosen = blocks_to_remove(scores[importance], count)
            info = remove_blocks(pruned, chosen)
            start = time.perf_counter()
            ppl = sw.evaluate.perplexity(pruned, tok, WIKI, seqlen=512, max_windows=args.windows, progress=False).ppl
            row = {"config": f"{importance} -{count}/30 blocks", "ppl": round(ppl, 3), "removed": chosen,
                   "params_removed": info["params_removed"],
                   "params_removed_share": round(info["params_removed"] / dense_params, 4),
                   **latency(model, pruned, args.rounds)}
            rows.append(row)
            print(json.dumps(row), f"({time.perf_counter() - start:.0f} s)", flush=True)
            del pruned
    if args.json_out:
        args.json_out.write_text(json.dumps({"header": header, "scores": scores, "ce_increase": losses["ce_increase"],
                                             "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
