"""Sparse fine-tuning of the one-shot SparseGPT 2:4 SmolLM2-135M with SquareHead distillation from
its dense original, on the C4 sample, within a wall-clock budget on one GPU.

Pipeline (the Foundation issue's protocol for every perplexity: WikiText-2 test, seqlen 512, 32
evenly spaced windows, fp32 on the GPU):
  1. load the GGUF (fp32); the dense teacher is a copy on the GPU; dense ppl;
  2. SparseGPT 2:4 on the student, C4 calibration 64 x 512, seed 0 (benchmarks/prune_smollm2_gpu.py's
     call); one-shot ppl;
  3. training windows from the same C4 jsonl but never from a document that any calibration window
     came from (found by token search), never WikiText: the kept documents are tokenized, joined
     with EOS and cut into seqlen windows, at a new random offset and order each epoch (the sample
     holds ~0.5 M tokens, so a few minutes on an H200 repeat it many times: said in the output);
  4. ``sw.training.attach(student, optimizer, method="magnitude", pattern="2:4", total_steps=T)``
     (on the pruned model magnitude 2:4 keeps exactly SparseGPT's nonzeros: checked and reported),
     ``Distiller(student, teacher, ce, squarehead, kl)`` from sparsewise.training.distill, AdamW on
     fp32 master weights, bf16 autocast forward, gradient clipping, linear warm-up then cosine (or
     constant) learning rate over the *time* budget (so the schedule ends when the budget does;
     T for attach is estimated from a timed probe of the step);
  5. ppl every ``--eval-every-min`` minutes of training and at the end after ``finalize()``; every
     trained linear is checked to be 2:4 (sparsewise.patterns.check_mask) after finalize.
Summary: dense, one-shot and fine-tuned ppl, gap closed = (oneshot - finetuned) / (oneshot - dense),
tokens seen; JSON lines on stdout, everything in $OUT/finetune_smollm2.json (rewritten at every
eval, so a run cut off by its time limit keeps what it measured).

    python benchmarks/finetune_smollm2_gpu.py --gguf PATH --wiki wiki.test.raw --c4 c4.jsonl --minutes 8
    python benchmarks/finetune_smollm2_gpu.py --cpu-smoke       # tiny random LLaMA, 3 steps, CPU
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # --deadline-s counts from here, before the slow imports

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import sparsewise as sw  # noqa: E402
import sparsewise.training  # noqa: E402, F401  (sw.training even where sparsewise's lazy table lacks it)
from sparsewise.patterns import check_mask  # noqa: E402


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------
# Training data: C4 documents that no calibration window touches
# ------------------------------------------------------------------------------------------------


def _as_bytes(ids) -> bytes:
    return np.asarray(ids, dtype=np.int32).tobytes()


def _contains(haystack: bytes, needle: bytes) -> bool:
    """Token-aligned substring search (int32 tokens: a match must start at a multiple of 4)."""
    start = haystack.find(needle)
    while start != -1:
        if start % 4 == 0:
            return True
        start = haystack.find(needle, start + 1)
    return False


def training_stream(c4_path: str, tokenizer, calibration_ids: torch.Tensor, probe: int = 32) -> tuple[torch.Tensor, dict]:
    """(1-D token stream of the kept documents joined by EOS, info). A document is dropped when it
    contains the first or the last ``probe`` tokens of any calibration window."""
    from sparsewise.data import _encode

    docs = sw.data.documents(c4_path)
    encoded = [_encode(tokenizer, doc) for doc in docs]
    doc_bytes = [_as_bytes(ids) for ids in encoded]
    heads = [_as_bytes(row[:probe].tolist()) for row in calibration_ids]
    tails = [_as_bytes(row[-probe:].tolist()) for row in calibration_ids]
    excluded, unmatched = set(), 0
    for head, tail in zip(heads, tails, strict=True):
        hits = {i for i, data in enumerate(doc_bytes) if _contains(data, head) or _contains(data, tail)}
        unmatched += not hits
        excluded |= hits
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else None
    parts = []
    for index, ids in enumerate(encoded):
        if index in excluded or not ids:
            continue
        parts.extend(ids)
        if eos is not None:
            parts.append(eos)
    stream = torch.tensor(parts, dtype=torch.long)
    # no calibration window may survive in the training stream
    stream_bytes = _as_bytes(parts)
    overlap = sum(_contains(stream_bytes, head) for head in heads)
    info = {"documents": len(docs), "documents_excluded_for_calibration": len(excluded),
            "calibration_windows_not_found": unmatched, "train_tokens": int(stream.numel()),
            "calibration_heads_found_in_train_stream": overlap,
            "total_tokens_in_sample": int(sum(len(ids) for ids in encoded))}
    return stream, info


class WindowBatches:
    """Endless batches of [batch, seqlen] windows: every epoch a new random offset and order."""

    def __init__(self, stream: torch.Tensor, seqlen: int, batch: int, device, seed: int):
        self.stream, self.seqlen, self.batch, self.device = stream, seqlen, batch, device
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.queue = 0, []
        self.per_epoch = (stream.numel() - seqlen) // seqlen // batch
        if self.per_epoch < 1:
            raise SystemExit(f"training stream of {stream.numel()} tokens is too short for one batch of "
                             f"{batch} x {seqlen}")

    def _refill(self) -> None:
        offset = int(torch.randint(self.seqlen, (1,), generator=self.generator))
        count = (self.stream.numel() - offset) // self.seqlen
        windows = self.stream[offset: offset + count * self.seqlen].view(count, self.seqlen)
        order = torch.randperm(count, generator=self.generator)
        windows = windows[order].to(self.device)
        self.queue = [windows[i: i + self.batch] for i in range(0, count - self.batch + 1, self.batch)]
        self.epoch += 1

    def __next__(self) -> dict:
        if not self.queue:
            self._refill()
        ids = self.queue.pop(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ------------------------------------------------------------------------------------------------
# CPU smoke: a tiny random LLaMA, a character tokenizer, synthetic text
# ------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Bytes as tokens (ids 2..257 folded into a 256 vocabulary); BOS 0, EOS 1."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [2 + (b % 254) for b in text.encode("utf-8")]}


def smoke_setup(root: str):
    """(model, tokenizer, wiki path, c4 path): tiny, offline, seconds on a CPU."""
    rng = random.Random(0)
    words = ["sparse", "model", "tensor", "weight", "the", "of", "and", "prune", "train", "data", "token",
             "layer", "block", "mask", "gpu", "loss", "grad", "step"]
    c4 = os.path.join(root, "c4.jsonl")
    with open(c4, "w") as handle:
        for _ in range(80):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))
            handle.write(json.dumps({"text": text}) + "\n")
    wiki = os.path.join(root, "wiki.test.raw")
    with open(wiki, "w") as handle:
        handle.write(" \n = Title = \n \n" + " ".join(rng.choice(words) for _ in range(900)) + "\n")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model, CharTokenizer(), wiki, c4


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def lr_at(args, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine to ``min_lr_ratio`` x lr by
    ``progress`` (the fraction of the time budget, or of --max-steps, already spent)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.schedule == "constant":
        return args.lr * warm
    progress = min(max(progress, 0.0), 1.0)
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="SmolLM2 GGUF (or anything sw.load_model accepts)")
    parser.add_argument("--wiki", help="WikiText-2 wiki.test.raw (evaluation only)")
    parser.add_argument("--c4", help="C4 sample .jsonl (calibration and training)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget (evaluations not counted)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="hard wall budget of the whole script from its start: training stops early "
                             "enough to leave time for the final eval and the JSON")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every-min", type=float, default=2.0)
    parser.add_argument("--method", default="magnitude", help="sparse-training method for attach (magnitude, srste, ...)")
    parser.add_argument("--ce", type=float, default=0.0, help="LM loss weight (1.0 overfit the 0.4M-token C4 sample: RESULTS)")
    parser.add_argument("--squarehead", type=float, default=1.0)
    parser.add_argument("--kl", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="teacher weights on the GPU (its forward runs under bf16 autocast either way)")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (and plan the "
                        "schedule over them) even if time is left; 0 = no limit (--cpu-smoke: default 3)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-out", default=None, help="default: $OUT/finetune_smollm2.json")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the whole pipeline on a tiny random LlamaForCausalLM on CPU, 3 steps")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", ".")
    json_out = args.json_out or os.path.join(out_dir, "finetune_smollm2.json")
    t_script = T_START
    smoke_dir = None
    if args.cpu_smoke:
        smoke_dir = tempfile.TemporaryDirectory()
        base, tok, args.wiki, args.c4 = smoke_setup(smoke_dir.name)
        args.seqlen, args.batch, args.calib_n, args.eval_windows = 64, 2, 8, 4
        if args.max_steps is None:
            args.max_steps = 3
        args.log_every, args.warmup_steps = 1, 2
        if json_out == os.path.join(out_dir, "finetune_smollm2.json"):
            json_out = os.path.join(out_dir, "finetune_smollm2_smoke.json")
        device = torch.device("cpu")
    else:
        if not (args.gguf and args.wiki and args.c4):
            parser.error("--gguf, --wiki and --c4 are required (or --cpu-smoke)")
        if not torch.cuda.is_available():
            parser.error("no CUDA device here: use --cpu-smoke")
        device = torch.device("cuda")
        base, tok = sw.load_model(args.gguf)
        base = base.float()
    if args.max_steps == 0:  # 0: no step limit (the time budget alone)
        args.max_steps = None
    torch.manual_seed(args.seed)
    base.config.use_cache = False
    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
              "model": type(base).__name__, "parameters": sum(p.numel() for p in base.parameters())}
    result: dict = {"header": header, "evals": [], "notes": []}

    def save() -> None:
        with open(json_out, "w") as handle:
            json.dump(result, handle, indent=1)

    log({"header": header})

    def ppl(model) -> tuple[float, float]:
        start = time.perf_counter()
        value = sw.evaluate.perplexity(model, tok, args.wiki, seqlen=args.seqlen if args.cpu_smoke else 512,
                                       max_windows=args.eval_windows, progress=False).ppl
        return value, time.perf_counter() - start

    # 1. dense teacher
    teacher = copy.deepcopy(base).to(device)
    teacher.requires_grad_(False)
    dense_ppl, eval_s = ppl(teacher)
    if args.teacher_dtype == "bfloat16":
        teacher.to(torch.bfloat16)
    result["dense_ppl"] = dense_ppl
    log({"stage": "dense", "ppl": dense_ppl, "eval_s": round(eval_s, 2)})

    # 2. one-shot SparseGPT 2:4 student
    calib = sw.data.calibration(args.c4, tok, n=args.calib_n, seqlen=args.seqlen, seed=0, progress=False)
    student = base
    pruned = sw.prune(student, method="sparsegpt", sparsity=None, pattern="2:4", calibration=calib,
                      device=device.type, progress=False)
    student.to(device)
    oneshot_ppl, eval_s = ppl(student)
    layers = sw.training.trained_layers(student)
    oneshot_24 = all(check_mask(layer.module.weight.detach() != 0, "2:4") for layer in layers.values())
    result.update(oneshot_ppl=oneshot_ppl, prune_wall_s=round(pruned.wall_s, 2),
                  oneshot_achieved=round(pruned.achieved_sparsity, 4), oneshot_is_24=oneshot_24)
    log({"stage": "oneshot sparsegpt 2:4", "ppl": oneshot_ppl, "prune_wall_s": round(pruned.wall_s, 2),
         "achieved": round(pruned.achieved_sparsity, 4), "all_24": oneshot_24, "eval_s": round(eval_s, 2)})
    save()

    # 3. training windows (C4 minus the calibration documents)
    stream, data_info = training_stream(args.c4, tok, calib.input_ids)
    batches = WindowBatches(stream, args.seqlen, args.batch, device, seed=args.seed)
    data_info["batches_per_epoch"] = batches.per_epoch
    result["data"] = data_info
    log({"stage": "data", **data_info})
    if data_info["calibration_heads_found_in_train_stream"]:
        result["notes"].append("WARNING: some calibration windows still occur in the training stream")

    # 4. distillation, a timed probe of the step (no update), then attach
    from sparsewise.training.distill import Distiller

    distiller = Distiller(student, teacher, ce=args.ce, squarehead=args.squarehead, kl=args.kl,
                          temperature=args.temperature)
    student.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    probe_times = []
    for i in range(4 if not args.cpu_smoke else 2):
        sync()
        start = time.perf_counter()
        with autocast:
            loss, _ = distiller.loss(next(batches))
        loss.backward()
        sync()
        if i:  # the first call pays the warm-up
            probe_times.append(time.perf_counter() - start)
        student.zero_grad(set_to_none=True)
    step_s = sum(probe_times) / len(probe_times)
    budget_s = args.minutes * 60.0
    planned = args.max_steps or max(1, int(budget_s / (step_s * 1.1)))
    result["probe_step_s"] = round(step_s, 4)
    result["planned_steps"] = planned

    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay, **fused)
    before = {name: layer.module.weight.detach().clone() for name, layer in layers.items()}
    sparsity = sw.training.attach(student, optimizer, method=args.method, pattern="2:4", total_steps=planned)
    dropped = changed = 0
    for name, item in sparsity.layers.items():
        mask = item.mask.bool()
        dropped += int(((before[name] != 0) & ~mask).sum())
        changed += int((item.parameter.detach() != before[name]).sum())
    del before
    result["attach"] = {"method": args.method, "nonzeros_dropped_by_attach_mask": dropped,
                        "weights_changed_by_attach": changed, "layers": len(sparsity.layers)}
    log({"stage": "attach", **result["attach"], "probe_step_s": round(step_s, 4), "planned_steps": planned})
    save()

    # 5. the training loop
    step, train_s, tokens = 0, 0.0, 0
    sums: dict[str, float] = {}
    count = 0
    next_eval = args.eval_every_min * 60.0
    reserve = 2.0 * eval_s + 20.0  # the final eval, finalize and the JSON
    stop_reason = "time budget"
    try:
        while True:
            if args.max_steps is not None and step >= args.max_steps:
                stop_reason = "max steps"
                break
            if train_s >= budget_s:
                break
            if args.deadline_s is not None and time.perf_counter() - t_script > args.deadline_s - reserve:
                stop_reason = "script deadline"
                break
            t0 = time.perf_counter()
            progress = train_s / budget_s
            if args.max_steps is not None:
                progress = max(progress, step / args.max_steps)
            lr = lr_at(args, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            with autocast:
                loss, parts = distiller.loss(batch)
                extra = sparsity.loss_term()
            loss = loss + extra.float()
            if not math.isfinite(parts.get("loss", 0.0)):
                stop_reason = f"non-finite loss at step {step}: {parts}"
                break
            loss.backward()
            if args.clip > 0:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sparsity.step()
            step += 1
            tokens += int(batch["input_ids"].numel())
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            train_s += time.perf_counter() - t0  # parts hold floats: each step ends synchronized
            if step % args.log_every == 0:
                log({"step": step, "minutes": round(train_s / 60, 3), "lr": lr, "epoch": batches.epoch,
                     **{k: round(v / count, 5) for k, v in sums.items()}})
                sums, count = {}, 0
            if train_s >= next_eval:
                value, eval_s = ppl(student)
                row = {"step": step, "minutes": round(train_s / 60, 3), "tokens": tokens, "ppl": value,
                       "eval_s": round(eval_s, 2)}
                result["evals"].append(row)
                log({"eval": row})
                save()
                next_eval += args.eval_every_min * 60.0
    except Exception as exc:  # noqa: BLE001 - keep and report what was measured
        stop_reason = f"error: {type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()[-3000:]
        log({"error": stop_reason})

    # finalize: hard zeros from the masks, then the last eval and the 2:4 check
    records = sparsity.finalize()
    final_ppl, eval_s = ppl(student)
    not_24 = [name for name, layer in layers.items() if not check_mask(layer.module.weight.detach() != 0, "2:4")]
    zeros = sum(int((layer.module.weight == 0).sum()) for layer in layers.values())
    total = sum(layer.module.weight.numel() for layer in layers.values())
    gap = oneshot_ppl - dense_ppl
    summary = {"dense_ppl": round(dense_ppl, 4), "oneshot_24_ppl": round(oneshot_ppl, 4),
               "finetuned_24_ppl": round(final_ppl, 4),
               "gap_closed": round((oneshot_ppl - final_ppl) / gap, 4) if gap > 0 else None,
               "goal_gap_closed": 0.5, "steps": step, "planned_steps": planned, "tokens_seen": tokens,
               "epochs_of_train_stream": round(tokens / max(1, data_info["train_tokens"]), 2),
               "train_minutes": round(train_s / 60, 3), "train_tokens_per_s": round(tokens / max(train_s, 1e-9)),
               "stop": stop_reason, "method": args.method,
               "loss_weights": {"ce": args.ce, "squarehead": args.squarehead, "kl": args.kl},
               "all_layers_24_after_finalize": not not_24, "layers_not_24": not_24[:5],
               "trained_layer_sparsity": round(zeros / total, 4), "records": len(records),
               "wall_s": round(time.perf_counter() - t_script, 1)}
    summary["goal_met"] = bool(summary["gap_closed"] is not None and summary["gap_closed"] >= 0.5
                               and summary["all_layers_24_after_finalize"])
    result["evals"].append({"step": step, "minutes": round(train_s / 60, 3), "tokens": tokens, "ppl": final_ppl,
                            "final": True})
    result["summary"] = summary
    save()
    log({"summary": summary})
    if smoke_dir is not None:
        smoke_dir.cleanup()
    return 0 if not not_24 and not stop_reason.startswith(("error", "non-finite")) else 1


if __name__ == "__main__":
    sys.exit(main())
