"""CpuSparseLinear: a pruned linear or 1x1 convolution computed on the CPU from its CSR weight.

    linear:     y[..., n] = b[n] + sum_{k: W[n, k] != 0} W[n, k] x[..., k]
    1x1 conv:   Y[b, n, h, w] = bias[n] + sum_{c: W[n, c] != 0} W[n, c] X[b, c, h, w]

Only the nonzeros are stored and multiplied (CSR per output row, see
:mod:`sparsewise.kernels.cpu_sparse`), vectorised across the rows of x or the H*W positions as in
Elsen et al. 2020, "Fast Sparse ConvNets". Whether that beats dense PyTorch depends on the shape,
the sparsity and the row count: :func:`measure_speedup` times both on this machine, so a caller
can keep a layer dense where sparse does not win. The forward is one custom op per kind
(``sparsewise::cpu_sparse_linear``, ``sparsewise::cpu_sparse_conv1x1``), so ``torch.compile``
traces through it without graph breaks. Inference only (no autograd through the op).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..kernels import cpu_sparse
from ..models.adapters import _is_conv1d

_COMPRESSED = ("row_ptr", "cols", "values")


def _linear(x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
            bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """x [..., K] W^T + b for a CSR weight; computed in float32, returned in x's dtype."""
    if x.dim() == 2:  # the common case, without the reshapes (each costs microseconds of Python)
        out = cpu_sparse.linear(x, row_ptr, cols, values, bias, in_features)
    else:
        out = cpu_sparse.linear(x.reshape(-1, in_features), row_ptr, cols, values, bias, in_features)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _conv1x1(x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
             bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The 1x1 convolution of x [B, C, H, W] with a CSR weight [N, C]; returned in x's dtype."""
    out = cpu_sparse.conv1x1(x, row_ptr, cols, values, bias, in_features)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# Eager forwards call _linear/_conv1x1 directly: the custom-op wrapper costs ~20 us of Python per
# call, more than the whole kernel for small layers. Traced/compiled code goes through the ops.
cpu_sparse_linear = torch.library.custom_op("sparsewise::cpu_sparse_linear", _linear, mutates_args=())
cpu_sparse_conv1x1 = torch.library.custom_op("sparsewise::cpu_sparse_conv1x1", _conv1x1, mutates_args=())


@cpu_sparse_linear.register_fake
def _(x, row_ptr, cols, values, bias, in_features):
    return x.new_empty(*x.shape[:-1], row_ptr.shape[0] - 1)


@cpu_sparse_conv1x1.register_fake
def _(x, row_ptr, cols, values, bias, in_features):
    return x.new_empty(x.shape[0], row_ptr.shape[0] - 1, x.shape[2], x.shape[3])


def _conv_refusal(conv: nn.Conv2d) -> str | None:
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    if (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and padding in ((0, 0), "valid")):
        return None
    return (f"CpuSparseLinear serves only 1x1 convolutions with stride 1, padding 0 and groups 1; got "
            f"kernel_size={tuple(conv.kernel_size)}, stride={tuple(conv.stride)}, padding={padding}, "
            f"groups={conv.groups}. Keep this layer as a dense nn.Conv2d (or, for a strided 1x1, subsample "
            f"the input first and convert a stride-1 copy).")


class CpuSparseLinear(nn.Module):
    """A pruned ``nn.Linear`` / transformers ``Conv1D`` / 1x1 ``nn.Conv2d`` with its weight in CSR.

    Buffers (in ``state_dict``): ``row_ptr`` int64 [N+1], ``cols`` int16 (K <= 32767) or int32
    [nnz], ``values`` float32 [nnz], ``bias`` float32 [N] or None, ``dims`` int64 [out, in,
    is_conv]; loading a state_dict adopts its sparsity and shape. Inputs of any float dtype are
    computed in float32 and returned in their own dtype; the values stay float32 under
    ``.half()`` / ``.to(dtype)``. Build one with :meth:`from_module`.
    """

    def __init__(self, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 bias: torch.Tensor | None, in_features: int, *, conv: bool = False):
        super().__init__()
        self.in_features = int(in_features)
        self.conv = bool(conv)
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("cols", cols)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", torch.float32).contiguous())
        # what the compressed tensors cannot say, saved with them so a state_dict describes the layer
        self.register_buffer("dims", torch.tensor([row_ptr.numel() - 1, self.in_features, int(self.conv)]))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, conv: bool = False
                    ) -> CpuSparseLinear:
        """From a dense [out, in] weight (zeros are pruned entries) and an optional [out] bias."""
        row_ptr, cols, values = cpu_sparse.compress(weight)
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
        return cls(row_ptr, cols, values, bias, weight.shape[1], conv=conv)

    @classmethod
    def from_module(cls, module: nn.Module) -> CpuSparseLinear:
        """From an ``nn.Linear``, a transformers ``Conv1D`` (weight stored [in, out]) or a 1x1,
        stride-1, unpadded, ungrouped ``nn.Conv2d``; raises ValueError for anything else."""
        if _is_conv1d(module):
            weight, conv = module.weight.detach().t(), False
        elif isinstance(module, nn.Linear):
            weight, conv = module.weight.detach(), False
        elif isinstance(module, nn.Conv2d):
            refusal = _conv_refusal(module)
            if refusal:
                raise ValueError(refusal)
            weight, conv = module.weight.detach()[:, :, 0, 0], True
        else:
            raise ValueError(f"CpuSparseLinear.from_module takes an nn.Linear, a transformers Conv1D or a 1x1 "
                             f"nn.Conv2d; got {type(module).__name__}. Leave this module dense.")
        if not weight.dtype.is_floating_point:
            raise ValueError(f"the weight is {weight.dtype} (quantized?); CpuSparseLinear needs a float weight.")
        bias = getattr(module, "bias", None)
        return cls.from_weight(weight, None if bias is None else bias.detach(), conv=conv)

    @property
    def out_features(self) -> int:
        return self.row_ptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        """Stored nonzeros over out * in."""
        return self.nnz / max(1, self.out_features * self.in_features)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight (row pointers + column indices + values)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _COMPRESSED)

    def dense_weight(self) -> torch.Tensor:
        """The dense float32 weight, [out, in] (or [out, in, 1, 1] for a convolution)."""
        weight = cpu_sparse.decompress(self.row_ptr, self.cols, self.values, self.in_features)
        return weight[:, :, None, None] if self.conv else weight

    def to_dense_module(self) -> nn.Linear | nn.Conv2d:
        """An equivalent dense float32 ``nn.Linear`` (or 1x1 ``nn.Conv2d``)."""
        has_bias = self.bias is not None
        dense = (nn.Conv2d(self.in_features, self.out_features, 1, bias=has_bias) if self.conv
                 else nn.Linear(self.in_features, self.out_features, bias=has_bias))
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if has_bias:
                dense.bias.copy_(self.bias)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"CpuSparseLinear computes on the CPU; got an input on {x.device} "
                             "(use sparsewise.runtime.SparseLinear for CUDA).")
        if not x.dtype.is_floating_point:
            raise ValueError(f"CpuSparseLinear expects a float input, got {x.dtype}.")
        if self.conv:
            unbatched = x.dim() == 3
            if unbatched:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != self.in_features:
                raise ValueError(f"expected [B, {self.in_features}, H, W] (or unbatched [C, H, W]), "
                                 f"got {tuple(x.shape)}.")
            op = cpu_sparse_conv1x1 if torch.compiler.is_compiling() else _conv1x1
            out = op(x, self.row_ptr, self.cols, self.values, self.bias, self.in_features)
            return out.squeeze(0) if unbatched else out
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}.")
        op = cpu_sparse_linear if torch.compiler.is_compiling() else _linear
        return op(x, self.row_ptr, self.cols, self.values, self.bias, self.in_features)

    def _apply(self, fn, recurse=True):
        # the kernel reads float32 values: a model-wide .half()/.to(bf16) must not cast them
        super()._apply(fn, recurse)
        for name in ("values", "bias"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.dtype != torch.float32:
                setattr(self, name, tensor.float())
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # nnz (and the index width) belong to the saved weight, not to this instance: adopt them
        for name in (*_COMPRESSED, "bias"):
            key = prefix + name
            if key in state_dict and state_dict[key] is not None:
                current = getattr(self, name)
                incoming = state_dict[key]
                if current is None or current.shape != incoming.shape or current.dtype != incoming.dtype:
                    setattr(self, name, torch.empty_like(incoming, device="cpu"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "dims" in state_dict:
            _, self.in_features, conv = (int(v) for v in state_dict[prefix + "dims"])
            self.conv = bool(conv)

    def extra_repr(self) -> str:
        kind = "conv1x1" if self.conv else "linear"
        return (f"{kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density:.3f}, bias={self.bias is not None}")


def interleaved_samples(calls: dict[str, Callable[[], object]], repeats: int = 15, min_sample_s: float = 0.002,
                        warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` samples each, taken in turn (A B A B ...).

    Each sample times enough back-to-back calls to last ``min_sample_s``; alternating the
    callables exposes them to the same machine noise (other tenants, frequency changes).
    """
    batch = {}
    for name, fn in calls.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        batch[name] = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / batch[name])
    return samples


def relative_spread(times: list[float]) -> float:
    """Interquartile range over the median: how much a timing moved while it was sampled."""
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return (quartiles[2] - quartiles[0]) / quartiles[1]


def steadiest_samples(calls: dict[str, Callable[[], object]], repeats: int = 15, min_sample_s: float = 0.002,
                      warmup: int = 3, attempts: int = 3, max_spread: float = 0.25
                      ) -> tuple[dict[str, list[float]], float]:
    """:func:`interleaved_samples`, taken again (up to ``attempts`` times) while the interquartile
    spread of any callable exceeds ``max_spread``; returns the steadiest samples and their spread.

    On a shared machine whole stretches of time run slower (a descheduled virtual CPU stalls
    every multi-threaded call for milliseconds); medians alone do not survive such a stretch.
    """
    best, best_spread = {}, float("inf")
    for _ in range(max(1, attempts)):
        samples = interleaved_samples(calls, repeats, min_sample_s, warmup)
        spread = max(relative_spread(times) for times in samples.values())
        if spread < best_spread:
            best, best_spread = samples, spread
        if spread <= max_spread:
            break
    return best, best_spread


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int = 15, min_sample_s: float = 0.002,
                        warmup: int = 3, attempts: int = 3) -> dict[str, float]:
    """Median seconds per call of each callable, from :func:`steadiest_samples`."""
    samples, _ = steadiest_samples(calls, repeats, min_sample_s, warmup, attempts)
    return {name: statistics.median(times) for name, times in samples.items()}


def measure_speedup(module: nn.Module, rows: int, repeats: int = 15, *, spatial: tuple[int, int] | None = None,
                    seed: int = 0) -> float:
    """Dense time over sparse time (> 1: CpuSparseLinear is faster) for one layer on this CPU.

    ``module``: a pruned dense layer (anything :meth:`CpuSparseLinear.from_module` takes) or a
    CpuSparseLinear (then compared with its decompressed twin). ``rows``: the rows of x for a
    linear, the batch for a 1x1 convolution, whose ``spatial`` (H, W) must be given. Random
    normal inputs, interleaved medians of ``repeats`` samples at the current thread count
    (retaken when unsteady). The weight stays in cache between calls, as when one layer is timed
    alone; in a whole model it streams from memory, which mostly favours the smaller sparse weight
    (benchmarks/cpu_sparse.py, "cold"). On a shared VM, multi-threaded timings can swing by
    milliseconds per call for seconds at a time: measure with the thread count you will run.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}.")
    if isinstance(module, CpuSparseLinear):
        sparse, dense = module, module.to_dense_module()
        conv = module.conv
    else:
        sparse, dense = CpuSparseLinear.from_module(module), module
        conv = sparse.conv
    weight = next((p for p in dense.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if weight is None else weight.dtype
    generator = torch.Generator().manual_seed(seed)
    if conv:
        if spatial is None:
            raise ValueError("measure_speedup needs spatial=(H, W) for a 1x1 convolution.")
        shape = (rows, sparse.in_features, *spatial)
    else:
        shape = (rows, sparse.in_features)
    x = torch.randn(shape, generator=generator).to(dtype)
    with torch.inference_mode():
        medians = interleaved_medians({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats=repeats)
    return medians["dense"] / medians["sparse"]
