"""SparseLinear: a pruned nn.Linear held compressed on the GPU, served by the fastest backend.

Layouts (:mod:`sparsewise.kernels.layouts`): 2:4 weights whose K is a multiple of 16 are kept as
:class:`Rows24` (values + 4-bit positions, 0.5625x of fp16), every other sparse weight as
:class:`BitPlanes` (values + 1 bit per weight + tile offsets, ~0.57x at 50%). Backends, chosen
per call by the row count M (the measured dispatch table, else :func:`default_choice`):
  * ``gemv``: the CUDA C++ decode kernels (:mod:`sparsewise.kernels.decode`), M <= 16;
  * ``gemv_tc``: 2:4 on sparse tensor cores (``mma.sp`` over the same layout), M <= 16;
  * ``cusparselt``: 2:4 sparse tensor cores, plans cached per M, algorithm ids searched per
    (shape, M bucket) by ``tune`` (a second compressed copy, +0.56x of dense, kept only where a
    served row count chose it or for prefill);
  * ``decompress``: rebuild the dense weight for the call, then cuBLAS (always possible);
  * on CPU (and in CI) the PyTorch reference of the same layouts.
The compressed tensors are buffers (``state_dict``, ``.to()`` work; a move drops the cuSPARSELt
copy, which is device-bound). The forward is one custom op (``sparsewise::sparse_linear``) so
``torch.compile`` traces it without graph breaks, and nothing in the hot path reads device
memory back to the host, so CUDA graphs capture it.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PatternError
from ..kernels import decode
from ..kernels.layouts import BitPlanes, Rows24, pack_bitplanes, pack_rows24, unpack_bitplanes, unpack_rows24
from . import dispatch

_LAYERS: weakref.WeakValueDictionary[int, SparseLinear] = weakref.WeakValueDictionary()
_IDS = itertools.count()


def weight_kind(weight: torch.Tensor) -> str:
    """"24" when every group of 4 inputs holds at most 2 nonzeros (and K % 16 == 0, what the 2:4
    kernel reads), else "bitmask"."""
    if weight.shape[1] % 16 == 0 and int((weight.reshape(-1, 4) != 0).sum(-1).max()) <= 2:
        return "24"
    return "bitmask"


def default_choice(kind: str, rows: int, *, has_cslt: bool, on_cuda: bool, tensor_cores: bool = True) -> dict:
    """What serves ``rows`` rows without a measured entry: the decode kernel up to 16 rows,
    cuSPARSELt for longer 2:4 inputs when its copy is kept, else decompression."""
    if not on_cuda:
        return {"backend": "decompress"}
    if rows <= decode.MAX_ROWS:
        if kind == "24" and rows > 4 and tensor_cores:  # CUDA cores run out of instructions from ~8 rows
            return {"backend": "gemv_tc", "config": [1, 1 if rows <= 8 else 2, 4]}
        config = decode.default_gemv24_config(rows) if kind == "24" else decode.default_bitplanes_config(rows)
        return {"backend": "gemv", "config": list(config)}
    if kind == "24" and has_cslt:
        return {"backend": "cusparselt"}
    return {"backend": "decompress"}


def gemv_choices(kind: str, rows: int) -> list[dict]:
    """Every compiled decode-kernel variant worth timing for ``rows`` rows: passes of the
    variant's row count, no more than two passes."""
    if rows > decode.MAX_ROWS:
        return []
    configs = decode.GEMV24_CONFIGS if kind == "24" else decode.BITPLANES_CONFIGS
    found = [{"backend": "gemv", "config": list(c)} for c in configs if c[0] <= rows < 3 * c[0] or (rows == 1 and c[0] == 1)]
    if kind == "24" and rows >= 2:
        found += [{"backend": "gemv_tc", "config": list(c)} for c in decode.GEMV24_TC_CONFIGS
                  if rows <= 8 * c[1] and (c[1] == 1 or rows > 8)]
    return found


