"""Per-layer input statistics accumulated over calibration tokens.

All accumulators are float32 sums, so splitting tokens across batches (or ranks, by summing)
gives the same result as one pass. X is the layer input flattened to [tokens, in_features].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, NumericalError

STAT_NORMS = "norms"  # sum_t x_tj^2       (Wanda's ||X_j||_2^2)
STAT_HESSIAN = "hessian"  # X^T X           (SparseGPT's H before scaling/damping)
STAT_MOMENTS = "moments"  # sum_t x_tj, sum_t x_tj^2 (means and variances, DSnoT)
KNOWN_STATS = frozenset({STAT_NORMS, STAT_HESSIAN, STAT_MOMENTS})
CHUNK_ROWS = 16384  # tokens converted to float32 at a time (bounds the temporary copy)


def _half_gram(rows: torch.Tensor) -> torch.Tensor | None:
    """X^T X of fp16/bf16 rows on CUDA as one GEMM with float32 output, or None if unavailable.

    Products of two 16-bit floats are exact in float32 and cuBLAS accumulates in float32, so this
    equals the float32 Gram up to summation order, without a float32 copy of X and on tensor
    cores (at 7B scale the float32 path made the Hessians most of SparseGPT's time).
    """
    if rows.device.type != "cuda" or rows.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        return torch.mm(rows.T, rows, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=)
        return None


def add_gram_(acc: torch.Tensor, x: torch.Tensor, tile: int = 384) -> None:
    """acc += x^T x, computing only the tiles on and above the diagonal (X^T X is symmetric).

    Saves about a third of the FLOPs of a plain ``addmm_`` for wide inputs, which matters: on a
    CPU the Hessian of a 1536-wide layer costs as much as half the block's forward pass.
    """
    width = x.shape[1]
    if width <= tile:
        acc.addmm_(x.T, x)
        return
    for row in range(0, width, tile):
        left = x[:, row : row + tile]
        for col in range(row, width, tile):
            product = left.T @ x[:, col : col + tile]
            acc[row : row + tile, col : col + tile] += product
            if col != row:
                acc[col : col + tile, row : row + tile] += product.T


@dataclass
class LayerStats:
    """Running sums of one layer's input. ``tokens`` counts rows of X seen so far."""

    in_features: int
    wanted: frozenset[str]
    tokens: int = 0
    sq_sum: torch.Tensor | None = None  # [in]
    col_sum: torch.Tensor | None = None  # [in]
    xtx: torch.Tensor | None = None  # [in, in]
    _device: torch.device | None = field(default=None, repr=False)

    def update(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs of shape [..., in_features].

        The float32 copy is made ``CHUNK_ROWS`` tokens at a time: at 7B scale one block's
        calibration input to down_proj is 262k x 11008 values, whose float32 copy alone would be
        11.5 GB (plus as much again for x * x)."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1])
        if rows.shape[1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {rows.shape[1]}")
        if self.tokens == 0:
            self._init(rows.device)
        self.tokens += rows.shape[0]
        wanted = self.wanted
        if STAT_HESSIAN in wanted:
            gram = _half_gram(rows)
            if gram is not None:
                self.xtx += gram
                wanted = wanted - {STAT_HESSIAN}
                del gram
        for start in range(0, rows.shape[0] if wanted else 0, CHUNK_ROWS):
            x = rows[start:start + CHUNK_ROWS].to(torch.float32)
            if STAT_NORMS in wanted or STAT_MOMENTS in wanted:
                self.sq_sum += (x * x).sum(0)
            if STAT_MOMENTS in wanted:
                self.col_sum += x.sum(0)
            if STAT_HESSIAN in wanted:
                add_gram_(self.xtx, x)

    def is_finite(self) -> bool:
        """False if any input seen so far was NaN/Inf (they propagate into every sum)."""
        return all(bool(torch.isfinite(value).all()) for value in self.tensors().values())

    def _init(self, device: torch.device) -> None:
        self._device = device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
        if STAT_NORMS in self.wanted or STAT_MOMENTS in self.wanted:
            self.sq_sum = zeros(self.in_features)
        if STAT_MOMENTS in self.wanted:
            self.col_sum = zeros(self.in_features)
        if STAT_HESSIAN in self.wanted:
            self.xtx = zeros(self.in_features, self.in_features)

    @property
    def channel_norms(self) -> torch.Tensor:
        """||X_j||_2 over all tokens seen (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.col_sum / max(self.tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_sum / max(self.tokens, 1) - self.mean**2).clamp_min(0)

    @property
    def hessian(self) -> torch.Tensor:
        """H = (2 / tokens) X^T X, the OBS Hessian of the layer-wise squared error."""
        return self.xtx * (2.0 / max(self.tokens, 1))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The raw sums, by name (what an all-reduce across ranks would add up)."""
        out = {}
        for name in ("sq_sum", "col_sum", "xtx"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def check_channel_stat(values, in_features: int, method: str, label: str) -> None:
    """One finite value per input feature, or a clear error: wrong shape means the statistics of
    another layer; NaN/Inf means the calibration activations overflowed."""
    if not isinstance(values, torch.Tensor) or values.shape != (in_features,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ConfigError(
            f"{method} needs one {label} per input feature ({in_features}), got shape {got}; "
            "the statistics belong to another layer."
        )
    if not bool(torch.isfinite(values).all()):
        raise NumericalError(
            f"{method}: the input-channel {label} holds NaN/Inf (activations overflowed); calibrate in "
            "float32/bfloat16 rather than float16."
        )
