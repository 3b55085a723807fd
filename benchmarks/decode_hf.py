"""Real decode loop of a Hugging Face LLaMA-3-8B, dense vs the sparse runtime (issue 16, point 3).

Supersedes the decode part of ``runtime_e2e.py`` (a hand-written decoder, one graph-replayed step):
here the model is transformers' own ``LlamaForCausalLM`` (LLaMA-3-8B config written below,
random fp16 weights made on the GPU: speed does not depend on the values), and what is timed is a
whole greedy generation: a ``StaticCache`` of prompt + new tokens, the prompt prefilled once
(eager), then the single-token decode step captured in one CUDA graph (static inputs: token ids
[B, 1] and position ids [1, 1]; the argmax token, its position and the cache length are advanced
inside the graph) and replayed once per token. The loop of ``--new`` replays is timed with CUDA
events after one untimed loop, ``--repeats`` times, median; tokens/s = batch * new / time.

Modes (every block linear q/k/v/o/gate/up/down pruned by weight magnitude with sparsewise's own
masks; embeddings and lm_head stay dense):
  dense           the baseline: plain nn.Linear through cuBLAS (cuBLAS time does not depend on
                  the values, so this is also "the same pruned weights through cuBLAS");
  2:4             2:4 weights, ``runtime.accelerate(model, rows=(batch,))``: SparseLinear where
                  the runtime measures it faster than cuBLAS at that batch, dense elsewhere (its
                  per-shape table is printed); one model per batch (``--serve together``: one
                  model accelerated for all batches at once);
  unstructured50  50% per row, the same;
  act50           dense weights, TEAL activation sparsity at 50% (thresholds calibrated on random
                  tokens, measured zeros printed), ``runtime.accelerate_activations``;
  2:4+act50       2:4 weights, then TEAL 50%: ``accelerate_activations`` (its "auto" layout holds a
                  pruned W^T as bit planes: only surviving weights of kept inputs are read).
Fused (``--fuse``, off by default; the same for every mode, so ratios compare like with like):
each (model, batch)'s decode forward goes through ``torch.compile(mode="default", dynamic=False,
fullgraph=False)`` (Inductor: RMSNorm, rotary, residual adds, the attention glue and the cache
writes become a few fused kernels; the sparse linears stay opaque ``sparsewise::`` custom ops;
in mode "default" the dense matmuls stay cuBLAS), compiled by one untimed call (seconds printed,
with Dynamo's graph and graph-break counts), then captured in our own CUDA graph as above. A
failed compile or a failed capture of the compiled step falls back to the uncompiled step, said.
``build_model`` is the one place that knows how a mode is built: adapt it when the runtime's API
(e.g. for combining weight and activation sparsity) changes.
Correctness, batch 1: the accelerated model's first ``--check`` greedy tokens against the same
function through PyTorch/cuBLAS (pruned nn.Linear, TEAL hooks for act modes), and the logits of
the first decode step from the same token (max |diff| / max |ref|, and relative L2). Reported,
not asserted: fp16 noise can flip a late greedy token. Beside it, the reference's own
sensitivity: how much its first-step logits move when the first block's input gets relative
noise of fp16 size (``--noise``); an error of that order is rounding amplified by the network
(thresholded activations are discontinuous: an input that crosses its threshold moves the
output by t * ||W[:, j]||, and a random deep network amplifies it), not a wrong kernel.

    python benchmarks/decode_hf.py [--modes dense,2:4,unstructured50,2:4+act50,act50] [--batches 1,8]
    python benchmarks/decode_hf.py --tiny        # same code, tiny config, runs on a CPU (no graphs)
    python benchmarks/decode_hf.py --fuse        # every mode's step compiled by Inductor, then captured
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from collections import Counter

import torch
from torch import nn

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "tie_word_embeddings": False}
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)
# mode -> (weight pattern or None, activation sparsity)
MODES = {"dense": (None, 0.0), "2:4": ("2:4", 0.0), "unstructured50": ("unstructured", 0.0),
         "2:4+act50": ("2:4", 0.5), "act50": (None, 0.5)}
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- model ------------------------------------------------------------------------------------------
def make_llama(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM with random weights made where it runs (no CPU copy), the same every call."""
    import transformers as tf

    fields = {key: value for key, value in cfg.items() if key != "rope_theta"}
    config = tf.LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
                            attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # transformers' init already draws N(0, 0.02); drawn again here so every mode gets the same weights
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
    return model


