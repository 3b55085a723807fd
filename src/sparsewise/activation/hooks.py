"""The hook that applies one method at one site, reversibly, and counts what it zeroed."""

from __future__ import annotations

import torch

from .base import ActivationMethod, Site
from .thresholds import quantile_threshold, topk_keep_mask


class SiteHook:
    """Zeroes a site's entries whose score is at or below ``threshold`` (or outside each token's
    top-k). ``samples``: calibration scores kept so the sparsity can be changed without
    recalibrating. ``count`` turns on the measured-sparsity counters (exact zeros after masking,
    natural zeros included: what a kernel could skip)."""

    def __init__(self, site: Site, method: ActivationMethod, samples: torch.Tensor | None):
        self.site, self.method, self.samples = site, method, samples
        self.sparsity = 0.0
        self.zeroed = 0.0  # fraction zeroed on the full-weight path (R-Sparse: more than sparsity)
        self.active = False
        self.threshold = float("-inf")
        self.side: tuple[torch.Tensor, torch.Tensor] | None = None  # R-Sparse low-rank path
        self._removed: torch.Tensor | None = None
        self.count = False
        self.zeros = 0
        self.total = 0
        self.handles: list = []

    def set_sparsity(self, sparsity: float) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"activation sparsity must be in [0, 1), got {sparsity} at {self.site.name}.")
        self.sparsity = sparsity
        zeroed = sparsity
        side_path = getattr(self.method, "sparse_path", None)
        if side_path is not None:
            zeroed, rank = side_path(self.site, sparsity)
            self.side = self.method.side_factors(self.site, rank)
        if self.method.selection == "threshold":
            if self.samples is None:
                raise RuntimeError(f"{self.site.name}: a threshold method needs calibration samples.")
            self.threshold = quantile_threshold(self.samples, zeroed)
        self.zeroed = zeroed
        self.active = sparsity > 0.0

    def set_threshold(self, threshold: float) -> None:
        """Mask with an explicit threshold on the score (e.g. from a CETT search), not a quantile."""
        self.threshold, self.active = threshold, True

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.method.score(self.site, x)
        if self.method.selection == "topk":
            return topk_keep_mask(scores, 1.0 - self.zeroed)
        return scores > self.threshold

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            out = x
        else:
            out = torch.where(self.keep_mask(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
            if self.side is not None:
                self._removed = x - out
        if self.count:
            self.zeros += int((out == 0).sum())
            self.total += out.numel()
        return out

    # -- torch hooks -------------------------------------------------------------------------
    def pre_hook(self, _module, args):
        return (self.sparsify(args[0]), *args[1:])

    def post_hook(self, _module, _args, output):
        if self.site.kind == "gate":
            return self.sparsify(output)
        if self._removed is not None:  # R-Sparse: the zeroed channels through U_r S_r V_r^T
            removed, self._removed = self._removed, None
            left, right = self.side
            output = output + (removed @ right.to(removed.dtype).t()) @ left.to(removed.dtype).t()
        return output

    def attach(self) -> None:
        module = self.site.module
        if self.site.kind == "input":
            self.handles.append(module.register_forward_pre_hook(self.pre_hook))
        self.handles.append(module.register_forward_hook(self.post_hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @property
    def measured(self) -> float:
        return self.zeros / self.total if self.total else float("nan")
