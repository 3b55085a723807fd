"""2:4 sparse training GEMMs: a linear layer whose forward (and, for BDWP, input gradient) run
through a 2:4 structured GEMM while the optimizer updates dense weights.

Variants (``VARIANTS``), for a weight W [out, in] and its dense gradient:
  fwd24  static 2:4 mask M (fine-tuning a pruned model): Y = X (W*M)^T through the 2:4 GEMM,
         dX = dY (W*M) dense, dW = dY^T X dense (re-mask after the update to keep exact zeros).
  dyn24  SR-STE/STE-style: the 2:4 mask is recomputed from |W| at every forward (one pass: mask
         and masked copy), Y through the 2:4 GEMM; dX = dY (W*M) dense, dW = dY^T X dense.
  bdwp   bidirectional weight pruning: W_f = W*M_f (2:4 along in) for the forward GEMM and
         W_b = W*M_b (2:4 along out, from the same |W|) for dX = dY W_b, computed through the
         same 2:4 GEMM on W_b^T [in, out] (2:4 along its last dim); dW = dY^T X dense.

The GEMM comes from a backend: ``emu`` (dense matmul on the masked weight: any device and dtype,
the CPU reference), ``torch`` (torch.sparse.to_sparse_semi_structured: cuSPARSELt, else CUTLASS)
and ``cslt`` (sparsewise.kernels.cusparselt.CsltLinear, cached plans). The mask pass runs as one
Triton kernel on CUDA (:class:`Masker`) and as torch ops elsewhere. Triton and cuSPARSELt are
imported only when a GPU backend or the Triton mask is used.

Masks keep the 2 largest |w| of every 4 consecutive entries of the last dim; among equal
magnitudes the earlier position wins (``sparsewise.patterns.nm_mask``'s stable sort; the Triton
kernel computes the same ranks without sorting).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..patterns import nm_mask

VARIANTS = ("fwd24", "dyn24", "bdwp")
BACKENDS = ("emu", "torch", "cslt")


# ------------------------------------------------------------------------------------------------ masks
def mask24(w: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask of ``w``, 2:4 along the last dim (its size divisible by 4)."""
    scores = w.detach().abs()
    return nm_mask(scores.reshape(-1, scores.shape[-1]), 2, 4).reshape(w.shape)


_TRITON_MASKS: dict = {}


def _triton_mask_kernel(kind: str = "tile"):
    """The 2:4 ranks in one Triton pass: reads w once, writes w*mask (and optionally the mask).

    "tile": [BLOCK, 4] tiles (8-byte loads/stores; ranks by a [BLOCK, 4, 4] comparison);
    "scalar": four strided loads per group (simpler code, the fallback). An entry is kept when fewer
    than two entries of its group beat it (larger |w|, or equal |w| at an earlier position).
    """
    if kind not in _TRITON_MASKS:
        import triton
        import triton.language as tl

        @triton.jit
        def mask24_tile_kernel(w_ptr, out_ptr, keep_ptr, groups, BLOCK: tl.constexpr, WRITE_KEEP: tl.constexpr):
            g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            j = tl.arange(0, 4)
            valid = (g < groups)[:, None] & (j < 4)[None, :]
            offs = g[:, None] * 4 + j[None, :]
            w = tl.load(w_ptr + offs, mask=valid, other=0.0)
            a = tl.abs(w.to(tl.float32))
            ai = a[:, :, None]  # [B, i, 1]
            aj = a[:, None, :]  # [B, 1, j]
            earlier = (j[None, :] < j[:, None])[None, :, :]  # [1, i, j]: j before i
            beats = (aj > ai) | ((aj == ai) & earlier)
            keep = tl.sum(beats.to(tl.int32), axis=2) < 2
            tl.store(out_ptr + offs, tl.where(keep, w, tl.zeros_like(w)), mask=valid)
            if WRITE_KEEP:
                tl.store(keep_ptr + offs, keep.to(tl.int8), mask=valid)

        @triton.jit
        def mask24_scalar_kernel(w_ptr, out_ptr, keep_ptr, groups, BLOCK: tl.constexpr, WRITE_KEEP: tl.constexpr):
            g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            valid = g < groups
            base = g * 4
            w0 = tl.load(w_ptr + base, mask=valid, other=0.0)
            w1 = tl.load(w_ptr + base + 1, mask=valid, other=0.0)
            w2 = tl.load(w_ptr + base + 2, mask=valid, other=0.0)
            w3 = tl.load(w_ptr + base + 3, mask=valid, other=0.0)
            a0 = tl.abs(w0.to(tl.float32))
            a1 = tl.abs(w1.to(tl.float32))
            a2 = tl.abs(w2.to(tl.float32))
            a3 = tl.abs(w3.to(tl.float32))
            r0 = (a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)
            r1 = (a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)
            r2 = (a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)
            r3 = (a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)
            k0, k1, k2, k3 = r0 < 2, r1 < 2, r2 < 2, r3 < 2
            tl.store(out_ptr + base, tl.where(k0, w0, tl.zeros_like(w0)), mask=valid)
            tl.store(out_ptr + base + 1, tl.where(k1, w1, tl.zeros_like(w1)), mask=valid)
            tl.store(out_ptr + base + 2, tl.where(k2, w2, tl.zeros_like(w2)), mask=valid)
            tl.store(out_ptr + base + 3, tl.where(k3, w3, tl.zeros_like(w3)), mask=valid)
            if WRITE_KEEP:
                tl.store(keep_ptr + base, k0.to(tl.int8), mask=valid)
                tl.store(keep_ptr + base + 1, k1.to(tl.int8), mask=valid)
                tl.store(keep_ptr + base + 2, k2.to(tl.int8), mask=valid)
                tl.store(keep_ptr + base + 3, k3.to(tl.int8), mask=valid)

        _TRITON_MASKS["tile"] = (mask24_tile_kernel, triton.cdiv)
        _TRITON_MASKS["scalar"] = (mask24_scalar_kernel, triton.cdiv)
    return _TRITON_MASKS[kind]