def block_linears(model: nn.Module):
    for block in model.model.layers:
        for name in BLOCK_LINEARS:
            parent = block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            yield getattr(parent, name)


def prune_blocks(model: nn.Module, pattern: str) -> None:
    """Magnitude masks (sparsewise.patterns) applied in place, one layer at a time on its device."""
    from sparsewise.patterns import nm_mask, unstructured_mask

    for linear in block_linears(model):
        score = linear.weight.abs().float()
        mask = nm_mask(score, 2, 4) if pattern == "2:4" else unstructured_mask(score, 0.5)
        linear.weight.mul_(mask.to(linear.weight.dtype))
        del score, mask


def attach_teal(model: nn.Module, sparsity: float, args, info: dict):
    """TEAL at ``sparsity`` on every block linear input, thresholds from random-token calibration;
    the zeros it produces are measured on other random tokens (the hooks count them)."""
    import sparsewise as sw

    vocab, device = model.config.vocab_size, model.lm_head.weight.device
    generator = torch.Generator().manual_seed(7)
    calibration = torch.randint(0, vocab, (args.calib_seqs, args.calib_len), generator=generator).to(device)
    held_out = torch.randint(0, vocab, (2, args.calib_len), generator=generator).to(device)
    handle = sw.sparsify_activations(model, "teal", sparsity, calibration, batch_size=args.calib_seqs)
    measured = handle.measure([{"input_ids": held_out}])
    info["act_sparsity_nominal"] = handle.weighted(handle.site_sparsity())
    info["act_sparsity_measured"] = handle.weighted(measured)
    info["act_sparsity_measured_range"] = [min(measured.values()), max(measured.values())]
    print("  " + handle.summary(measured).replace("\n", "\n  "), flush=True)
    return handle


def build_model(mode: str, cfg: dict, args, rows: tuple[int, ...] = (1,), reference=None) -> tuple[nn.Module, dict]:
    """The model that ``mode`` times, built in one place so the runtime API can change under it.

    Random LLaMA (same weights in every mode) -> magnitude-pruned block linears -> TEAL hooks (act
    modes) -> ``reference(model)``: the same function through PyTorch/cuBLAS, before any swap ->
    the runtime's swap, for the row counts ``rows`` (= batch sizes: one token per sequence and
    step) it will serve. Returns (model, info with timings and the runtime's reports).
    """
    from sparsewise import runtime

    pattern, act = MODES[mode]
    info: dict = {}
    clock = time.perf_counter()
    model = make_llama(cfg, args.device, args.dtype, seed=0)
    sync()
    info["init_s"] = time.perf_counter() - clock
    if pattern:
        clock = time.perf_counter()
        prune_blocks(model, pattern)
        sync()
        info["prune_s"] = time.perf_counter() - clock
    if act:
        clock = time.perf_counter()
        attach_teal(model, act, args, info)
        info["calibrate_s"] = time.perf_counter() - clock
    if reference is not None:
        reference(model)
    clock = time.perf_counter()
    if act:
        options = {"weight_layout": args.act_layout} if args.act_layout else {}
        how = runtime.accelerate_activations(model, **options)
        layouts = Counter(getattr(module, "extra_repr", str)().rpartition("weight=")[2] for module in model.modules()
                          if isinstance(module, runtime.ActivationSparseLinear))
        info["activation_linears"] = dict(Counter(how.values()))
        info["sparse_linears"] = len(how)
        info["accelerate"] = (f"accelerate_activations({', '.join(f'{k}={v!r}' for k, v in options.items())}): "
                              f"{len(how)} linears, {dict(Counter(how.values()))}, W^T layouts {dict(layouts)}")
    elif pattern:
        report = runtime.accelerate(model, rows=rows, prefill=args.prefill_copy)
        info["accelerate"] = f"accelerate(rows={rows}): {report.summary()}"
        info["sparse_linears"] = len(report.swapped)
        info["kept_dense"] = sum(1 for name in report.skipped if ".layers." in name)  # lm_head not counted
    else:
        return model, info  # dense: nothing to swap
    sync()
    info["accelerate_s"] = time.perf_counter() - clock
    print("  " + info["accelerate"].replace("\n", "\n    ") + f"\n  ({info['accelerate_s']:.1f} s)", flush=True)
    gc.collect()
    empty_cache()
    return model, info


