"""CPU sparse x dense kernels for pruned linears and 1x1 convolutions (C++, built at first use).

    y[m, n] = b[n] + sum_{j in row n of W} W[n, j] * x[m, j]          (linear, x [M, K])
    Y[b, n, p] = bias[n] + sum_{c in row n of W} W[n, c] * X[b, c, p]  (1x1 conv, p over H*W)

The weight is CSR per output row: ``row_ptr`` int64 [N+1], ``cols`` int16 (K <= 32767) or int32
[nnz], ``values`` float32 [nnz]. As in Elsen et al. 2020, "Fast Sparse ConvNets", the kernel
vectorises across the dense operand's contiguous dimension (H*W, or the M rows of a linear input
transposed once), so a nonzero costs a broadcast and contiguous loads, never a gather; M = 1 is a
gathered CSR matrix-vector product. Threads (``at::parallel_for``, PyTorch's own pool) split the
output rows by nonzero count.

``cpu_sparse.cpp`` is compiled by ``torch.utils.cpp_extension.load`` once per (source, torch,
compiler, Python, ISA) into ``$SPARSEWISE_CACHE/cpu_ext/<hash>`` (default ``~/.cache/sparsewise``).
Without a working compiler the calls fall back, with one warning, to ``torch.sparse_csr_tensor @
dense`` (correct, usually slower than dense). :func:`reference_linear` / :func:`reference_conv1x1`
(decompress + dense op) are the references tests compare against.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).resolve().with_name("cpu_sparse.cpp")
INT16_MAX_FEATURES = 32767

# Tests (and users without a compiler who want no build attempt) set this to skip the C++ kernel.
FORCE_TORCH_FALLBACK = os.environ.get("SPARSEWISE_CPU_KERNEL", "").lower() == "torch"

_lock = threading.Lock()
_ops = None          # torch.ops namespace of the built extension
_build_failed = False


def cache_dir() -> Path:
    root = Path(os.environ.get("SPARSEWISE_CACHE", Path.home() / ".cache" / "sparsewise")).expanduser()
    return root / "cpu_ext"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_identity() -> str:
    path = shutil.which(_compiler())
    if path is None:
        raise RuntimeError(f"no C++ compiler: {_compiler()!r} is not on the PATH (set CXX)")
    banner = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    return f"{path} {banner.splitlines()[0] if banner else ''}"


def _isa_flags() -> list[str]:
    # PyTorch's own runtime detection of this CPU; -march=native would break a cache shared by
    # machines of different generations, so only the flags the kernel uses go in (and in the hash)
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return ["-mavx2", "-mfma"]
    return []


def _build_flags() -> list[str]:
    return ["-O3", "-fopenmp", *_isa_flags()]


def build_hash() -> str:
    """Hash of everything the compiled library depends on (its cache key)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, _compiler_identity(), sys.version, platform.machine(), *_build_flags()):
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()[:16]


