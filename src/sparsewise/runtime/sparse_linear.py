"""SparseLinear: a pruned nn.Linear held compressed on the GPU, served by the fastest backend.

Backends (chosen per call by the row count M, from the measured dispatch table):
  * ``planes``: the Triton kernels over the planes layouts (2:4 or bitmask), M <= 64;
  * ``cusparselt``: 2:4 sparse tensor cores with plans cached per M (kept only when
    ``prefill=True``: it holds a second compressed copy, ~0.56x dense);
  * ``dense``: cuBLAS on a kept dense weight (only with ``keep_dense=True``);
  * ``decompress``: rebuild the dense weight for the call, then cuBLAS (always possible);
  * on CPU (and in CI) the PyTorch reference: the same decompression, so results agree.
The compressed tensors are buffers (``state_dict``, ``.to()`` work; a move drops the
cuSPARSELt copy, which is device-bound). The forward is one custom op
(``sparsewise::sparse_linear``), so ``torch.compile`` traces a model of SparseLinears without
graph breaks, and nothing in the hot path reads device memory back to the host, so CUDA graphs
capture it (run each shape once first: the first call compiles kernels and builds plans).
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PatternError
from ..kernels.layouts import NM24, Bitmask, pack_24, pack_unstructured, unpack
from . import dispatch

PLANES_MAX_ROWS = 64
_LAYERS: weakref.WeakValueDictionary[int, SparseLinear] = weakref.WeakValueDictionary()
_IDS = itertools.count()


def weight_kind(weight: torch.Tensor) -> str:
    """"24" when every group of 4 inputs holds at most 2 nonzeros, else "bitmask"."""
    if weight.shape[1] % 4 == 0 and int((weight.reshape(-1, 4) != 0).sum(-1).max()) <= 2:
        return "24"
    return "bitmask"


def default_choice(kind: str, rows: int, *, has_cslt: bool, has_dense: bool, width: int, on_cuda: bool) -> dict:
    if not on_cuda:
        return {"backend": "decompress"}
    if rows <= 4:
        return {"backend": "planes", "use_dot": False, "xselect": kind == "24", "split_k": 4, "config": [16, 4, 1]}
    if has_dense:  # untuned: the kept dense copy is never slower than a guess
        return {"backend": "dense"}
    if kind == "24" and has_cslt and rows >= 16:
        return {"backend": "cusparselt"}
    if rows <= PLANES_MAX_ROWS and width >= 16:
        return {"backend": "planes", "use_dot": True, "xselect": False, "split_k": 4, "config": [32, 4, 2]}
    return {"backend": "decompress"}


# Launch configs (BLOCK_N, warps, stages) that compile without spills for sm_90 (checked on the
# CPU machine with Triton's ptxas). Stages 1: plain loads (the configs that won LLaMA-3-8B shapes
# on the H200, benchmarks/RESULTS.md); stages 3: the K loop software-pipelined through cp.async
# (16-byte copies for 2:4), more bytes in flight per SM. 64/128-row blocks never won; tensor
# cores with 3 stages need 232+ KB of shared memory at 64 rows (over sm_90's limit).
_FMA_CONFIGS = {"24": ([16, 4, 1], [32, 4, 1], [16, 4, 3], [32, 4, 3], [16, 2, 3]),
                "bitmask": ([16, 4, 1], [32, 8, 1], [16, 4, 3], [32, 8, 3])}
_DOT_CONFIGS = ([32, 4, 2],)
_SPLITS = (1, 2, 4, 8)


def planes_choices(kind: str, rows: int, width: int, tiles: int) -> list[dict]:
    """Every Triton planes launch worth timing for ``rows`` activation rows: CUDA-core paths up to
    4 rows (x-select for 2:4), tensor cores from 2 rows (width-16 layouts), each with K split
    over 1-8 programs (only splits that divide the tile count, as the kernel does)."""
    if rows > PLANES_MAX_ROWS:
        return []
    splits = sorted({max(d for d in range(1, min(s, tiles) + 1) if tiles % d == 0) for s in _SPLITS})
    shapes = []
    if rows <= 4:
        shapes += [{"use_dot": False, "xselect": kind == "24", "config": c} for c in _FMA_CONFIGS[kind]]
    if rows >= 2 and width >= 16:
        shapes += [{"use_dot": True, "xselect": False, "config": c} for c in _DOT_CONFIGS]
    return [{"backend": "planes", **shape, "split_k": split} for split in splits for shape in shapes]


@torch.library.custom_op("sparsewise::sparse_linear", mutates_args=())
def _sparse_linear_op(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    layer = _LAYERS[layer_id]
    return layer.run(x, layer.choice(x.numel() // layer.in_features))


@_sparse_linear_op.register_fake
def _(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    layer = _LAYERS[layer_id]
    return x.new_empty(*x.shape[:-1], layer.out_features)


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored compressed (planes layout); see the module docstring."""

    def __init__(self, layout: NM24 | Bitmask, bias: torch.Tensor | None, *, cslt=None,
                 dense_weight: torch.Tensor | None = None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = layout.shape
        self.kind = "24" if isinstance(layout, NM24) else "bitmask"
        self.width = layout.width
        self.register_buffer("values", layout.values)
        self.register_buffer("meta", layout.meta)
        self.register_buffer("tile_offsets", layout.tile_offsets if isinstance(layout, Bitmask) else None)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("dense_weight", dense_weight)
        self.cslt = cslt
        self.dtype = dtype
        self._choices: dict[int, dict] = {}
        self.layer_id = next(_IDS)
        _LAYERS[self.layer_id] = self

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, keep_dense: bool = False, prefill: bool = True,
                    device: torch.device | str | None = None) -> SparseLinear:
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        # the packers validate (2-D, finite) and pack_24 refuses anything that is not 2:4
        try:
            layout = pack_24(weight)
        except PatternError:
            layout = pack_unstructured(weight)
        cslt = None
        if isinstance(layout, NM24) and prefill and weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
            from ..kernels import cusparselt

            n, k = weight.shape
            if cusparselt.available() and n % 16 == 0 and k % 16 == 0:
                cslt = cusparselt.CsltLinear(weight)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.device)
        return cls(layout, bias, cslt=cslt, dense_weight=weight.clone() if keep_dense else None, dtype=weight.dtype)

    @property
    def layout(self) -> NM24 | Bitmask:
        shape = (self.out_features, self.in_features)
        if self.kind == "24":
            return NM24(self.values, self.meta, shape, self.width)
        return Bitmask(self.values, self.meta, self.tile_offsets, shape, self.width)

    @property
    def device(self) -> torch.device:
        return self.meta.device

    @property
    def weight_nbytes(self) -> int:
        """Bytes this layer holds for its weight (all copies), to compare with the dense size."""
        total = self.layout.nbytes
        if self.cslt is not None:
            total += self.cslt.nbytes
        if self.dense_weight is not None:
            total += self.dense_weight.numel() * self.dense_weight.element_size()
        return total

    @property
    def dispatch_key(self) -> str:
        return dispatch.shape_key(self.kind, self.out_features, self.in_features, self.values.dtype)

    def _apply(self, fn, recurse=True):
        # a move or cast invalidates what is bound to the old device/dtype: cuSPARSELt's copy and plans
        super()._apply(fn, recurse)
        if self.cslt is not None and (self.cslt.device != self.device or self.cslt.dtype != self.values.dtype):
            self.cslt = None
        self.dtype = self.values.dtype
        self._choices.clear()
        return self

    def choice(self, rows: int) -> dict:
        size = dispatch.bucket(rows)
        chosen = self._choices.get(size)
        if chosen is None:
            if self.device.type == "cuda":
                chosen = dispatch.table_for(self.device).get(self.dispatch_key, rows)
            if chosen is None or not self._can_run(chosen, size):
                chosen = default_choice(self.kind, size, has_cslt=self.cslt is not None,
                                        has_dense=self.dense_weight is not None, width=self.width,
                                        on_cuda=self.device.type == "cuda")
            self._choices[size] = chosen
        return chosen

    def _can_run(self, choice: dict, rows: int) -> bool:
        backend = choice.get("backend")
        if backend == "cusparselt":
            return self.cslt is not None
        if backend == "dense":
            return self.dense_weight is not None
        if backend == "planes":
            return rows <= PLANES_MAX_ROWS and (not choice.get("use_dot") or self.width >= 16)
        return backend == "decompress"

    def run(self, x: torch.Tensor, choice: dict) -> torch.Tensor:
        backend = choice["backend"]
        if backend == "planes":
            from ..kernels import triton_planes

            config = choice.get("config")
            return triton_planes.linear(x, self.layout, self.bias, split_k=choice.get("split_k", 1),
                                        use_dot=choice.get("use_dot"), xselect=choice.get("xselect"),
                                        config=None if config is None else tuple(config))
        if backend == "cusparselt":
            return self.cslt(x, self.bias, transposed=choice.get("transposed", False))
        if backend == "dense":
            return F.linear(x, self.dense_weight, self.bias)
        if self.device.type == "cuda":  # one Triton pass over the compressed bytes
            from ..kernels import triton_planes

            return F.linear(x, triton_planes.unpack(self.layout).to(x.dtype), self.bias)
        return F.linear(x, unpack(self.layout).to(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs with {self.in_features} features, got {x.shape[-1]}.")
        return _sparse_linear_op(x, self.layer_id)

    def __setstate__(self, state):
        # deep copies and unpickled modules get their own id (the op finds its layer by id)
        super().__setstate__(state)
        self.layer_id = next(_IDS)
        _LAYERS[self.layer_id] = self

    def extra_repr(self) -> str:
        extra = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"kind={self.kind}",
                 f"bias={self.bias is not None}"]
        if self.cslt is not None:
            extra.append("cusparselt")
        if self.dense_weight is not None:
            extra.append("dense kept")
        return ", ".join(extra)