def block_linear_bytes(model: nn.Module) -> int:
    """Bytes the block linears hold for their weights (all copies: cuSPARSELt's prefill copy too)."""
    from sparsewise.runtime import ActivationSparseLinear, SparseLinear
    from sparsewise.runtime.cpu_linear import CpuSparseLinear  # what accelerate() swaps in on the CPU

    total = 0
    for block in model.model.layers:
        for module in block.modules():
            if isinstance(module, (SparseLinear, ActivationSparseLinear, CpuSparseLinear)):
                total += module.weight_nbytes
            elif isinstance(module, nn.Linear):
                total += module.weight.numel() * module.weight.element_size()
    return total


# -- decode -----------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_counts() -> dict:
    """Dynamo's running totals: graphs compiled, graph breaks (and their reasons)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
            "reasons": Counter(counters["graph_break"])}


def set_cache_length(cache, length: int) -> None:
    """Rewind/advance every StaticCache layer to ``length`` tokens, in place (the captured graph
    holds these tensors' addresses). Stale entries beyond are masked, then overwritten."""
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if not isinstance(counter, torch.Tensor):
            raise RuntimeError(f"this transformers version's {type(layer).__name__} keeps no cumulative_length "
                               "tensor: adapt set_cache_length")
        counter.fill_(length)


class GreedyDecoder:
    """Greedy generation of one model at one batch size, after an eager prefill of ``prompt`` [B, P].

    ``graph``: "capture" (the step in one CUDA graph, own capture), "compile"
    (torch.compile(mode="reduce-overhead") on the forward), or "eager". Token i of the output
    (``out[:, i]``) is the prefill's argmax for i = 0, then one per step.

    ``fuse`` (an Inductor mode, e.g. "default"; None: off; ignored by "compile", which is Inductor
    already): the per-step forward goes through ``torch.compile(mode=fuse, dynamic=False,
    fullgraph=False)`` so norms, rotary, residual adds and the attention glue become fused Triton
    (C++ on the CPU) kernels, while the sparse linears stay opaque custom ops; compiled by one
    untimed call here (``compile_s``), outside any capture, then captured like the eager step. The
    argmax/advance stays eager (a handful of tiny kernels, inside the same CUDA graph). A failed
    compile falls back to the uncompiled forward (``fuse_error`` says why).
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new: int, graph: str, fuse: str | None = None):
        from transformers import StaticCache

        self.model, self.graph_mode = model, graph
        self.batch, self.prompt_len = prompt.shape
        device = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_len + new)
        # transformers >= 5.2x calls it ``cache`` (``past_key_values`` deprecated); 5.17 ``past_key_values``
        self.cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tok = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.out = torch.zeros(self.batch, new + 1, dtype=torch.long, device=device)
        positions = torch.arange(self.prompt_len, device=device)[None]
        clock = time.perf_counter()
        logits = model(input_ids=prompt, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{self.cache_key: self.cache}).logits[:, -1]
        self.prefill_logits = logits.float()
        self.first = logits.argmax(-1)
        sync()
        self.prefill_s = time.perf_counter() - clock
        self.graph = self.logits = self.compiled = None
        self.forward = self._forward
        self.fuse = fuse if graph != "compile" else None
        self.fuse_error: str | None = None
        self.fuse_stats: dict = {}
        if self.fuse:
            self._fuse()
        clock = time.perf_counter()
        if graph == "capture":
            self._capture()
        elif graph == "compile":
            self.compiled = torch.compile(self._forward, mode="reduce-overhead", dynamic=False)
        self.reset()
        sync()
        self.capture_s = time.perf_counter() - clock

    def recompiles(self) -> int:
        """Graphs compiled after the first call (warm-ups, capture, eager steps so far): a guard failing
        per step would recompile (and, past the recompile limit, run uncompiled); none expected
        (static shapes; the cache length and the position are tensors, not Python ints)."""
        return compile_counts()["graphs"] - self.fuse_stats["after_first_call"] if self.fuse_stats else 0

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.tok, position_ids=self.pos, use_cache=True,
                          **{self.cache_key: self.cache}).logits[:, -1]

    def _fuse(self) -> None:
        """Compile the per-step forward (one call from the post-prefill state, cache rewound after)."""
        # a clean slate per (model, batch): this model's graphs only (counted below), and no cached
        # code keeping an earlier model alive; shapes are static, so one graph per (model, batch)
        torch._dynamo.reset()
        before = compile_counts()
        compiled = torch.compile(self._forward, mode=self.fuse, dynamic=False, fullgraph=False)
        clock = time.perf_counter()
        try:
            self.reset()
            compiled()
            sync()
        except Exception as error:  # noqa: BLE001 - fall back to the uncompiled step, and say so
            first_line = (str(error).strip().splitlines() or [""])[0]
            self.fuse_error = f"{type(error).__name__}: {first_line[:300]}"
            print(f"  torch.compile(mode={self.fuse!r}) of the decode step failed ({self.fuse_error}); "
                  "the uncompiled step is used", flush=True)
            traceback.print_exc()
            torch._dynamo.reset()
            self.reset()
            return
        after = compile_counts()
        self.forward = compiled
        reasons = after["reasons"] - before["reasons"]
        self.fuse_stats = {"compile_s": time.perf_counter() - clock, "graphs": after["graphs"] - before["graphs"],
                           "graph_breaks": after["breaks"] - before["breaks"],
                           "break_reasons": [reason for reason, _ in reasons.most_common(3)],
                           "after_first_call": after["graphs"]}
        self.reset()

    def _advance(self, logits: torch.Tensor) -> None:
        token = logits.argmax(-1)
        self.out.index_copy_(1, self.pos.view(1) - (self.prompt_len - 1), token[:, None])
        self.tok.copy_(token[:, None])
        self.pos.add_(1)

    def _step(self) -> torch.Tensor:
        logits = self.forward()
        self._advance(logits)
        return logits

    def _capture(self) -> None:
        # warm-up on a side stream (Triton compiles, cuSPARSELt plans, dispatch choices), every
        # call from the same state so nothing is written past the cache; then capture one step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.reset()
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.reset()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    def reset(self, start: torch.Tensor | None = None) -> None:
        """Back to the state right after the prefill (first token ``start``, default the prefill's)."""
        start = self.first if start is None else start
        self.tok.copy_(start.view(-1, 1))
        self.pos.fill_(self.prompt_len)
        self.out.zero_()
        self.out[:, 0] = start.view(-1)
        set_cache_length(self.cache, self.prompt_len)

    def step(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if self.compiled is not None:
            logits = self.compiled()
            self._advance(logits)
            return logits
        return self._step()

    def run(self, steps: int) -> None:
        self.reset()
        for _ in range(steps):
            self.step()

    def time_loop(self, steps: int, repeats: int) -> list[float]:
        """Milliseconds of ``steps`` decode steps, ``repeats`` times, after one untimed loop."""
        self.run(steps)
        times = []
        for _ in range(repeats):
            self.reset()
            if self.tok.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    self.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                clock = time.perf_counter()
                for _ in range(steps):
                    self.step()
                times.append((time.perf_counter() - clock) * 1e3)
        return times

    def close(self) -> None:
        self.graph = self.logits = self.compiled = self.cache = None
        if self.fuse_stats:
            self.forward = None
            torch._dynamo.reset()  # Dynamo's caches would keep this model alive


def make_decoder(model, prompt, new, graph: str, notes: list[str], fuse: str | None = None) -> GreedyDecoder:
    """Own CUDA-graph capture (of the compiled step with ``fuse``); if the fused capture fails, the
    unfused one; if that fails, torch.compile(mode="reduce-overhead"); each fallback said in the output."""
    attempts = [(graph, fuse)]
    if fuse and graph == "capture":
        attempts.append(("capture", None))
    if graph == "capture":
        attempts.append(("compile", None))
    for index, (how, fused) in enumerate(attempts):
        try:
            decoder = GreedyDecoder(model, prompt, new, how, fuse=fused)
        except Exception as error:  # noqa: BLE001 - fall back, and say so
            if index == len(attempts) - 1:
                raise
            following = attempts[index + 1][0]
            what = "own CUDA-graph capture" + (f" of the Inductor-compiled step (mode={fused!r})" if fused else "")
            then = ("the uncompiled step captured" if following == "capture" else
                    "torch.compile(reduce-overhead) used")
            note = f"{what} failed ({type(error).__name__}: {error}); {then}"
            print("  " + note, flush=True)
            traceback.print_exc()
            notes.append(note)
            torch._dynamo.reset()
            gc.collect()
            empty_cache()
            continue
        if decoder.fuse_error:
            notes.append(f"torch.compile(mode={fuse!r}) failed ({decoder.fuse_error}): uncompiled step used")
        return decoder
    raise AssertionError("unreachable")


def logit_errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float(), ref.float()
    return {"max_abs_rel": ((got - ref).abs().max() / ref.abs().max()).item(),
            "l2_rel": ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()}


def reference_run(model, prompt1: torch.Tensor, check: int, noise: float) -> dict:
    """Batch 1, eager: the first ``check`` greedy tokens and the first decode step's logits; then
    that step again with relative noise ``noise`` on the first block's input (the sensitivity)."""
    decoder = GreedyDecoder(model, prompt1, check, "eager")
    decoder.reset()
    first_step = decoder.step().float().clone()
    for _ in range(check - 1):
        decoder.step()
    result = {"tokens": decoder.out[0, :check].tolist(), "first": decoder.first.clone(),
              "first_step_logits": first_step, "prefill_logits": decoder.prefill_logits.clone()}
    generator = torch.Generator(device=prompt1.device).manual_seed(3)

    def perturb(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        noisy = hidden * (1 + noise * torch.randn(hidden.shape, generator=generator, device=hidden.device,
                                                  dtype=torch.float32)).to(hidden.dtype)
        return ((noisy, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=noisy))

    handle = model.model.layers[0].register_forward_pre_hook(perturb, with_kwargs=True)
    try:
        decoder.reset()
        result["noise_sensitivity"] = logit_errors(decoder.step(), first_step)
    finally:
        handle.remove()
    decoder.close()
    return result


# -- one mode ---------------------------------------------------------------------------------------
def run_mode(mode: str, cfg: dict, args, prompts: torch.Tensor, dense_tok_s: dict, notes: list[str]) -> list[dict]:
    print(f"== {mode}", flush=True)
    refs: dict = {}
    check = min(args.check, args.new + 1)

    def reference(model):
        clock = time.perf_counter()
        refs.update(reference_run(model, prompts[:1], check, args.noise))
        print(f"  reference (PyTorch/cuBLAS, eager): {check} greedy tokens in {time.perf_counter() - clock:.1f} s; "
              f"its first-step logits move by {refs['noise_sensitivity']['max_abs_rel']:.1e} (max) under "
              f"{args.noise:g} relative noise on the first block's input", flush=True)

    pattern, act = MODES[mode]
    # accelerate() decides per layer at the row counts it is told: one model per batch, or one for all
    groups = [[b] for b in args.batches] if pattern and not act and args.serve == "per-batch" else [args.batches]
    rows = []
    for group in groups:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        wants_reference = mode != "dense" and not refs and 1 in args.batches
        model, info = build_model(mode, cfg, args, rows=tuple(group), reference=reference if wants_reference else None)
        weight_bytes = block_linear_bytes(model)
        for batch in group:
            rows.append(dict(measure(model, mode, batch, args, prompts, refs, check, dense_tok_s, notes),
                             block_weight_mib=weight_bytes / 2**20, **info))
        if torch.cuda.is_available():
            rows[-1]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del model
        gc.collect()
        empty_cache()
    refs.clear()
    return rows


def measure(model, mode: str, batch: int, args, prompts, refs: dict, check: int, dense_tok_s: dict,
            notes: list[str]) -> dict:
    """One (model, batch): greedy decode loops timed, batch 1 checked against the reference."""
    decoder = make_decoder(model, prompts[:batch], args.new, args.graph, notes, fuse=args.fuse)
    row = {"mode": mode, "batch": batch, "graph": "capture" if decoder.graph is not None else
           ("compile" if decoder.compiled is not None else "eager"), "prefill_s": decoder.prefill_s,
           "capture_s": decoder.capture_s,
           "fused": bool(decoder.fuse_stats) or decoder.compiled is not None}
    if decoder.fuse_stats:
        row.update({f"fuse_{key}": value for key, value in decoder.fuse_stats.items() if key != "after_first_call"})
    if args.fuse and not row["fused"]:
        notes.append(f"{mode} batch {batch} runs unfused while --fuse is on: its ratio compares unlike steps")
    if batch == 1 and refs:
        decoder.reset(start=refs["first"])  # the reference's first token: same input, comparable logits
        row["first_step_logits"] = logit_errors(decoder.step(), refs["first_step_logits"])
        row["prefill_logits"] = logit_errors(decoder.prefill_logits, refs["prefill_logits"])
        row["ref_noise_sensitivity"] = refs["noise_sensitivity"]
    times = decoder.time_loop(args.new, args.repeats)
    if decoder.fuse_stats:
        row["fuse_recompiles"] = decoder.recompiles()
        if row["fuse_recompiles"]:
            notes.append(f"{mode} batch {batch}: the compiled step recompiled {row['fuse_recompiles']} time(s) after "
                         "its first call (a guard failing per step?)")
    median = statistics.median(times)
    row.update(loop_ms=times, median_ms=median, ms_per_token=median / args.new,
               tok_s=batch * args.new * 1e3 / median)
    if mode == "dense":
        dense_tok_s[batch] = row["tok_s"]
    row["ratio_vs_dense"] = row["tok_s"] / dense_tok_s[batch] if batch in dense_tok_s else float("nan")
    if batch == 1:
        tokens = decoder.out[0, :check].tolist()
        if refs:
            same = [a == b for a, b in zip(tokens, refs["tokens"], strict=True)]
            prefix = next((i for i, ok in enumerate(same) if not ok), len(same))
            row.update(tokens_match=sum(same) / len(same), tokens_match_prefix=prefix, tokens=tokens,
                       ref_tokens=refs["tokens"])
        else:
            row.update(tokens_match=1.0, tokens_match_prefix=check, tokens=tokens)
    decoder.close()
    del decoder
    gc.collect()
    checked = ""
    if "first_step_logits" in row:
        checked = (f", tokens match {row['tokens_match']:.2f} (first {row['tokens_match_prefix']}/{check} "
                   f"identical), first-step logits max err {row['first_step_logits']['max_abs_rel']:.1e} "
                   f"(reference's noise sensitivity {row['ref_noise_sensitivity']['max_abs_rel']:.1e})")
    fused = ""
    if "fuse_compile_s" in row:
        fused = (f" + Inductor ({args.fuse}: compile {row['fuse_compile_s']:.1f} s, {row['fuse_graphs']} graph(s), "
                 f"{row['fuse_graph_breaks']} break(s), {row['fuse_recompiles']} recompile(s))")
    elif args.fuse and row["graph"] != "compile":
        fused = " UNFUSED (compile failed)"
    print(f"  batch {batch}: {row['tok_s']:.1f} tok/s ({row['ms_per_token']:.2f} ms/token, loops "
          f"{', '.join(f'{t:.0f}' for t in times)} ms, {row['graph']}{fused}; prefill {row['prefill_s']:.1f} s, "
          f"capture {row['capture_s']:.1f} s), ratio vs dense {row['ratio_vs_dense']:.3f}{checked}", flush=True)
    for reason in row.get("fuse_break_reasons", []):
        print(f"    graph break: {reason[:300]}", flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    header = ("mode", "batch", "step", "tok/s", "ratio vs dense", "sparse linears", "block-linear weights MiB",
              "tokens match (b1)", "first-step logit err (ref. noise sensitivity)")
    lines = [header]
    for row in rows:
        match = f"{row['tokens_match']:.2f} ({row['tokens_match_prefix']} first)" if "tokens_match" in row else ""
        if row["mode"] == "dense" and "tokens_match" in row:
            match = "reference"
        error = (f"{row['first_step_logits']['max_abs_rel']:.1e} ({row['ref_noise_sensitivity']['max_abs_rel']:.1e})"
                 if "first_step_logits" in row else "")
        total = row.get("sparse_linears", 0) + row.get("kept_dense", 0)
        swapped = f"{row['sparse_linears']}/{total}" if "sparse_linears" in row else "-"
        step = row["graph"] + ("+inductor" if row.get("fused") and row["graph"] != "compile" else "")
        lines.append((row["mode"], str(row["batch"]), step, f"{row['tok_s']:.1f}", f"{row['ratio_vs_dense']:.3f}",
                      swapped, f"{row['block_weight_mib']:.{0 if row['block_weight_mib'] >= 100 else 2}f}", match, error))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def main(argv: list[str] | None = None) -> dict:
    # scoped: the test suite calls main() in-process. Dynamo's recompile limit (8 per code object by
    # default) raised: a graph break inside a decoder layer would compile that layer's code once per
    # layer (each SparseLinear's id is a constant of its graph), and past the limit run uncompiled
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(torch._dynamo.config, name), 256)
    with torch.no_grad(), torch._dynamo.config.patch({name: limit}):
        return _main(argv)


def _main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens, random (default 512; --tiny 64)")
    parser.add_argument("--new", type=int, default=None, help="tokens generated per timed loop (default 256; --tiny 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops (median), after one warm-up loop")
    parser.add_argument("--check", type=int, default=16, help="greedy tokens compared with the reference (batch 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny config (hidden 256, 2 layers): runs on a CPU")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--graph", choices=("capture", "compile", "eager"), default=None,
                        help="decode step: own CUDA graph (default on CUDA), torch.compile reduce-overhead, eager "
                             "(default on CPU)")
    parser.add_argument("--fuse", nargs="?", const="default", default=None,
                        choices=("default", "max-autotune-no-cudagraphs"),
                        help="compile every mode's decode step with Inductor (torch.compile(mode=FUSE, "
                             "dynamic=False); sparse linears stay opaque custom ops), then capture/run it as --graph "
                             "says; '--fuse' alone: mode 'default' (matmuls stay cuBLAS: like with like). Default: off")
    parser.add_argument("--serve", choices=("per-batch", "together"), default="per-batch",
                        help="weight-sparse modes: accelerate(rows=(batch,)) one model per batch, or one model "
                             "with rows = every batch (a layer stays sparse only where it wins at all of them)")
    parser.add_argument("--act-layout", choices=("auto", "bitmask", "dense"), default=None,
                        help="accelerate_activations(weight_layout=...) (default: the runtime's own)")
    parser.add_argument("--prefill-copy", action="store_true",
                        help="accelerate(prefill=True): keep a cuSPARSELt copy of 2:4 weights (faster prefill, "
                             "+0.56x memory; prefill is not timed here)")
    parser.add_argument("--noise", type=float, default=1e-3,
                        help="relative noise on the first block's input for the reference's sensitivity")
    parser.add_argument("--calib-seqs", type=int, default=8, help="TEAL calibration: random sequences")
    parser.add_argument("--calib-len", type=int, default=256, help="TEAL calibration: tokens per sequence")
    parser.add_argument("--json-out", default=os.path.join(os.environ.get("OUT", "."), "decode_hf.json"))
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if "dense" not in modes:
        modes.insert(0, "dense")  # the baseline every ratio is taken against
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    # the tiny model runs on a CPU, where SparseLinear decompresses its weight every call: shorter loops
    args.prompt = args.prompt or (64 if args.tiny else 512)
    args.new = args.new or (16 if args.tiny else 256)
    if args.new < 1 or args.prompt < 1:
        parser.error("--prompt and --new must be positive")
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.float16 if args.device.type == "cuda" else torch.float32
    if args.graph is None:
        args.graph = "capture" if args.device.type == "cuda" else "eager"
    if args.graph != "eager" and args.device.type != "cuda":
        parser.error("CUDA graphs need a GPU: use --graph eager on the CPU")
    cfg = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    import transformers

    import sparsewise

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    gpu = torch.cuda.get_device_name() if args.device.type == "cuda" else "no GPU (CPU)"
    header = (f"{gpu} | torch {torch.__version__} | CUDA {torch.version.cuda} | transformers "
              f"{transformers.__version__} | triton {triton_version} | sparsewise "
              f"{getattr(sparsewise, '__version__', '?')} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    fuse = (f"fused: torch.compile(mode={args.fuse!r}, dynamic=False, fullgraph=False) of every mode's step"
            if args.fuse else "not fused (no torch.compile)")
    if args.fuse and args.graph == "compile":
        fuse = "fused: reduce-overhead is Inductor already (--fuse adds nothing)"
    settings = (f"{'tiny' if args.tiny else 'LLaMA-3-8B'} config {cfg} | {args.dtype} random N(0, 0.02) | modes "
                f"{modes} | batches {args.batches} | prompt {args.prompt} random tokens, {args.new} new (greedy, "
                f"StaticCache {args.prompt + args.new}) | decode step: {args.graph}, {fuse} | {args.repeats} timed "
                f"loops after 1 warm-up, median | accelerate rows: {args.serve} | act W^T layout {args.act_layout or 'runtime default'} | "
                f"cuSPARSELt prefill copy {args.prefill_copy} | TEAL calibration "
                f"{args.calib_seqs}x{args.calib_len} random tokens")
    print(header, flush=True)
    print(settings, flush=True)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg["vocab_size"], (max(args.batches), args.prompt), generator=generator)
    prompts = prompts.to(args.device)
    results: dict = {"header": header, "settings": settings, "config": cfg, "fuse": args.fuse, "rows": [],
                     "notes": [], "failed": {}}
    dense_tok_s: dict = {}
    started = time.perf_counter()
    for mode in modes:
        clock = time.perf_counter()
        try:
            results["rows"] += run_mode(mode, cfg, args, prompts, dense_tok_s, results["notes"])
        except Exception as error:  # noqa: BLE001 - keep the other modes' numbers
            traceback.print_exc()
            results["failed"][mode] = f"{type(error).__name__}: {error}"
            gc.collect()
            empty_cache()
        print(f"  ({mode}: {time.perf_counter() - clock:.1f} s, total {time.perf_counter() - started:.1f} s)",
              flush=True)
        results["wall_s"] = time.perf_counter() - started
        with open(args.json_out, "w") as handle:  # after every mode: a cut run keeps what it measured
            json.dump(results, handle, indent=1, default=str)
    print()
    print(header)
    print(settings)
    print_table(results["rows"])
    for note in results["notes"]:
        print(f"note: {note}")
    for mode, error in results["failed"].items():
        print(f"FAILED {mode}: {error}")
    print(f"total {results['wall_s']:.1f} s; json: {args.json_out}")
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome["failed"] else 0)
