"""2:4 sparse tensor-core GEMM through cuSPARSELt, with the plan built once per shape.

PyTorch's ``torch._cslt_sparse_mm`` (what ``to_sparse_semi_structured`` calls) initialises the
descriptors and the matmul plan inside every call: 0.5-1 ms of host work per call on an H200,
which makes the 2:4 path slower than dense for every M below a few thousand (measured in
benchmarks/probes/semistructured_overhead.py). Here the same library is called through ctypes
with the descriptors, plan and workspace kept per (weight, M) so a call is one
``cusparseLtMatmul`` launch. The compressed operand is PyTorch's own (``torch._cslt_compress``,
same descriptor), so the two paths are interchangeable and testable against each other.

y[M, N] = x[M, K] @ W[N, K]^T is computed as D = A @ op(B): A = W (structured, row-major),
B = x (row-major [M, K], op = transpose), D = y^T described column-major [N, M] (= y row-major).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from collections import OrderedDict

import torch

# ABI values from cusparseLt.h / library_types.h / cusparse.h (stable since cuSPARSELt 0.5).
_CUDA_R_16F, _CUDA_R_16BF = 2, 14
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_SPARSITY_50 = 0
_COMPUTE_32F = 2
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID = 0, 1
_OPAQUE = 1024  # every cuSPARSELt handle/descriptor/plan is a 1024-byte opaque struct
_PLANS_PER_WEIGHT = 32

_lib = None


class CusparseLtError(RuntimeError):
    pass


def _bucket(rows: int) -> int:
    """The power of two at or above ``rows`` (capped at 8192, as the dispatch table's buckets are):
    one searched algorithm id serves a whole bucket."""
    return min(1 << max(rows - 1, 0).bit_length(), 8192)


def algorithm_key(rows: int, mode: str) -> tuple[int, str]:
    """Key of ``alg_ids``: the bucket of the padded row count (what a plan is built for) and layout.

    Searches, calls and the dispatch table must agree on it: an id found for 8 rows (planned as
    16) that is looked up under another key silently falls back to id 0, 4-7x slower."""
    return _bucket(-(-rows // 16) * 16), mode


def _opaque():
    return (ctypes.c_uint8 * _OPAQUE)()


def _load_library():
    global _lib
    if _lib is not None:
        return _lib
    candidates = []
    try:
        import nvidia.cusparselt as pkg  # the wheel PyTorch's CUDA builds depend on

        candidates += glob.glob(os.path.join(list(pkg.__path__)[0], "lib", "libcusparseLt.so*"))
    except ImportError:
        pass
    candidates += glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcusparseLt.so*"))
    found = ctypes.util.find_library("cusparseLt")
    if found:
        candidates.append(found)
    candidates.append("libcusparseLt.so.0")
    errors = []
    for path in candidates:
        try:
            _lib = ctypes.CDLL(path)
            break
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    else:
        raise CusparseLtError("cuSPARSELt library not found (tried: " + "; ".join(errors) + "); install "
                              "PyTorch's CUDA build, which ships it, or use the dense/Triton backends.")
    for name in ("cusparseLtInit", "cusparseLtStructuredDescriptorInit", "cusparseLtDenseDescriptorInit",
                 "cusparseLtMatmulDescriptorInit", "cusparseLtMatmulAlgSelectionInit", "cusparseLtMatmulAlgSetAttribute",
                 "cusparseLtMatmulAlgGetAttribute",
"cusparseLtMatmulPlanInit", "cusparseLtMatmulGetWorkspace",
                 "cusparseLtMatmul", "cusparseLtSpMMACompressedSize2", "cusparseLtSpMMACompress2", "cusparseLtMatmulPlanDestroy",
                 "cusparseLtMatDescriptorDestroy", "cusparseLtMatmulAlgSelectionDestroy"):
        getattr(_lib, name).restype = ctypes.c_int
    _lib.cusparseLtStructuredDescriptorInit.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
        ctypes.c_int, ctypes.c_int, ctypes.c_int]
    _lib.cusparseLtDenseDescriptorInit.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
        ctypes.c_int, ctypes.c_int]
    _lib.cusparseLtMatmulDescriptorInit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                    ctypes.c_void_p, ctypes.c_int]
    _lib.cusparseLtMatmulAlgSelectionInit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    _lib.cusparseLtMatmulAlgSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                     ctypes.c_size_t]
    _lib.cusparseLtMatmulAlgGetAttribute.argtypes = _lib.cusparseLtMatmulAlgSetAttribute.argtypes
    _lib.cusparseLtMatmulPlanInit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    _lib.cusparseLtMatmulGetWorkspace.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    matmul_args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    _lib.cusparseLtMatmul.argtypes = matmul_args
    _lib.cusparseLtSpMMACompressedSize2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                    ctypes.POINTER(ctypes.c_size_t)]
    _lib.cusparseLtSpMMACompress2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CusparseLtError(f"cuSPARSELt {what} failed with status {status}")


_handle = None


def _get_handle():
    global _handle
    if _handle is None:
        lib = _load_library()
        handle = _opaque()
        _check(lib.cusparseLtInit(ctypes.byref(handle)), "init")
        _handle = handle
    return _handle


def available() -> bool:
    """cuSPARSELt usable here: a CUDA device of compute capability >= 8.0 and the library loads."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        _get_handle()
    except (CusparseLtError, OSError, AttributeError):
        return False
    return True


class _Plan:
    """Descriptors + plan + workspace for one (weight, M); destroyed with the object.

    Modes (see :class:`CsltLinear`): "sparse_b": D[M, N] = x[M, K] @ B[K, N] with B = W^T
    structured (W's own row-major memory = B column-major) and y written row-major directly;
    "sparse_a": D = W @ x^T with W structured, D described column-major so y comes row-major
    (measured 0.5-0.67x dense on the H200: that output layout is slow); "sparse_a_t": the same
    with D = y^T row-major (1.22-1.41x at M >= 2048, but y must then be transposed back).
    """

    def __init__(self, owner: CsltLinear, m: int, alg_id: int, mode: str):
        lib, handle = _load_library(), _get_handle()
        n, k = owner.shape
        dtype = owner.cuda_dtype
        self.lib, self.handle, self.mode = lib, handle, mode
        self.sparse, self.dense, self.result = _opaque(), _opaque(), _opaque()
        self.matmul, self.selection, self.plan = _opaque(), _opaque(), _opaque()
        h = ctypes.byref(handle)
        sparse, dense, result = ctypes.byref(self.sparse), ctypes.byref(self.dense), ctypes.byref(self.result)
        if mode == "sparse_b":
            _check(lib.cusparseLtDenseDescriptorInit(h, dense, m, k, k, 16, dtype, _ORDER_ROW), "x descriptor")
            _check(lib.cusparseLtStructuredDescriptorInit(h, sparse, k, n, k, 16, dtype, _ORDER_COL, _SPARSITY_50),
                   "structured descriptor")
            _check(lib.cusparseLtDenseDescriptorInit(h, result, m, n, n, 16, dtype, _ORDER_ROW), "y descriptor")
            _check(lib.cusparseLtMatmulDescriptorInit(h, ctypes.byref(self.matmul), _OP_N, _OP_N, dense, sparse,
                                                      result, result, _COMPUTE_32F), "matmul descriptor")
        else:
            _check(lib.cusparseLtStructuredDescriptorInit(h, sparse, n, k, k, 16, dtype, _ORDER_ROW, _SPARSITY_50),
                   "structured descriptor")
            _check(lib.cusparseLtDenseDescriptorInit(h, dense, m, k, k, 16, dtype, _ORDER_ROW), "x descriptor")
            transposed = mode == "sparse_a_t"
            _check(lib.cusparseLtDenseDescriptorInit(h, result, n, m, m if transposed else n, 16, dtype,
                                                     _ORDER_ROW if transposed else _ORDER_COL), "y descriptor")
            _check(lib.cusparseLtMatmulDescriptorInit(h, ctypes.byref(self.matmul), _OP_N, _OP_T, sparse, dense,
                                                      result, result, _COMPUTE_32F), "matmul descriptor")
        _check(lib.cusparseLtMatmulAlgSelectionInit(h, ctypes.byref(self.selection), ctypes.byref(self.matmul),
                                                    _ALG_DEFAULT), "algorithm selection")
        alg = ctypes.c_int(alg_id)
        _check(lib.cusparseLtMatmulAlgSetAttribute(h, ctypes.byref(self.selection), _ALG_CONFIG_ID, ctypes.byref(alg),
                                                   ctypes.sizeof(alg)), "algorithm id")
        max_id = ctypes.c_int(0)
        status = lib.cusparseLtMatmulAlgGetAttribute(h, ctypes.byref(self.selection), _ALG_CONFIG_MAX_ID,
                                                     ctypes.byref(max_id), ctypes.sizeof(max_id))
        self.max_alg_id = int(max_id.value) if status == 0 else 0  # only the search needs it
        _check(lib.cusparseLtMatmulPlanInit(h, ctypes.byref(self.plan), ctypes.byref(self.matmul),
                                            ctypes.byref(self.selection)), "plan")
        size = ctypes.c_size_t(0)
        _check(lib.cusparseLtMatmulGetWorkspace(h, ctypes.byref(self.plan), ctypes.byref(size)), "workspace size")
        self.workspace = torch.empty(max(int(size.value), 1), dtype=torch.uint8, device=owner.device)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def run(self, compressed: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        first, second = (x, compressed) if self.mode == "sparse_b" else (compressed, x)
        _check(self.lib.cusparseLtMatmul(ctypes.byref(self.handle), ctypes.byref(self.plan), ctypes.byref(self.alpha),
                                         first.data_ptr(), second.data_ptr(), ctypes.byref(self.beta), out.data_ptr(),
                                         out.data_ptr(), self.workspace.data_ptr(), ctypes.byref(stream), 1), "matmul")

    def __del__(self):
        try:
            self.lib.cusparseLtMatmulPlanDestroy(ctypes.byref(self.plan))
            self.lib.cusparseLtMatmulAlgSelectionDestroy(ctypes.byref(self.selection))
            for descriptor in (self.sparse, self.dense, self.result):
                self.lib.cusparseLtMatDescriptorDestroy(ctypes.byref(descriptor))
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone already
            pass


def _compress_as_b(weight: torch.Tensor, cuda_dtype: int) -> torch.Tensor:
    """Compress W [N, K] (row-major) as cuSPARSELt's structured B = W^T [K, N] column-major."""
    lib, handle = _load_library(), _get_handle()
    n, k = weight.shape
    descriptor = _opaque()
    h = ctypes.byref(handle)
    _check(lib.cusparseLtStructuredDescriptorInit(h, ctypes.byref(descriptor), k, n, k, 16, cuda_dtype, _ORDER_COL,
                                                  _SPARSITY_50), "structured descriptor")
    try:
        size, buffer_size = ctypes.c_size_t(0), ctypes.c_size_t(0)
        _check(lib.cusparseLtSpMMACompressedSize2(h, ctypes.byref(descriptor), ctypes.byref(size),
                                                  ctypes.byref(buffer_size)), "compressed size")
        compressed = torch.empty(int(size.value), dtype=torch.uint8, device=weight.device)
        buffer = torch.empty(max(int(buffer_size.value), 1), dtype=torch.uint8, device=weight.device)
        stream = ctypes.c_void_p(torch.cuda.current_stream(weight.device).cuda_stream)
        _check(lib.cusparseLtSpMMACompress2(h, ctypes.byref(descriptor), 0, _OP_N, weight.data_ptr(),
                                            compressed.data_ptr(), buffer.data_ptr(), stream), "compress")
        torch.cuda.current_stream(weight.device).synchronize()  # the buffer is freed on return
    finally:
        lib.cusparseLtMatDescriptorDestroy(ctypes.byref(descriptor))
    return compressed


class CsltLinear:
    """A 2:4 fp16/bf16 weight compressed for cuSPARSELt, callable as y = x W^T (+ bias).

    ``mode`` "sparse_a" (default) is PyTorch's formulation (W the structured A, compressed by
    ``torch._cslt_compress``); calls choose the output layout: y row-major written by cuSPARSELt
    (``transposed=False``), or y^T row-major, the layout its sm_90 kernels are fast in, then one
    Triton transpose with the bias fused (``transposed=True``). "sparse_b" (W^T as structured B,
    y row-major natively) is kept for the layout probes: it measured no faster than sparse_a.
    Plans are cached per (M, layout) (LRU, 32 per weight); ``alg_ids`` maps (M's power-of-two
    bucket, layout) to the algorithm id, 0 (the library's default) until :meth:`search` times
    them all. The search is our own loop over the ids the library reports: PyTorch's ``_cslt_sparse_mm_search``
    returned an internal error on the H200 and left the CUDA context unusable (2026-11-29), and
    its id-0 default ran 2.2-2.6x slower than the best id at decode sizes.
    """

    def __init__(self, weight: torch.Tensor, mode: str = "sparse_a"):
        if weight.dtype not in (torch.float16, torch.bfloat16) or weight.device.type != "cuda":
            raise ValueError("cuSPARSELt 2:4 needs a float16/bfloat16 weight on a CUDA device.")
        n, k = weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"cuSPARSELt needs both weight dims divisible by 16, got {tuple(weight.shape)}.")
        if mode not in ("sparse_a", "sparse_b"):
            raise ValueError(f"unknown cuSPARSELt mode {mode!r}: use 'sparse_a' or 'sparse_b'.")
        self.shape = (n, k)
        self.dtype = weight.dtype
        self.device = weight.device
        self.cuda_dtype = _CUDA_R_16F if weight.dtype == torch.float16 else _CUDA_R_16BF
        self.alg_ids: dict[tuple[int, str], int] = {}
        self._plans: OrderedDict[tuple[int, str], _Plan] = OrderedDict()
        weight = weight.contiguous()
        compressed = _compress_as_b(weight, self.cuda_dtype) if mode == "sparse_b" else torch._cslt_compress(weight)
        self._use(mode, compressed)

    def _use(self, mode: str, compressed: torch.Tensor) -> None:
        self.mode, self.compressed = mode, compressed
        self._plans.clear()

    @property
    def nbytes(self) -> int:
        return self.compressed.numel() * self.compressed.element_size()

    def _plan(self, m: int, mode: str) -> _Plan:
        key = (m, mode)
        plan = self._plans.get(key)
        if plan is None:
            plan = _Plan(self, m, self.alg_ids.get(algorithm_key(m, mode), 0), mode)
            self._plans[key] = plan
            if len(self._plans) > _PLANS_PER_WEIGHT:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def use_algorithm(self, rows: int, alg_id: int, *, transposed: bool = False) -> None:
        """Serve calls of ``rows`` rows (its whole bucket) in one output layout with ``alg_id``."""
        key = algorithm_key(rows, "sparse_a_t" if transposed else self.mode)
        if self.alg_ids.get(key) != alg_id:
            self.alg_ids[key] = alg_id
            for planned in [planned for planned in self._plans if algorithm_key(*planned) == key]:
                del self._plans[planned]  # the next call builds its plan with this id

    def search(self, m: int, *, transposed: bool = False, repeats: int = 10, timeout_s: float = 300.0) -> dict:
        """Time every algorithm id for ``m`` rows (padded to 16) in one output layout; keep the fastest.

        The ids are timed in child processes on the same device, on a random weight of the same
        shape and dtype: on the H200 some ids launch kernels that fault (illegal instruction),
        which leaves a CUDA context unusable, so a fault ends only its child and the next child
        resumes after that id. Returns {"alg_id", "ms", "default_ms", "tried", "faulted"}
        (milliseconds: median of CUDA events over ``repeats`` calls after one warm-up call).
        """
        padded = -(-m // 16) * 16
        mode = "sparse_a_t" if transposed else self.mode
        if transposed and self.mode != "sparse_a":
            raise ValueError("the transposed output needs the weight compressed as A (mode='sparse_a').")
        timings, faulted = _search_in_children(self.shape, self.dtype, self.device, padded, transposed, repeats,
                                               timeout_s)
        if not timings:
            raise CusparseLtError(f"no cuSPARSELt algorithm serves {padded}x{self.shape[1]} @ {self.shape[1]}x"
                                  f"{self.shape[0]} in layout {mode!r} (faulted: {faulted})")
        best = min(timings, key=timings.get)
        self.use_algorithm(m, best, transposed=transposed)
        return {"alg_id": best, "ms": timings[best], "default_ms": timings.get(0, float("nan")), "tried": len(timings),
                "faulted": faulted}

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, transposed: bool = False) -> torch.Tensor:
        n, k = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        padded = -(-m // 16) * 16  # the dense operand's rows in multiples of 16
        if padded != m:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, padded - m))
        if transposed:
            if self.mode != "sparse_a":
                raise ValueError("the transposed output needs the weight compressed as A (mode='sparse_a').")
            from .transpose import transpose_bias

            out_t = torch.empty(n, padded, dtype=self.dtype, device=self.device)
            self._plan(padded, "sparse_a_t").run(self.compressed, x2, out_t)
            return transpose_bias(out_t[:, :m], bias).reshape(*lead, n)
        out = torch.empty(padded, n, dtype=self.dtype, device=self.device)
        self._plan(padded, self.mode).run(self.compressed, x2, out)
        if padded != m:
            out = out[:m]
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, n)