def mask24_apply_triton(w: torch.Tensor, want_keep: bool = False, kind: str = "tile"):
    """(w * mask, mask or None) in one Triton launch; ``w`` contiguous, last dim % 4 == 0."""
    if not w.is_contiguous() or w.shape[-1] % 4:
        raise ValueError("mask24_apply_triton needs a contiguous tensor with the last dim divisible by 4")
    kernel, cdiv = _triton_mask_kernel(kind)
    out = torch.empty_like(w)
    keep = torch.empty(w.shape, dtype=torch.int8, device=w.device) if want_keep else out
    groups = w.numel() // 4
    block = 256 if kind == "tile" else 1024
    kernel[(cdiv(groups, block),)](w, out, keep, groups, BLOCK=block, WRITE_KEEP=want_keep, num_warps=4)
    return out, (keep.bool() if want_keep else None)


class Masker:
    """2:4 mask + masked copy along the last dim, and W -> W^T: Triton when ``use_triton`` (the first
    kernel that matches :func:`mask24` on a probe with ties), torch ops otherwise or when none does.
    ``note`` says which, with the reasons a kernel was passed over."""

    def __init__(self, device: torch.device | str, use_triton: bool):
        self.device = torch.device(device)
        self.kind = None
        self.note = "torch ops"
        if not use_triton:
            return
        errors = []
        for kind in ("tile", "scalar"):
            try:
                probe = torch.randn(256, 512, device=self.device).to(torch.bfloat16)
                probe[:, 8:16] = 0.5  # ties: the earlier position must win
                probe[3, :8] = 0.0
                out, keep = mask24_apply_triton(probe, want_keep=True, kind=kind)
                ref = mask24(probe)
                if not (torch.equal(keep, ref) and torch.equal(out, probe * ref)):
                    raise AssertionError("differs from the torch mask")
                self.kind, self.note = kind, f"triton {kind}"
                break
            except Exception as exc:  # noqa: BLE001 - any failure: the torch path is correct, only slower
                errors.append(f"{kind}: {str(exc)[:100]}")
        if errors:
            self.note += " (" + "; ".join(errors) + ")"

    @property
    def use_triton(self) -> bool:
        return self.kind is not None

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """w * mask24(w) along the last dim, contiguous."""
        if self.kind is not None:
            return mask24_apply_triton(w.contiguous(), kind=self.kind)[0]
        return w * mask24(w)

    def transpose(self, w: torch.Tensor) -> torch.Tensor:
        """W^T contiguous ([N, K] -> [K, N])."""
        if self.use_triton and w.is_cuda:
            from ..kernels.transpose import transpose_bias

            return transpose_bias(w)
        return w.t().contiguous()


