"""Linears that skip the weight columns of zeroed activations (decode), from attached sparsifiers.

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

from ..kernels import triton_colskip
from ..kernels.layouts import Bitmask, unpack


class ActivationSparseLinear(nn.Module):
    """y = mask(x) W^T + b with W stored transposed ([K, N]: one contiguous row per input).

    ``thresholds`` [K] float32: x_j is kept where |x_j| > thresholds[j]. Up to 16 rows on CUDA
    run the column-skipping Triton kernel; more rows (prefill) and CPU use the PyTorch reference.
    ``weight_layout``: "dense" (W^T as is, the default) or "bitmask" (W^T compressed, for a pruned
    weight: the kernel then reads only the surviving weights of the kept inputs). The bitmask
    layout saves memory (0.57x at 50% weight sparsity) but is slower: on the H200 it ran at
    0.16-0.36x of dense cuBLAS per LLaMA-3-8B layer and 0.26-0.30x end to end (RESULTS.md,
    session 11), so it is never chosen for you.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, thresholds: torch.Tensor, *,
                 split_k: int = 4, config: tuple[int, int, int, int] = (64, 128, 4, 3), premask: bool = False,
                 weight_layout: str = "dense"):
        super().__init__()
        if weight_layout not in ("dense", "bitmask"):
            raise ValueError(f"weight_layout must be 'dense' or 'bitmask', got {weight_layout!r}.")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.packed = weight_layout == "bitmask"
        layout = triton_colskip.pack_transposed(weight) if self.packed else None
        self.register_buffer("weight_t", None if self.packed else triton_colskip.transpose_weight(weight))
        self.register_buffer("values", layout.values if self.packed else None)
        self.register_buffer("meta", layout.meta if self.packed else None)
        self.register_buffer("tile_offsets", layout.tile_offsets if self.packed else None)
        self._layout_shape, self._layout_width = (layout.shape, layout.width) if self.packed else (None, None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("thresholds", triton_colskip.column_thresholds(thresholds, self.in_features,
                                                                            device=weight.device))
        self.split_k, self.config, self.premask = split_k, config, premask
        # nothing to skip (every threshold below 0): cuBLAS on the transposed view, no mask cost
        self.keeps_all = bool((self.thresholds < 0).all())

    @classmethod
    def from_linear(cls, linear: nn.Module, thresholds: torch.Tensor | float, **options) -> ActivationSparseLinear:
        from ..models.adapters import _is_conv1d

        weight = linear.weight.t() if _is_conv1d(linear) else linear.weight  # GPT-2 Conv1D stores [in, out]
        return cls(weight, getattr(linear, "bias", None), torch.as_tensor(thresholds, dtype=torch.float32), **options)

    @property
    def layout_t(self) -> Bitmask:
        return Bitmask(self.values, self.meta, self.tile_offsets, self._layout_shape, self._layout_width)

    def dense_weight_t(self) -> torch.Tensor:
        """W^T [K, N]: the stored one, or decoded from the bitmask (one Triton pass on CUDA)."""
        if not self.packed:
            return self.weight_t
        if self.meta.is_cuda:
            from ..kernels import triton_planes

            return triton_planes.unpack(self.layout_t)
        return unpack(self.layout_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.keeps_all:
            return F.linear(x, self.dense_weight_t().t().to(x.dtype), self.bias)
        if x.is_cuda and rows <= triton_colskip.MAX_ROWS:
            if self.packed:
                return triton_colskip.linear_packed(x, self.layout_t, self.thresholds, self.bias, split_k=self.split_k)
            return triton_colskip.linear(x, self.weight_t, self.thresholds, self.bias, split_k=self.split_k,
                                         config=self.config, premask=self.premask)
        kept = torch.where(x.abs().float() > self.thresholds, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return F.linear(kept, self.dense_weight_t().t().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, split_k={self.split_k}, "
                f"weight={'bitmask' if self.packed else 'dense'}")


def _column_thresholds(hook) -> torch.Tensor | None:
    """The hook's rule as per-column thresholds on |x|, or None when it is not one."""
    method, site = hook.method, hook.site
    if site.kind != "input" or method.selection != "threshold" or hook.side is not None:
        return None
    if method.name in ("teal", "chess"):  # CHESS's attention inputs: one |x| threshold
        return torch.full((site.width,), hook.threshold, dtype=torch.float32)
    if method.name == "wina":
        norms = site.constants["column_norm"].float().cpu()
        return torch.where(norms > 0, hook.threshold / norms, torch.full_like(norms, float("inf")))
    return None


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