def _build():
    from torch.utils import cpp_extension

    key = build_hash()
    namespace = f"sparsewise_cpu_{key}"
    directory = cache_dir() / key
    directory.mkdir(parents=True, exist_ok=True)
    # the objects use OpenMP only through ATen's inline parallel_for; linking -fopenmp resolves
    # libgomp.so.1 to the copy PyTorch already loaded, so both share one thread pool
    cpp_extension.load(name=namespace, sources=[str(SOURCE)], build_directory=str(directory),
                       extra_cflags=[*_build_flags(), f"-DSPARSEWISE_CPU_NS={namespace}"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return getattr(torch.ops, namespace)


def load_extension():
    """The compiled operators (``torch.ops`` namespace), or None when they cannot be built here.

    The first failure warns once and is remembered for the process; later calls return None at once.
    """
    global _ops, _build_failed
    if FORCE_TORCH_FALLBACK:
        return None
    if _ops is not None or _build_failed:
        return _ops
    with _lock:
        if _ops is None and not _build_failed:
            try:
                _ops = _build()
            except Exception as error:  # noqa: BLE001 - any build/load failure means "use the fallback"
                _build_failed = True
                warnings.warn(f"sparsewise: the CPU sparse kernel could not be built ({type(error).__name__}: "
                              f"{str(error).strip()[:500]}); using torch.sparse CSR matmul instead, which is "
                              "usually slower than dense. Install a C++ compiler (g++/clang++, and ninja) to "
                              "get the fast path.", RuntimeWarning, stacklevel=2)
    return _ops


def extension_available() -> bool:
    return load_extension() is not None


# ------------------------------------------------------------------------------- the layout

def compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of a [N, K] weight: (row_ptr int64 [N+1], cols int16/int32 [nnz], values float32 [nnz])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    weight = weight.detach().to("cpu", torch.float32)
    if not torch.isfinite(weight).all():
        raise ValueError("the weight holds NaN or inf; refusing to compress it.")
    n, k = weight.shape
    keep = weight != 0
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    index_dtype = torch.int16 if k <= INT16_MAX_FEATURES else torch.int32
    cols = keep.nonzero()[:, 1].to(index_dtype)  # row-major order: row by row, columns ascending
    values = weight[keep].contiguous()
    return row_ptr, cols.contiguous(), values


def decompress(row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] weight back from its CSR."""
    n = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=row_ptr.device), row_ptr.diff())
    dense = torch.zeros(n, in_features, dtype=dtype, device=values.device)
    dense[rows, cols.long()] = values.to(dtype)
    return dense


def reference_linear(x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """x W^T + b through the decompressed weight, in x's dtype (use float64 for a tight reference)."""
    weight = decompress(row_ptr, cols, values, in_features, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def reference_conv1x1(x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The 1x1 convolution of x [B, C, H, W] through the decompressed weight, in x's dtype."""
    weight = decompress(row_ptr, cols, values, in_features, x.dtype)
    return F.conv2d(x, weight[:, :, None, None], None if bias is None else bias.to(x.dtype))


# ------------------------------------------------------------------------------- the calls

def _torch_csr(row_ptr, cols, values, in_features):
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once by our own warning instead
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_ptr, cols.to(torch.int64), values, size=(row_ptr.numel() - 1, in_features),
                                       check_invariants=False)


def torch_csr_linear(x2d: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The fallback: PyTorch's sparse CSR @ dense (float32, x2d [M, K]) -> [M, N]."""
    out = (_torch_csr(row_ptr, cols, values, in_features) @ x2d.t()).t()
    return (out if bias is None else out + bias).contiguous()


def linear(x2d: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
           bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """y [M, N] = x2d [M, K] W^T + b in float32 (x2d is cast to float32 first)."""
    if x2d.dtype != torch.float32:
        x2d = x2d.float()
    ops = load_extension()
    if ops is None:
        return torch_csr_linear(x2d, row_ptr, cols, values, bias, in_features)
    return ops.csr_linear.default(x2d, row_ptr, cols, values, bias, in_features)


def conv1x1(x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
            bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """Y [B, N, H, W] of a 1x1 convolution (stride 1, no padding) over x [B, C, H, W], in float32."""
    batch, channels, height, width = x.shape
    flat = x.to(torch.float32).reshape(batch, channels, height * width)
    ops = load_extension()
    if ops is None:
        # one CSR product over all images: [C, B*HW] columns
        columns = flat.permute(1, 0, 2).reshape(channels, batch * height * width)
        out = _torch_csr(row_ptr, cols, values, in_features) @ columns
        if bias is not None:
            out = out + bias[:, None]
        out = out.reshape(-1, batch, height * width).permute(1, 0, 2)
    else:
        out = ops.csr_conv1x1.default(flat, row_ptr, cols, values, bias, in_features)
    return out.reshape(batch, -1, height, width).contiguous()
