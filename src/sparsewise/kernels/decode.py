"""Decode-sized sparse linears as PyTorch custom ops: CUDA C++ kernels on the GPU, references elsewhere.

Each op is one ``torch.library.custom_op`` (so CUDA graphs capture it and ``torch.compile``
traces it without a graph break); on CUDA it launches a kernel of ``cuda/sparse_gemv.cu``, on
any other device it computes the same function in PyTorch (what CI tests). ``config`` picks a
compiled variant; :data:`GEMV24_CONFIGS` etc. list the ones that exist.

* ``gemv24``: y = x W^T + b, W 2:4 in :class:`~.layouts.Rows24`, x up to 16 rows per launch.
* ``gemv24_tc``: the same on sparse tensor cores (``mma.sp``; K % 32 == 0), for 4-16 rows.
* ``gemv_bitplanes``: the same for any sparse W in :class:`~.layouts.BitPlanes`.
* ``act_gemv`` / ``act_gemv_bitplanes``: y = (x ⊙ [|x| > t]) W^T + b with W^T stored [K, N]
  (dense, or bit planes along N), skipping every input that no row of x keeps (TEAL-style
  activation sparsity, Liu et al. 2024): the time falls with the activation sparsity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layouts import BitPlanes, Rows24, unpack_bitplanes, unpack_rows24

# (rows of x per pass, weight rows per block, warps per block, fp16x2 partial sums) -- as compiled
GEMV24_CONFIGS = ((1, 4, 4, 0), (1, 8, 4, 0), (1, 4, 8, 0), (1, 2, 4, 0), (1, 8, 2, 0), (2, 4, 4, 0), (2, 2, 4, 0),
                  (2, 4, 4, 1), (4, 4, 4, 1), (4, 2, 4, 1), (4, 2, 4, 0), (8, 2, 4, 1), (8, 1, 4, 1))
# (weight row tiles of 16 per warp, x row tiles of 8, warps per block): sparse tensor cores (mma.sp)
GEMV24_TC_CONFIGS = ((1, 1, 4), (2, 1, 4), (1, 1, 8), (2, 1, 8), (1, 2, 4), (2, 2, 4))
BITPLANES_CONFIGS = ((1, 4, 4), (1, 2, 4), (1, 1, 4), (1, 2, 8), (2, 4, 4), (2, 2, 4), (4, 2, 4), (8, 1, 4))
ACT_ROWS = (1, 2, 4)  # rows of x one activation-sparse launch serves (over a dense W^T)
ACT_BITPLANES_ROWS = (1, 2)  # over a bit-plane W^T (shared memory)
ACT_MAX_KPER = 512  # inputs one block compacts (shared-memory list in the kernel)
ACT_THREADS = 256
MAX_ROWS = 16  # the GEMV ops run x rows in passes of the config's row count; beyond this use GEMMs
_SOURCE = "sparse_gemv.cu"
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1, k)
    return flat if flat.is_contiguous() and flat.data_ptr() % 16 == 0 else flat.contiguous()


def _module(x: torch.Tensor):
    from . import cuda

    return cuda.module(_SOURCE, x.device)


def _check_dtype(x: torch.Tensor, weight_values: torch.Tensor) -> str:
    if x.dtype not in _DTYPES or weight_values.dtype != x.dtype:
        raise TypeError(f"the CUDA sparse kernels take fp16 or bf16 x and weights of the same dtype, got "
                        f"x {x.dtype}, weight {weight_values.dtype}; cast the model with .half() or .bfloat16().")
    return _DTYPES[x.dtype]


def default_gemv24_config(rows: int) -> tuple[int, int, int, int]:
    return {1: (1, 4, 4, 0), 2: (2, 4, 4, 0)}.get(rows, (4, 2, 4, 1) if rows <= 4 else (8, 2, 4, 1))


def default_bitplanes_config(rows: int) -> tuple[int, int, int]:
    return {1: (1, 4, 4), 2: (2, 2, 4)}.get(rows, (4, 2, 4) if rows <= 4 else (8, 1, 4))


# ------------------------------------------------------------------------------------------ 2:4 GEMV
@torch.library.custom_op("sparsewise::gemv24", mutates_args=())
def gemv24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, n_out: int,
           config: list[int], thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """``thresholds`` (fp32 [K], optional): only inputs with |x_k| > thresholds[k] count (activation
    sparsity applied inside the kernel, so 2:4 weights and TEAL thresholds cost one launch)."""
    k = values.shape[1] * 2
    if not x.is_cuda:
        if thresholds is not None:
            x = torch.where(x.abs().float() > thresholds.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))
        return reference_gemv24(x, Rows24(values, meta, (n_out, k)), bias)
    name = _check_dtype(x, values)
    mr, rows, warps, acc16 = config
    flat = _rows(x, k)
    m = flat.shape[0]
    y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    suffix = ("_h" if acc16 else "") + ("_t" if thresholds is not None else "")
    kernel = _module(x).kernel(f"gemv24_{name}_m{mr}_r{rows}_w{warps}{suffix}", "ppppppiii")
    kernel((-(-n_out // rows), -(-m // mr), 1), 32 * warps, flat, values, meta, bias, thresholds, y, m, n_out, k)
    return y.reshape(*x.shape[:-1], n_out)


@gemv24.register_fake
def _(x, values, meta, bias, n_out, config, thresholds=None):
    return x.new_empty(*x.shape[:-1], n_out)


def reference_gemv24(x: torch.Tensor, layout: Rows24, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, unpack_rows24(layout).to(x.dtype), None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("sparsewise::gemv24_tc", mutates_args=())
def gemv24_tc(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, n_out: int,
              config: list[int], thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gemv24` on sparse tensor cores: the Rows24 layout is mma.sp's own operand format."""
    k = values.shape[1] * 2
    if not x.is_cuda:
        return gemv24(x, values, meta, bias, n_out, [1, 4, 4, 0], thresholds)
    if k % 32:
        raise ValueError(f"the tensor-core 2:4 kernel needs K divisible by 32, got {k}; use gemv24.")
    name = _check_dtype(x, values)
    row_tiles, x_tiles, warps = config
    flat = _rows(x, k)
    m = flat.shape[0]
    y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    suffix = "_t" if thresholds is not None else ""
    kernel = _module(x).kernel(f"gemv24tc_{name}_r{row_tiles}_n{x_tiles}_w{warps}{suffix}", "ppppppiii")
    kernel((-(-n_out // (16 * row_tiles)), -(-m // (8 * x_tiles)), 1), 32 * warps, flat, values, meta, bias,
           thresholds, y, m, n_out, k)
    return y.reshape(*x.shape[:-1], n_out)


@gemv24_tc.register_fake
def _(x, values, meta, bias, n_out, config, thresholds=None):
    return x.new_empty(*x.shape[:-1], n_out)


# ------------------------------------------------------------------------------------ bitmask GEMV
@torch.library.custom_op("sparsewise::gemv_bitplanes", mutates_args=())
def gemv_bitplanes(x: torch.Tensor, values: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor,
                   bias: torch.Tensor | None, n_out: int, k: int, config: list[int]) -> torch.Tensor:
    if not x.is_cuda:
        return reference_gemv_bitplanes(x, BitPlanes(values, words, offsets, (n_out, k)), bias)
    name = _check_dtype(x, values)
    mr, rows, warps = config
    flat = _rows(x, k)
    m = flat.shape[0]
    y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    kernel = _module(x).kernel(f"gemvbm_{name}_m{mr}_r{rows}_w{warps}", "ppppppiiii")
    kernel((-(-n_out // rows), -(-m // mr), 1), 32 * warps, flat, values, words, offsets, bias, y, m, n_out, k,
           offsets.shape[1])
    return y.reshape(*x.shape[:-1], n_out)


@gemv_bitplanes.register_fake
def _(x, values, words, offsets, bias, n_out, k, config):
    return x.new_empty(*x.shape[:-1], n_out)


def reference_gemv_bitplanes(x: torch.Tensor, layout: BitPlanes, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, unpack_bitplanes(layout).to(x.dtype), None if bias is None else bias.to(x.dtype))


# ------------------------------------------------------------------------------ activation sparsity
def act_splits(k: int, n_out: int, requested: int = 0) -> int:
    """K splits of an activation-sparse launch: enough blocks for ~4 per SM of an H200-class GPU
    (132 SMs), at least ceil(K / ACT_MAX_KPER) (what one block compacts)."""
    least = -(-k // ACT_MAX_KPER)
    if requested:
        return max(requested, least)
    column_blocks = -(-n_out // 256)
    return max(least, min(-(-k // 64), -(-528 // column_blocks)))


def _act_launch(x, thresholds, bias, n_out, k, splits, name_of, weight_args, signature, row_counts):
    name = _check_dtype(x, weight_args[0])
    flat = _rows(x, k)
    m = flat.shape[0]
    if m > row_counts[-1]:  # more rows than one launch serves: one launch per slice of rows
        parts = [_act_launch(part, thresholds, bias, n_out, k, splits, name_of, weight_args, signature, row_counts)
                 for part in flat.split(row_counts[-1])]
        return torch.cat(parts).reshape(*x.shape[:-1], n_out)
    mr = next(r for r in row_counts if r >= m)
    splits = act_splits(k, n_out, splits)
    kper = -(-k // splits)
    splits = -(-k // kper)
    y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    partial = torch.empty(splits, m, n_out, device=x.device, dtype=torch.float32) if splits > 1 else None
    module = _module(x)
    kernel = module.kernel(name_of(name, mr), signature)
    kernel((-(-n_out // 256), splits, 1), ACT_THREADS, flat, thresholds, *weight_args, bias, y, partial, m, n_out, k, kper)
    if partial is not None:
        module.kernel(f"splitsum_{name}", "pppiii")((-(-(m * n_out) // 256), 1, 1), 256, partial, bias, y, m, n_out,
                                                    splits)
    return y.reshape(*x.shape[:-1], n_out)


@torch.library.custom_op("sparsewise::act_gemv", mutates_args=())
def act_gemv(x: torch.Tensor, thresholds: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
             splits: int) -> torch.Tensor:
    k, n_out = weight_t.shape
    if not x.is_cuda:
        return reference_act_gemv(x, thresholds, weight_t, bias)
    if n_out % 8:
        raise ValueError(f"the activation-sparse kernel needs N divisible by 8, got {n_out}.")
    return _act_launch(x, thresholds, bias, n_out, k, splits, lambda name, mr: f"actdense_{name}_m{mr}",
                       (weight_t,), "ppppppiiii", ACT_ROWS)


@act_gemv.register_fake
def _(x, thresholds, weight_t, bias, splits):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


@torch.library.custom_op("sparsewise::act_gemv_bitplanes", mutates_args=())
def act_gemv_bitplanes(x: torch.Tensor, thresholds: torch.Tensor, values: torch.Tensor, words: torch.Tensor,
                       offsets_t: torch.Tensor, bias: torch.Tensor | None, n_out: int, splits: int) -> torch.Tensor:
    """``values``/``words`` of :func:`~.layouts.pack_bitplanes` (W^T), ``offsets_t`` its offsets transposed [T, K]."""
    k = words.shape[0]
    if not x.is_cuda:
        weight_t = unpack_bitplanes(BitPlanes(values, words, offsets_t.t(), (k, n_out)))
        return reference_act_gemv(x, thresholds, weight_t, bias)
    return _act_launch(x, thresholds, bias, n_out, k, splits, lambda name, mr: f"actbm_{name}_m{mr}",
                       (values, words, offsets_t), "ppppppppiiii", ACT_BITPLANES_ROWS)


@act_gemv_bitplanes.register_fake
def _(x, thresholds, values, words, offsets_t, bias, n_out, splits):
    return x.new_empty(*x.shape[:-1], n_out)


def reference_act_gemv(x: torch.Tensor, thresholds: torch.Tensor, weight_t: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x ⊙ [|x| > t]) W^T + b with W^T given [K, N]."""
    kept = torch.where(x.abs().float() > thresholds.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return F.linear(kept, weight_t.t().to(x.dtype), None if bias is None else bias.to(x.dtype))