@torch.library.custom_op("sparsewise::sparse_linear", mutates_args=())
def _sparse_linear_op(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    layer = _LAYERS[layer_id]
    return layer.run(x, layer.choice(x.numel() // layer.in_features))


@_sparse_linear_op.register_fake
def _(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    layer = _LAYERS[layer_id]
    return x.new_empty(*x.shape[:-1], layer.out_features)


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored compressed; see the module docstring."""

    def __init__(self, layout: Rows24 | BitPlanes, bias: torch.Tensor | None, *, cslt=None):
        super().__init__()
        self.out_features, self.in_features = layout.shape
        self.kind = "24" if isinstance(layout, Rows24) else "bitmask"
        self.register_buffer("values", layout.values)
        self.register_buffer("meta", layout.meta if isinstance(layout, Rows24) else None)
        self.register_buffer("words", layout.words if isinstance(layout, BitPlanes) else None)
        self.register_buffer("tile_offsets", layout.offsets if isinstance(layout, BitPlanes) else None)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.cslt = cslt
        self._choices: dict[int, dict] = {}
        self.layer_id = next(_IDS)
        _LAYERS[self.layer_id] = self

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, pattern: str | None = None, cusparselt: bool = False,
                    device: torch.device | str | None = None) -> SparseLinear:
        """``pattern``: the pruning record's pattern ("2:4" -> the 2:4 layout, anything else -> bit
        planes); None: 2:4 when the weight is 2:4 (and K % 16 == 0), else bit planes.
        ``cusparselt``: also keep a cuSPARSELt copy of a 2:4 fp16/bf16 CUDA weight (+0.56x)."""
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        layout = None
        if pattern in (None, "2:4") and weight.shape[1] % 16 == 0:
            try:  # the packers validate (2-D, finite); pack_rows24 refuses anything that is not 2:4
                layout = pack_rows24(weight)
            except PatternError:
                if pattern == "2:4":
                    raise
        if layout is None:
            layout = pack_bitplanes(weight)
        cslt = None
        if isinstance(layout, Rows24) and cusparselt and weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
            from ..kernels import cusparselt as cslt_kernels

            if cslt_kernels.available() and weight.shape[0] % 16 == 0:
                cslt = cslt_kernels.CsltLinear(weight)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.device)
        return cls(layout, bias, cslt=cslt)

    @property
    def layout(self) -> Rows24 | BitPlanes:
        shape = (self.out_features, self.in_features)
        if self.kind == "24":
            return Rows24(self.values, self.meta, shape)
        return BitPlanes(self.values, self.words, self.tile_offsets, shape)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def weight_nbytes(self) -> int:
        """Bytes this layer holds for its weight (all copies), to compare with the dense size."""
        return self.layout.nbytes + (self.cslt.nbytes if self.cslt is not None else 0)

    def dense_weight(self) -> torch.Tensor:
        """The dense [N, K] weight (decompressed; for references and the decompress backend)."""
        return unpack_rows24(self.layout) if self.kind == "24" else unpack_bitplanes(self.layout)

    @property
    def dispatch_key(self) -> str:
        return dispatch.shape_key(self.kind, self.out_features, self.in_features, self.values.dtype)

    def _apply(self, fn, recurse=True):
        # a move or cast invalidates what is bound to the old device/dtype: cuSPARSELt's copy and plans
        super()._apply(fn, recurse)
        if self.cslt is not None and (self.cslt.device != self.device or self.cslt.dtype != self.values.dtype):
            self.cslt = None
        self._choices.clear()
        return self

    def choice(self, rows: int) -> dict:
        size = dispatch.bucket(rows)
        chosen = self._choices.get(size)
        if chosen is None:
            on_cuda = self.device.type == "cuda"
            if on_cuda:
                chosen = dispatch.table_for(self.device).get(self.dispatch_key, rows)
            if chosen is None or not self._can_run(chosen, size):
                chosen = default_choice(self.kind, size, has_cslt=self.cslt is not None, on_cuda=on_cuda,
                                        tensor_cores=self.in_features % 32 == 0)
            self._choices[size] = chosen
        return chosen

    def _can_run(self, choice: dict, rows: int) -> bool:
        backend = choice.get("backend")
        if backend == "cusparselt":
            return self.cslt is not None
        if backend in ("gemv", "gemv_tc"):
            return (rows <= decode.MAX_ROWS and self.dtype in (torch.float16, torch.bfloat16)
                    and (backend == "gemv" or (self.kind == "24" and self.in_features % 32 == 0)))
        return backend == "decompress"

    def run(self, x: torch.Tensor, choice: dict) -> torch.Tensor:
        backend = choice["backend"]
        if backend == "gemv_tc" and x.is_cuda:
            return decode.gemv24_tc(x, self.values, self.meta, self.bias, self.out_features, choice["config"])
        if backend == "gemv" and x.is_cuda:
            config = choice["config"]
            if self.kind == "24":
                return decode.gemv24(x, self.values, self.meta, self.bias, self.out_features, config)
            return decode.gemv_bitplanes(x, self.values, self.words, self.tile_offsets, self.bias, self.out_features,
                                         self.in_features, config)
        if backend == "cusparselt":
            transposed = choice.get("transposed", False)
            if "alg_id" in choice:  # the id tune() found for this bucket (every layer of the shape shares it)
                self.cslt.use_algorithm(x.numel() // self.in_features, choice["alg_id"], transposed=transposed)
            return self.cslt(x, self.bias, transposed=transposed)
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

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
        return ", ".join(extra)