def _time_ids(linear: CsltLinear, padded: int, transposed: bool, start: int, repeats: int,
              skip: frozenset[int] = frozenset()) -> None:
    """Child side of :meth:`CsltLinear.search`: one line per id on stdout, "try" before each launch."""
    from ..runtime.dispatch import events_median

    n, k = linear.shape
    mode = "sparse_a_t" if transposed else linear.mode
    x = torch.randn(padded, k, dtype=linear.dtype, device=linear.device)
    out = torch.empty(*((n, padded) if transposed else (padded, n)), dtype=linear.dtype, device=linear.device)
    alg_id, max_id = start, start
    while alg_id <= max_id:
        if alg_id in skip and alg_id != 0:  # id 0 also tells the id range
            alg_id += 1
            continue
        print(f"try {alg_id}", flush=True)
        try:
            plan = _Plan(linear, padded, alg_id, mode)
            max_id = max(max_id, plan.max_alg_id)
            ms = events_median(lambda plan=plan: plan.run(linear.compressed, x, out), repeats, warmup=1)
            print(f"ok {alg_id} {ms} {max_id}", flush=True)
        except CusparseLtError:
            print(f"refused {alg_id} {max_id}", flush=True)
        alg_id += 1
    print("done", flush=True)


def _search_in_children(shape, dtype, device, padded, transposed, repeats, timeout_s) -> tuple[dict, list]:
    import subprocess
    import sys
    import time

    timings: dict[int, float] = {}
    faulted: list[int] = []
    start, deadline = 0, time.monotonic() + timeout_s
    index = device.index if device.index is not None else torch.cuda.current_device()
    faults_key = f"{torch.cuda.get_device_name(index)}|{'y^T' if transposed else 'y'}"
    known = _known_faults()
    skip = set(known.get(faults_key, []))
    while time.monotonic() < deadline:
        command = [sys.executable, "-m", "sparsewise.kernels.cusparselt", str(shape[0]), str(shape[1]),
                   str(dtype).removeprefix("torch."), str(padded), str(int(transposed)), str(start), str(repeats),
                   str(index), ",".join(map(str, sorted(skip))) or "-"]
        try:
            child = subprocess.run(command, capture_output=True, text=True,
                                   timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired as exc:
            lines = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            child = None
        else:
            lines = child.stdout
        last_try, finished = None, False
        for line in lines.splitlines():
            word, *rest = line.split()
            if word == "try":
                last_try = int(rest[0])
            elif word == "ok":
                timings[int(rest[0])] = float(rest[1])
            elif word == "done":
                finished = True
        if finished or child is None:
            break
        if last_try is None:  # the child died before timing anything: not an algorithm's fault
            raise CusparseLtError(f"the cuSPARSELt search child failed: {child.stderr.strip()[-500:]}")
        faulted.append(last_try)
        skip.add(last_try)
        known[faults_key] = sorted(skip)
        _save_known_faults(known)  # later searches on this device skip it: one child per search
        start = last_try + 1
    return timings, faulted


def _faults_path():
    from pathlib import Path

    root = Path(os.environ.get("SPARSEWISE_CACHE", Path.home() / ".cache" / "sparsewise")).expanduser()
    return root / "cusparselt_faults.json"


def _known_faults() -> dict[str, list[int]]:
    import json

    try:
        data = json.loads(_faults_path().read_text())
        return {key: [int(i) for i in ids] for key, ids in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}  # absent or damaged: the search finds the faults again


def _save_known_faults(known: dict[str, list[int]]) -> None:
    import json
    import tempfile

    path = _faults_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(known, handle, indent=1, sort_keys=True)
    os.replace(handle.name, path)


if __name__ == "__main__":  # the search's child process (see CsltLinear.search)
    import sys

    rows, cols, dtype_name, padded_rows, transposed_flag, first_id, repeat_count, device_index, skipped = sys.argv[1:10]
    torch.cuda.set_device(int(device_index))
    from ..patterns import nm_mask

    generator = torch.Generator(device="cuda").manual_seed(0)
    dense = torch.randn(int(rows), int(cols), device="cuda", generator=generator).to(getattr(torch, dtype_name))
    _time_ids(CsltLinear(dense * nm_mask(dense.abs(), 2, 4)), int(padded_rows), bool(int(transposed_flag)), int(first_id),
              int(repeat_count), frozenset() if skipped == "-" else frozenset(int(i) for i in skipped.split(",")))
