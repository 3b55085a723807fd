"""Linears that skip the weight rows of zeroed activations (decode), from attached sparsifiers.

:func:`accelerate_activations` turns the sites of :func:`sparsewise.sparsify_activations` into
:class:`ActivationSparseLinear` modules. Where a method's rule is a threshold on |x_j| times a
per-column constant (TEAL, WINA, top-k excepted), the kernel applies it itself and the hook goes
away; everywhere else (top-k per token, CATS/CHESS zeroing the MLP intermediate before the down
projection) the hook keeps zeroing and the kernel skips exact zeros (threshold 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PatternError
from ..kernels import decode
from ..kernels.layouts import BitPlanes, Rows24, pack_bitplanes, pack_rows24, unpack_bitplanes, unpack_rows24


def column_thresholds(threshold: float | torch.Tensor, in_features: int, *, device=None) -> torch.Tensor:
    """A scalar or per-column threshold as the float32 [K] vector the kernels read (< 0: keep all)."""
    values = torch.as_tensor(threshold, dtype=torch.float32, device=device)
    if values.dim() == 0:
        values = values.expand(in_features)
    if values.shape != (in_features,):
        raise ValueError(f"threshold must be a scalar or have {in_features} entries, got {tuple(values.shape)}.")
    return values.contiguous()


class ActivationSparseLinear(nn.Module):
    """y = (x ⊙ [|x| > t]) W^T + b with W stored transposed (one contiguous row per input).

    ``thresholds`` [K] float32: x_j is kept where |x_j| > thresholds[j]. On CUDA, up to
    ``skip_rows`` rows (default 2) run the CUDA kernel that reads only the rows of W^T whose
    input some row keeps; more rows (where that union covers nearly every input), and the CPU,
    use cuBLAS on the masked x. ``weight_layout``: "dense" (W^T as is),
    "bitmask" (W^T as bit planes along N: only the surviving weights of the kept inputs are
    read, for a pruned W), "2:4" (W row-major in the 2:4 kernel's layout, the thresholds applied
    to x inside that kernel: every 2:4 weight is read, but at 0.56x of the bytes and with the
    2:4 kernel's speed, measured faster than the bit planes below ~85% activation sparsity), or
    "auto": "2:4" for a 2:4 weight, "bitmask" for another weight with >= 40% zeros, else "dense".
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, thresholds: torch.Tensor, *,
                 weight_layout: str = "auto", splits: int = 0, skip_rows: int = 2):
        super().__init__()
        if weight_layout not in ("dense", "bitmask", "2:4", "auto"):
            raise ValueError(f"weight_layout must be 'dense', 'bitmask', '2:4' or 'auto', got {weight_layout!r}.")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        rows24 = None
        if weight_layout in ("2:4", "auto"):
            try:
                rows24 = pack_rows24(weight)
                weight_layout = "2:4"
            except PatternError:
                if weight_layout == "2:4":
                    raise
        if weight_layout == "auto":
            weight_layout = "bitmask" if float((weight == 0).float().mean()) >= 0.4 else "dense"
        self.layout_name = weight_layout
        self.packed = weight_layout == "bitmask"
        self.register_buffer("values24", rows24.values if rows24 is not None else None)
        self.register_buffer("meta24", rows24.meta if rows24 is not None else None)
        weight_t = weight.t().contiguous() if weight_layout in ("dense", "bitmask") else None
        planes = pack_bitplanes(weight_t) if self.packed else None
        self.register_buffer("weight_t", weight_t if weight_layout == "dense" else None)
        self.register_buffer("values", planes.values if self.packed else None)
        self.register_buffer("words", planes.words if self.packed else None)
        self.register_buffer("offsets_t", planes.offsets.t().contiguous() if self.packed else None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("thresholds", column_thresholds(thresholds, self.in_features, device=weight.device))
        self.splits, self.skip_rows = splits, skip_rows
        # nothing to skip (every threshold below 0): cuBLAS, no mask cost
        self.keeps_all = bool((self.thresholds < 0).all())

    @classmethod
    def from_linear(cls, linear: nn.Module, thresholds: torch.Tensor | float, **options) -> ActivationSparseLinear:
        from ..models.adapters import _is_conv1d

        weight = linear.weight.t() if _is_conv1d(linear) else linear.weight  # GPT-2 Conv1D stores [in, out]
        return cls(weight, getattr(linear, "bias", None), torch.as_tensor(thresholds, dtype=torch.float32), **options)

    @property
    def weight_nbytes(self) -> int:
        tensors = {"dense": (self.weight_t,), "bitmask": (self.values, self.words, self.offsets_t),
                   "2:4": (self.values24, self.meta24)}[self.layout_name]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_weight_t(self) -> torch.Tensor:
        """W^T [K, N]: the stored one, or decoded from the bit planes / the 2:4 layout."""
        if self.layout_name == "2:4":
            return unpack_rows24(Rows24(self.values24, self.meta24, (self.out_features, self.in_features))).t()
        if not self.packed:
            return self.weight_t
        return unpack_bitplanes(BitPlanes(self.values, self.words, self.offsets_t.t(),
                                          (self.in_features, self.out_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.keeps_all:
            return F.linear(x, self.dense_weight_t().t().to(x.dtype), self.bias)
        if x.is_cuda and rows <= decode.MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16):
            if self.layout_name == "2:4":
                if rows > 4 and self.in_features % 32 == 0:  # sparse tensor cores
                    return decode.gemv24_tc(x, self.values24, self.meta24, self.bias, self.out_features,
                                            [1, 1 if rows <= 8 else 2, 4], self.thresholds)
                return decode.gemv24(x, self.values24, self.meta24, self.bias, self.out_features,
                                     list(decode.default_gemv24_config(rows)), self.thresholds)
            if rows > self.skip_rows:
                # the row-skipping kernels read every input some row keeps: with more rows that is
                # nearly all of W^T (batch 8 at 50%: 0.65x of cuBLAS on the H200), so mask + cuBLAS
                return decode.reference_act_gemv(x, self.thresholds, self.dense_weight_t(), self.bias)
            if self.packed:
                return decode.act_gemv_bitplanes(x, self.thresholds, self.values, self.words, self.offsets_t,
                                                 self.bias, self.out_features, self.splits)
            return decode.act_gemv(x, self.thresholds, self.weight_t, self.bias, self.splits)
        return decode.reference_act_gemv(x, self.thresholds, self.dense_weight_t(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.layout_name}")


def _column_thresholds(hook) -> torch.Tensor | None:
    """The hook's rule as per-column thresholds on |x| (the method's own ``column_thresholds``),
    or None when it is not one (top-k, gate sites, two-sided hooks)."""
    method, site = hook.method, hook.site
    if site.kind != "input" or method.selection != "threshold" or hook.side is not None:
        return None
    rule = getattr(method, "column_thresholds", None)
    return None if rule is None else rule(site, hook.threshold)


def accelerate_activations(model: nn.Module, **options) -> dict[str, str]:
    """Swap every linear read by an attached activation sparsifier for an ActivationSparseLinear.

    Returns {linear name: "kernel threshold" | "hook + skip zeros"}. The sparsifier handle stays
    attached for the sites that keep a hook; weights are copied into the transposed layout. For
    deployment: not reversible by remove_activation_sparsity (reload the model instead).
    """
    handle = getattr(model, "_sparsewise_activation", None)
    if handle is None:
        raise ValueError("no activation sparsity attached: call sw.sparsify_activations(model, ...) first.")
    names = {module: name for name, module in model.named_modules()}
    done: dict[str, str] = {}
    for hook in handle.hooks:
        site = hook.site
        linear = site.module if site.kind == "input" else site.reader
        thresholds = _column_thresholds(hook)
        if thresholds is None:
            thresholds = torch.zeros(site.width)  # the hook zeroes; the kernel skips the zeros
            how = "hook + skip zeros"
        else:
            hook.detach()
            how = "kernel threshold"
        replacement = ActivationSparseLinear.from_linear(linear, thresholds, **options)
        name = names[linear]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        if site.kind == "input" and how == "hook + skip zeros":
            hook.detach()
            site.module = replacement
            hook.attach()
        done[name] = how
    return done
