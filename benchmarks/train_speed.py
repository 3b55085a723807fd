"""Training-step time of a LLaMA-3-8B MLP block at 2:4 vs dense on the GPU (medians, same run).

Block: SwiGLU, hidden 4096, intermediate 14336: y = down(silu(gate(x)) * up(x)), gate/up weights
[14336, 4096], down [4096, 14336], no bias, bf16; M = batch x seq tokens per step (4096, 8192).
One step = forward + backward of loss = sum(y * R) (R a fixed random [M, 4096] tensor, fed as
y.backward(R): the same gradients) with the block input requiring grad (dX is what a deeper
network propagates) + the weight update bookkeeping: grads reset, an SGD update
``p -= lr * grad`` (torch._foreach_add_, the same in every variant) and what the variant adds.

Variants (every one is checked against a float64 reference before it is timed):
  dense          nn.Linear math through autograd (cuBLAS for fwd, dX = dY W, dW = dY^T X).
  fwd24-<b>      static 2:4 mask (our fine-tuning case): the weight holds exact zeros; every step
                 compresses it again (the weights changed), Y = X W^T through the 2:4 GEMM of
                 backend <b>, backward dense: dX = dY W, dW = dY^T X; after the update the
                 weight is re-masked (p *= mask).
  dyn24-<b>      SR-STE/STE-style: dense weights kept, the 2:4 mask is recomputed from |W| every
                 step (one Triton pass: mask + masked copy), compressed, sparse forward; backward
                 dX = dY (W*M) dense, dW = dY^T X dense (no decay term).
  bdwp-<b>       BDWP (bidirectional weight pruning): dense weights kept; every step
                 W_f = W*M_f (2:4 along the input dim K) compressed for the forward GEMM, and
                 W_b = W*M_b (2:4 along the output dim N, from the same dense |W|) for
                 dX = dY W_b, computed as dX = dY (W_b^T)^T with W_b^T [K, N] (2:4 along its
                 last dim, so the structured operand is its own row-major layout) through the
                 same 2:4 GEMM; dW = dY^T X dense. Includes the transpose W -> W^T (Triton), both
                 mask passes and both compressions.
Backends <b>: ``torch`` = torch.sparse.to_sparse_semi_structured (SparseSemiStructuredTensor,
_FORCE_CUTLASS=False -> cuSPARSELt; CUTLASS only when cuSPARSELt is missing), called as
F.linear(x, W_sparse): PyTorch builds the cuSPARSELt plan inside every call. ``cslt`` =
sparsewise.kernels.cusparselt.CsltLinear (plans cached per shape and M, default algorithm, y^T
written by cuSPARSELt + one Triton transpose: its fast layout on sm_90); compression each step
with torch._cslt_compress into the same plan holder. No algorithm search
(torch._cslt_sparse_mm_search broke the CUDA context on the H200: never called here).

Breakdown (iv), per weight shape and M: the dense GEMM alone vs the 2:4 forward GEMM alone (both
backends, and cslt's y^T without the transpose), the compressions alone, the 2:4 mask pass and the
transpose, dense dX and dW. dX of gate/up [M, 14336] @ [14336, 4096] has the shape of down's
forward and vice versa, so the two weight shapes cover the sparse dX GEMMs of BDWP too.

Timing: CUDA events around each whole step (eager, as a training loop runs), warm-up steps first,
median of >= 10 repetitions, clocks warmed up; random normal inputs and weights (never zeros);
each weight 117 MB > the 60 MB L2, so every step reads HBM. A per-variant time budget and a
global deadline (faulthandler kills a hung process with a traceback) keep the run < 3 minutes;
the JSON is rewritten after every measurement, so a cut-off run keeps what it measured.

The 2:4 pieces (masks, the Triton mask pass, backends, the autograd Function) are the product's:
sparsewise.training.sparse24; this script holds the block, the float64 reference and the timing.

    python benchmarks/train_speed.py [--ms 4096,8192] [--variants dense,fwd24-torch,...]
    python benchmarks/train_speed.py --dry-run       # plan and floors, no GPU
    python benchmarks/train_speed.py --cpu-smoke     # the autograd Functions on CPU (dense emulation)
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from sparsewise.training.sparse24 import (
    EmulatedBackend,
    Masker,
    Sparse24Function,
    make_backend,
    mask24,
    mask24_apply_triton,
    sparse24_operands,
)

HIDDEN, INTER = 4096, 14336
DEFAULT_VARIANTS = "dense,fwd24-torch,fwd24-cslt,dyn24-cslt,bdwp-torch,bdwp-cslt"
MEASURED_BF16_TFLOPS = 788.0  # 8192^3 bf16 matmul on random data, an H200 of this workplace (KINDS.md)
LR = 1e-6
DEVICE = "cuda"  # a module constant so a harness can run the GPU flow on another device


# ------------------------------------------------------------------------------------------------
# The block (the 2:4 masks, backends and autograd Function: sparsewise.training.sparse24)
# ------------------------------------------------------------------------------------------------


class Block:
    """SwiGLU MLP with weights as leaf tensors; ``variant`` in dense / fwd24 / dyn24 / bdwp."""

    NAMES = ("gate", "up", "down")

    def __init__(self, weights: dict[str, torch.Tensor], variant: str, backend, masker: Masker):
        self.w = weights
        self.variant, self.backend, self.masker = variant, backend, masker
        self.masks: dict[str, torch.Tensor] = {}
        if variant == "fwd24":  # static mask: the weights hold exact zeros from the start
            with torch.no_grad():
                for name, w in self.w.items():
                    self.masks[name] = mask24(w)
                    w.mul_(self.masks[name])

    def params(self) -> list[torch.Tensor]:
        return [self.w[name] for name in self.NAMES]

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w[name]
        if self.variant == "dense":
            return F.linear(x, w)
        # fwd24: w holds the static mask's zeros (mask=None), so dX = dY W dense is on W*M
        ops = sparse24_operands(w, self.variant, self.backend, self.masker)
        return Sparse24Function.apply(x, w, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        h = F.silu(self.linear("gate", x2)) * self.linear("up", x2)
        return self.linear("down", h).reshape(*shape[:-1], -1)

    def step(self, x: torch.Tensor, r: torch.Tensor, lr: float = LR) -> None:
        """One training step: grads reset, forward, backward of sum(y * r), SGD update, re-mask."""
        params = self.params()
        for p in params:
            p.grad = None
        x.grad = None
        y = self.forward(x)
        y.backward(r)
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
            for name, mask in self.masks.items():
                self.w[name].mul_(mask)


def reference_grads(weights: dict[str, torch.Tensor], variant: str, x: torch.Tensor, r: torch.Tensor):
    """Independent float64 reference of (y, dx, dgate, dup, ddown) by explicit formulas.

    fwd24 uses the (already masked) weights; dyn24/bdwp mask along K for the forward, and bdwp
    along N for dX; masks from sparsewise.patterns.nm_mask (the formulas, not the Masker under test)."""
    from sparsewise.patterns import nm_mask

    w = {k: v.detach().double() for k, v in weights.items()}
    x, r = x.detach().double(), r.detach().double()
    if variant in ("dense", "fwd24"):
        wf = wb = w
    else:
        wf = {k: v * nm_mask(v.abs(), 2, 4) for k, v in w.items()}
        wb = wf if variant == "dyn24" else {k: v * nm_mask(v.abs().t(), 2, 4).t() for k, v in w.items()}
    g, u = x @ wf["gate"].t(), x @ wf["up"].t()
    sg = torch.sigmoid(g)
    silu = g * sg
    h = silu * u
    y = h @ wf["down"].t()
    dh = r @ wb["down"]
    d_down = r.t() @ h
    du = dh * silu
    dg = dh * u * (sg * (1 + g * (1 - sg)))
    dx = dg @ wb["gate"] + du @ wb["up"]
    return {"y": y, "dx": dx, "gate": dg.t() @ x, "up": du.t() @ x, "down": d_down}


def rel_errors(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor ||out - ref|| / ||ref|| (NaN anywhere -> inf)."""
    errors = {}
    for key, value in ref.items():
        o = out[key].double()
        if not torch.isfinite(o).all():
            errors[key] = math.inf
            continue
        errors[key] = float((o - value).norm() / value.norm().clamp_min(1e-300))
    return errors