# ------------------------------------------------------------------------------------------------ backends
# compress(w [out, in], 2:4 along in) -> handle; matmul(handle, x [M, in]) -> x w^T


class EmulatedBackend:
    """Dense emulation (any device/dtype): the handle is the masked weight itself; the reference the
    GPU backends are checked against."""

    name = "emu"
    kind = "dense emulation"

    def compress(self, w: torch.Tensor):
        return w

    def matmul(self, handle, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, handle)


class TorchSemiStructuredBackend:
    """torch.sparse.to_sparse_semi_structured: cuSPARSELt unless it is missing (then CUTLASS); CUDA only."""

    name = "torch"

    def __init__(self):
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        cusparselt = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
        SparseSemiStructuredTensor._FORCE_CUTLASS = not cusparselt
        self.kind = "cuSPARSELt" if cusparselt else "CUTLASS"
        self.convert = to_sparse_semi_structured

    def compress(self, w: torch.Tensor):
        return self.convert(w.contiguous())

    def matmul(self, handle, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, handle)


class CsltBackend:
    """sparsewise CsltLinear: one plan holder per weight shape and dtype (plans depend on shape, dtype
    and M only); each compress is torch._cslt_compress into a new buffer the holder then points at."""

    name = "cslt"

    def __init__(self):
        from ..kernels import cusparselt

        if not cusparselt.available():
            raise RuntimeError("cuSPARSELt not available (sparsewise.kernels.cusparselt.available() is False)")
        self.CsltLinear = cusparselt.CsltLinear
        self.holders: dict[tuple, object] = {}
        self.kind = "cuSPARSELt (cached plans, y^T + Triton transpose)"

    def compress(self, w: torch.Tensor):
        w = w.contiguous()
        key = (tuple(w.shape), w.dtype)
        holder = self.holders.get(key)
        if holder is None:
            holder = self.holders[key] = self.CsltLinear(w)
            return holder, holder.compressed
        return holder, torch._cslt_compress(w)

    def matmul(self, handle, x: torch.Tensor) -> torch.Tensor:
        holder, packed = handle
        holder.compressed = packed  # same shape and descriptor: the cached plans stay valid
        return holder(x, transposed=True)


def make_backend(name: str):
    """A 2:4 GEMM backend by name: emu | torch | cslt (the GPU ones import their libraries here)."""
    if name == "emu":
        return EmulatedBackend()
    if name == "torch":
        return TorchSemiStructuredBackend()
    if name == "cslt":
        return CsltBackend()
    raise ConfigError(f"unknown 2:4 backend {name!r}; use one of {', '.join(BACKENDS)}.")


# ------------------------------------------------------------------------------------------------ autograd
class Operands:
    """What :class:`Sparse24Function` needs besides x and the weight, in a plain object:
    autograd.Function.apply must not see the compressed weights (a SparseSemiStructuredTensor is a
    Tensor subclass). ``fwd``: the forward handle; ``bwd``: a handle of W_b^T for a 2:4 dX, else
    ``bwd_dense``: the (masked) weight for a dense dX."""

    __slots__ = ("backend", "fwd", "bwd", "bwd_dense")

    def __init__(self, backend, fwd, bwd=None, bwd_dense=None):
        self.backend, self.fwd, self.bwd, self.bwd_dense = backend, fwd, bwd, bwd_dense