def make_weights(device, dtype, generator, hidden=HIDDEN, inter=INTER) -> dict[str, torch.Tensor]:
    def w(out_f, in_f):
        t = torch.randn(out_f, in_f, device=device, generator=generator, dtype=torch.float32) / math.sqrt(in_f)
        return t.to(dtype).requires_grad_(True)

    return {"gate": w(inter, hidden), "up": w(inter, hidden), "down": w(hidden, inter)}


def check_variant(variant: str, backend, masker: Masker, device, dtype, m: int, hidden: int, inter: int,
                  seed: int) -> dict:
    """Run the variant's forward/backward once on fresh random data; errors vs the float64 formulas."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = make_weights(device, dtype, gen, hidden, inter)
    block = Block(weights, variant, backend, masker)
    x = torch.randn(m, hidden, device=device, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(True)
    r = torch.randn(m, hidden, device=device, generator=gen, dtype=torch.float32).to(dtype)
    y = block.forward(x)
    y.backward(r)
    out = {"y": y.detach(), "dx": x.grad, **{name: weights[name].grad for name in Block.NAMES}}
    ref = reference_grads(weights, variant, x, r)
    return rel_errors(out, ref)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def timed_reps(fn, *, reps: int, warmup: int, budget_s: float, cuda: bool) -> dict:
    """Median ms of ``fn()`` over up to ``reps`` repetitions after ``warmup`` calls, each rep between
    two CUDA events (host clock on CPU); stops early (>= 3 reps) once ``budget_s`` is spent."""
    start_wall = time.perf_counter()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start_wall > budget_s:
            break
    return {"ms": statistics.median(times), "reps": len(times), "min_ms": min(times), "max_ms": max(times),
            "budget_cut": len(times) < reps}


def warm_up_clocks(seconds: float = 2.0) -> None:
    burn = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        burn @ burn
    torch.cuda.synchronize()


def floors(ms: list[int], tflops: float) -> list[dict]:
    rows = []
    for m in ms:
        gemm = 2.0 * m * HIDDEN * INTER  # one of the 9 GEMMs of a step (3 layers x fwd, dX, dW)
        dense = 9 * gemm
        rows.append({"M": m, "step_tflop_dense": round(dense / 1e12, 3),
                     "dense_floor_ms": round(dense / (tflops * 1e12) * 1e3, 3),
                     # 2:4 tensor cores do a sparse GEMM in at best half the time
                     "fwd24_floor_ms": round((dense - 1.5 * gemm) / (tflops * 1e12) * 1e3, 3),
                     "bdwp_floor_ms": round((dense - 3.0 * gemm) / (tflops * 1e12) * 1e3, 3),
                     "fwd24_best_speedup": round(9 / 7.5, 3), "bdwp_best_speedup": round(9 / 6, 3)})
    return rows


def header() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # what this torch offers for 2:4 (names differ across versions: looked up, never assumed)
    info["api"] = {"torch._cslt_compress": hasattr(torch, "_cslt_compress"),
                   "torch._cslt_sparse_mm": hasattr(torch, "_cslt_sparse_mm"),
                   "torch.sparse.to_sparse_semi_structured": hasattr(torch.sparse, "to_sparse_semi_structured"),
                   "torch.sparse.SparseSemiStructuredTensor": hasattr(torch.sparse, "SparseSemiStructuredTensor"),
                   "torch._sparse_semi_structured_linear": hasattr(torch, "_sparse_semi_structured_linear")}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        cusparselt = getattr(torch.backends, "cusparselt", None)
        try:
            info["cusparselt"] = cusparselt.version() if cusparselt is not None and cusparselt.is_available() else None
        except Exception:  # noqa: BLE001
            info["cusparselt"] = None
    else:
        info["device"] = "cpu"
    return info


def short(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# ------------------------------------------------------------------------------------------------
# Breakdown (iv)
# ------------------------------------------------------------------------------------------------


def breakdown(m: int, backends: dict, masker: Masker, args, deadline: float) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(100 + m)
    for n, k in ((INTER, HIDDEN), (HIDDEN, INTER)):
        w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.float32).div_(math.sqrt(k)).to(torch.bfloat16)
        w24 = w * mask24(w)
        x = torch.randn(m, k, device=DEVICE, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        dy = torch.randn(m, n, device=DEVICE, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        keep = w24 != 0
        ref = F.linear(x.double(), w24.double())
        cases = [("dense GEMM x W^T", lambda: F.linear(x, w)),
                 ("dense dX = dY W", lambda: dy @ w),
                 ("dense dW = dY^T X", lambda: dy.t() @ x),
                 (f"2:4 mask+apply ({masker.kind or 'torch'})", lambda: masker.apply(w)),
                 ("transpose W -> W^T", lambda: masker.transpose(w)),
                 ("re-mask p *= mask", lambda: w24.mul_(keep))]
        for name, backend in backends.items():
            try:
                handle = backend.compress(w24)
                out = backend.matmul(handle, x)
                err = float((out.double() - ref).norm() / ref.norm())
                if not err < 2e-2:
                    raise AssertionError(f"wrong 2:4 GEMM result: rel error {err:.3g}")
            except Exception as exc:  # noqa: BLE001
                rows.append({"M": m, "N": n, "K": k, "op": f"{name} 2:4 GEMM", "ms": None, "note": short(exc)})
                continue
            cases.append((f"{name} 2:4 GEMM x W^T", lambda b=backend, h=handle: b.matmul(h, x)))
            cases.append((f"{name} compress", lambda b=backend: b.compress(w24)))
            if name == "cslt":
                holder, packed = handle
                plan_m = -(-m // 16) * 16

                def yt_only(holder=holder, packed=packed):
                    out_t = torch.empty(n, plan_m, dtype=torch.bfloat16, device=DEVICE)
                    holder._plan(plan_m, "sparse_a_t").run(packed, x, out_t)
                    return out_t

                cases.append(("cslt 2:4 GEMM y^T only (no transpose)", yt_only))
        for op, fn in cases:
            if time.perf_counter() > deadline:
                rows.append({"M": m, "N": n, "K": k, "op": op, "ms": None, "note": "skipped: deadline"})
                continue
            try:
                res = timed_reps(fn, reps=args.reps, warmup=3, budget_s=args.op_budget, cuda=True)
                rows.append({"M": m, "N": n, "K": k, "op": op, **res})
            except Exception as exc:  # noqa: BLE001
                rows.append({"M": m, "N": n, "K": k, "op": op, "ms": None, "note": short(exc)})
        dense_ms = next((r["ms"] for r in rows if r.get("N") == n and r["op"] == "dense GEMM x W^T"
                         and r.get("M") == m and r.get("ms")), None)
        for r in rows:
            if r.get("N") == n and r.get("M") == m and r.get("ms") and dense_ms:
                r["vs_dense_gemm"] = round(dense_ms / r["ms"], 3)
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_variant(spec: str) -> tuple[str, str]:
    kind, _, backend = spec.partition("-")
    if kind == "dense":
        return "dense", "none"
    if kind not in ("fwd24", "dyn24", "bdwp") or backend not in ("torch", "cslt", "emu"):
        raise SystemExit(f"unknown variant {spec!r}: use dense or fwd24|dyn24|bdwp-torch|cslt|emu")
    return kind, backend


def cpu_smoke(args) -> int:
    """The Functions and the step on CPU with the dense emulation; Triton's mask kernel through its
    interpreter when TRITON_INTERPRET=1 is set (it is, by this mode)."""
    from sparsewise.patterns import check_mask

    torch.manual_seed(0)
    failures = []
    masker = Masker(torch.device("cpu"), use_triton=True)
    print(f"masker: {masker.note}")
    if masker.use_triton:
        for kind in ("tile", "scalar"):
            for dtype in (torch.bfloat16, torch.float32):
                wb = torch.randn(64, 128).to(dtype)
                wb[:, 16:24] = 0.5
                wb[5, :8] = 0.0
                out, keep = mask24_apply_triton(wb, want_keep=True, kind=kind)
                ok = torch.equal(keep, mask24(wb)) and torch.equal(out, wb * mask24(wb))
                print(f"triton mask kernel {kind} {dtype} (interpreter) == mask24: {ok}")
                if not ok:
                    failures.append(f"triton mask {kind}")
    hidden, inter, m = 64, 128, 48
    backend = EmulatedBackend()
    for variant in ("dense", "fwd24", "dyn24", "bdwp"):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            errors = check_variant(variant, backend, masker, torch.device("cpu"), dtype, m, hidden, inter, seed=1)
            worst = max(errors.values())
            status = "ok" if worst < tol else "FAIL"
            if worst >= tol:
                failures.append(f"{variant} {dtype}")
            print(f"check {variant:6} {str(dtype):15} max rel err {worst:.2e} (tol {tol:g}) {status}  "
                  + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    # the fwd24 Function against plain autograd on the masked weights (independent of the formulas)
    gen = torch.Generator().manual_seed(3)
    weights = make_weights("cpu", torch.float64, gen, hidden, inter)
    block = Block(weights, "fwd24", backend, masker)
    x = torch.randn(m, hidden, dtype=torch.float64, requires_grad=True)
    r = torch.randn(m, hidden, dtype=torch.float64)
    block.forward(x).backward(r)
    plain = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(F.silu(F.linear(x2, plain["gate"])) * F.linear(x2, plain["up"]), plain["down"]) * r).sum().backward()
    worst = max([float((x.grad - x2.grad).abs().max())] + [float((weights[k].grad - plain[k].grad).abs().max())
                                                           for k in weights])
    print(f"fwd24 Function vs plain autograd (float64): max abs diff {worst:.1e} {'ok' if worst < 1e-10 else 'FAIL'}")
    if worst >= 1e-10:
        failures.append("fwd24 vs autograd")
    # steps: the update keeps static masks 2:4 and changes the weights; the timing harness runs
    results = []
    for variant in ("dense", "fwd24", "dyn24", "bdwp"):
        gen = torch.Generator().manual_seed(5)
        weights = make_weights("cpu", torch.float32, gen, hidden, inter)
        block = Block(weights, variant, backend, masker)
        before = {k: v.detach().clone() for k, v in weights.items()}
        x = torch.randn(m, hidden, generator=gen).requires_grad_(True)
        r = torch.randn(m, hidden, generator=gen)
        res = timed_reps(lambda: block.step(x, r, lr=1e-2), reps=4, warmup=1, budget_s=5.0, cuda=False)
        changed = all(not torch.equal(before[k], weights[k].detach()) for k in weights)
        still24 = all(check_mask(weights[k].detach() != 0, "2:4") for k in weights) if variant == "fwd24" else True
        print(f"step {variant:6} {res['ms']:.2f} ms (CPU, {res['reps']} reps) weights changed: {changed}"
              + (f", still 2:4: {still24}" if variant == "fwd24" else ""))
        if not changed or not still24:
            failures.append(f"step {variant}")
        results.append({"variant": variant, **res})
    out = os.path.join(os.environ.get("OUT", "."), "train_speed_smoke.json")
    with open(out, "w") as handle:
        json.dump({"header": header(), "smoke": results, "failures": failures}, handle, indent=1)
    print(json.dumps({"smoke": "train_speed", "failures": failures}))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="4096,8192", help="tokens per step (batch x seq), comma-separated")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="dense and <fwd24|dyn24|bdwp>-<torch|cslt>, comma-separated")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per variant (median; >= 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--check-m", type=int, default=2048, help="rows of the correctness check")
    parser.add_argument("--tol", type=float, default=2e-2, help="max allowed rel error (bf16) of a check")
    parser.add_argument("--variant-budget", type=float, default=10.0, help="seconds of timed steps per variant")
    parser.add_argument("--op-budget", type=float, default=2.0, help="seconds per breakdown op")
    parser.add_argument("--deadline", type=float, default=165.0, help="seconds: skip what is left after this")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--no-triton", action="store_true", help="mask/transpose with torch ops only")
    parser.add_argument("--time-wrong", action="store_true", help="time variants that fail their check too")
    parser.add_argument("--json-out", default=os.environ.get("OUT", ".") + "/train_speed.json")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the floors, no GPU work")
    parser.add_argument("--cpu-smoke", action="store_true", help="check the Functions on CPU (dense emulation)")
    args = parser.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for spec in variants:
        parse_variant(spec)
    if args.cpu_smoke:
        return cpu_smoke(args)
    plan = {"ms": ms, "variants": variants, "floors_at_tflops": MEASURED_BF16_TFLOPS,
            "floors": floors(ms, MEASURED_BF16_TFLOPS)}
    if args.dry_run:
        print(json.dumps(plan, indent=1))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke or --dry-run here")
        return 2
    t_start = time.perf_counter()
    deadline = t_start + args.deadline
    faulthandler.dump_traceback_later(args.deadline + 12, exit=True)  # a hung CUDA call: traceback, then exit
    info = header()
    result = {"header": info, "plan": plan, "checks": [], "steps": [], "breakdown": [], "notes": []}

    def save():
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=1)

    print(json.dumps(info), flush=True)
    masker = Masker(torch.device(DEVICE), use_triton=not args.no_triton)
    result["notes"].append(f"mask/transpose: {masker.note}")
    backends: dict[str, object] = {}
    for name in ("torch", "cslt"):
        if any(v.endswith("-" + name) for v in variants) or not args.no_breakdown:
            try:
                backends[name] = make_backend(name)
                result["notes"].append(f"backend {name}: {backends[name].kind}")
            except Exception as exc:  # noqa: BLE001
                result["notes"].append(f"backend {name}: {short(exc)}")
    print("\n".join(result["notes"]), flush=True)
    save()
    warm_up_clocks()

    # correctness first, on fresh random data at check_m rows
    passed = {}
    for spec in variants:
        kind, bname = parse_variant(spec)
        if kind != "dense" and bname not in backends and bname != "emu":
            passed[spec] = False
            result["checks"].append({"variant": spec, "status": f"failed: backend {bname} unavailable"})
            print(f"check {spec:12} failed: backend {bname} unavailable", flush=True)
            continue
        backend = backends.get(bname) or EmulatedBackend()
        try:
            errors = check_variant(kind, backend, masker, torch.device(DEVICE), torch.bfloat16, args.check_m,
                                   HIDDEN, INTER, seed=7)
            worst = max(errors.values())
            passed[spec] = worst < args.tol
            row = {"variant": spec, "M": args.check_m, "max_rel_err": worst, "errors": errors,
                   "status": "ok" if passed[spec] else f"WRONG (max rel err {worst:.3g} >= {args.tol})"}
        except Exception as exc:  # noqa: BLE001
            passed[spec] = False
            row = {"variant": spec, "status": short(exc), "trace": traceback.format_exc()[-1500:]}
        result["checks"].append(row)
        print(f"check {spec:12} {row['status']}"
              + (f"  max rel err {row['max_rel_err']:.2e} " + " ".join(f"{k}={v:.1e}" for k, v in row["errors"].items())
                 if "errors" in row else ""), flush=True)
        torch.cuda.empty_cache()
        save()

    # step timings
    for m in ms:
        dense_ms = None
        # dense once more at the end: the spread of one version timed twice (METHOD.md) next to the ratios
        order = variants + (["dense-again"] if "dense" in variants and len(variants) > 1 else [])
        for spec in order:
            kind, bname = parse_variant(spec)
            row = {"variant": spec, "M": m}
            ok = passed.get(spec, passed.get("dense") if kind == "dense" else False)
            if time.perf_counter() > deadline:
                row["status"] = "skipped: deadline"
            elif not ok and not args.time_wrong:
                why = next((c["status"] for c in result["checks"] if c["variant"] == spec), "no check")
                row["status"] = f"skipped: check {why}"
            else:
                try:
                    gen = torch.Generator(device=DEVICE).manual_seed(m)
                    weights = make_weights(DEVICE, torch.bfloat16, gen)
                    backend = backends.get(bname) or EmulatedBackend()
                    block = Block(weights, kind, backend, masker)
                    x = torch.randn(m, HIDDEN, device=DEVICE, generator=gen).to(torch.bfloat16).requires_grad_(True)
                    r = torch.randn(m, HIDDEN, device=DEVICE, generator=gen).to(torch.bfloat16)
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    block.step(x, r)  # first step: plans, compiles; timed on the host clock
                    torch.cuda.synchronize()
                    row["first_step_s"] = round(time.perf_counter() - t0, 3)
                    budget = min(args.variant_budget, max(1.0, deadline - time.perf_counter()))
                    row.update(timed_reps(lambda: block.step(x, r), reps=args.reps, warmup=args.warmup,
                                          budget_s=budget, cuda=True))
                    row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    row["status"] = "ok" if ok else "timed, but WRONG"
                    if not all(torch.isfinite(w).all() for w in weights.values()):
                        row["status"] = "non-finite weights after the timed steps"
                    if spec == "dense":
                        dense_ms = row["ms"]
                    del block, weights, x, r
                except Exception as exc:  # noqa: BLE001
                    row["status"] = short(exc)
                    row["trace"] = traceback.format_exc()[-1500:]
                torch.cuda.empty_cache()
            if dense_ms and row.get("ms"):
                row["speedup_vs_dense"] = round(dense_ms / row["ms"], 3)
            result["steps"].append(row)
            print(f"step  M={m:5} {spec:12} " + (f"{row['ms']:8.3f} ms  x{row.get('speedup_vs_dense', float('nan')):.3f}"
                                                 f" vs dense  ({row['reps']} reps)" if row.get("ms") else row["status"]),
                  flush=True)
            save()

    if not args.no_breakdown:
        for m in ms:
            if time.perf_counter() > deadline:
                result["notes"].append(f"breakdown M={m}: skipped (deadline)")
                continue
            rows = breakdown(m, backends, masker, args, deadline)
            result["breakdown"].extend(rows)
            save()
            torch.cuda.empty_cache()
    faulthandler.cancel_dump_traceback_later()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()

    # the table last (the device reply carries the end of the output)
    print(f"\n{info.get('device')} | torch {info['torch']} | triton {info.get('triton')} | cuSPARSELt "
          f"{info.get('cusparselt')} | bf16 | step = fwd + bwd + SGD update | CUDA events, median")
    print(f"{'M':>5} {'variant':12} {'ms':>9} {'speedup':>8}  status   (floors: dense / fwd24 / bdwp ms)")
    floor_by_m = {f["M"]: f for f in plan["floors"]}
    for row in result["steps"]:
        f = floor_by_m[row["M"]]
        ms_txt = f"{row['ms']:9.3f}" if row.get("ms") else f"{'-':>9}"
        sp = f"{row['speedup_vs_dense']:8.3f}" if row.get("speedup_vs_dense") else f"{'-':>8}"
        print(f"{row['M']:5} {row['variant']:12} {ms_txt} {sp}  {row['status'][:60]}"
              + (f"   ({f['dense_floor_ms']} / {f['fwd24_floor_ms']} / {f['bdwp_floor_ms']})"
                 if row["variant"] == "dense" else ""))
    if result["breakdown"]:
        print(f"\n{'M':>5} {'N x K':>12} {'op':40} {'ms':>8} {'dense GEMM / op':>15}")
        for row in result["breakdown"]:
            ms_txt = f"{row['ms']:8.3f}" if row.get("ms") else f"{'-':>8}"
            print(f"{row['M']:5} {row['N']:>5}x{row['K']:<6} {row['op'][:40]:40} {ms_txt} "
                  f"{row.get('vs_dense_gemm', ''):>15} {row.get('note', '')[:60]}")
    summary = {r["variant"] + f"@{r['M']}": r.get("speedup_vs_dense") for r in result["steps"]}
    print(json.dumps({"train_speed": summary, "json": args.json_out}))
    return 0


if __name__ == "__main__":
    if "--cpu-smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs on CPU
    sys.exit(main())