class Sparse24Function(torch.autograd.Function):
    """Y = X W_f^T through a 2:4 GEMM (``ops.fwd``); dX = dY W_b through the 2:4 GEMM on W_b^T when
    ``ops.bwd`` is a handle, else dense on ``ops.bwd_dense``; dW = dY^T X dense, returned for the
    dense parameter ``weight`` (which the forward itself does not read). ``x`` is [M, in]. The
    compressed weights are released after the backward (no retain_graph)."""

    @staticmethod
    def forward(ctx, x, weight, ops):
        ctx.ops = ops
        ctx.save_for_backward(x)
        return ops.backend.matmul(ops.fwd, x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        ops = ctx.ops
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ops.backend.matmul(ops.bwd, dy) if ops.bwd is not None else dy @ ops.bwd_dense
        if ctx.needs_input_grad[1]:
            dw = dy.t() @ x
        ctx.ops = None  # the compressed weights are freed with the graph
        return dx, dw, None


def sparse24_operands(weight: torch.Tensor, variant: str, backend, masker: Masker | None = None,
                      mask: torch.Tensor | None = None) -> Operands:
    """The operands of one step of ``variant`` for the dense ``weight`` [out, in].

    fwd24 uses ``weight * mask`` (``mask=None``: the weight already holds the 2:4 zeros); dyn24 and
    bdwp mask ``weight`` here (``masker``, torch ops when None); bdwp also masks and compresses W^T."""
    w = weight.detach()
    if variant == "fwd24":
        wf = w if mask is None else w * mask
        return Operands(backend, backend.compress(wf), bwd_dense=wf)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown 2:4 training variant {variant!r}; use one of {', '.join(VARIANTS)}.")
    masker = masker or Masker(w.device, use_triton=False)
    wf = masker.apply(w)
    if variant == "dyn24":
        return Operands(backend, backend.compress(wf), bwd_dense=wf)
    wbt = masker.apply(masker.transpose(w))  # (W * M_b)^T: 2:4 along out, its last dim
    return Operands(backend, backend.compress(wf), bwd=backend.compress(wbt))


def sparse24_linear(x: torch.Tensor, weight: torch.Tensor, ops: Operands) -> torch.Tensor:
    """x [..., in] @ W^T through :class:`Sparse24Function` (leading dims flattened for the GEMM)."""
    y = Sparse24Function.apply(x.reshape(-1, x.shape[-1]), weight, ops)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Sparse24Linear(nn.Module):
    """nn.Linear trained through 2:4 GEMMs (``variant`` fwd24 | dyn24 | bdwp, ``backend`` emu | torch |
    cslt or a backend object). The weight stays a dense parameter with dense gradients; fwd24 holds a
    fixed ``mask`` buffer (from |W| at construction) and :meth:`apply_mask` re-zeros the weight after
    an update. ``use_triton`` None: the Triton mask pass on CUDA, torch ops elsewhere."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, variant: str = "dyn24",
                 backend="emu", use_triton: bool | None = None, device=None, dtype=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown 2:4 training variant {variant!r}; use one of {', '.join(VARIANTS)}.")
        if in_features % 4 or (variant == "bdwp" and out_features % 4):
            raise ConfigError(f"2:4 {variant} needs in_features{' and out_features' if variant == 'bdwp' else ''} "
                              f"divisible by 4, got [{out_features}, {in_features}].")
        self.in_features, self.out_features = in_features, out_features
        self.variant = variant
        self.backend = make_backend(backend) if isinstance(backend, str) else backend
        self.use_triton = use_triton
        self._maskers: dict[torch.device, Masker] = {}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("mask", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization, then (fwd24) the mask from |W| and the weight masked."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_mask()

    def _init_mask(self) -> None:
        if self.variant == "fwd24" and not self.weight.is_meta:
            self.mask = mask24(self.weight)
            self.apply_mask()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> Sparse24Linear:
        """The 2:4 layer on ``linear``'s own parameters (no copy: an optimizer built on them still
        updates this layer); fwd24 masks them in place."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                    dtype=weight.dtype, **options)
        layer.weight = weight
        layer.bias = linear.bias
        layer._init_mask()
        return layer

    @torch.no_grad()
    def apply_mask(self) -> None:
        """fwd24: zero the pruned weights again (after an optimizer step); other variants: nothing."""
        if self.mask is not None:
            self.weight.mul_(self.mask)

    def masker(self, device: torch.device) -> Masker:
        if device not in self._maskers:
            use_triton = device.type == "cuda" if self.use_triton is None else self.use_triton
            self._maskers[device] = Masker(device, use_triton)
        return self._maskers[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = sparse24_operands(self.weight, self.variant, self.backend, self.masker(self.weight.device),
                                mask=self.mask)
        y = sparse24_linear(x, self.weight, ops)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"variant={self.variant}, backend={self.backend.name}")
