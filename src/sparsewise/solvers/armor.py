"""ARMOR: 2:4 pruning with adaptive block-diagonal factors around the sparse core.

Liu et al. 2025, "ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix
Factorization" (reference code github.com/LawrenceRLiu/ARMOR).

Every Linear weight W [out, in] is approximated as

    W ~ W_hat = A . S . B,      S = diag(r) . S_bar . diag(c)

* S_bar [out, in] is 2:4 sparse (exactly 2 nonzeros in every group of 4 consecutive inputs);
* r [out], c [in] are NoWag-style row/column norms: c_j = ||W[:, j]||_2, then r_i = the norm of
  row i of W / c; they are folded back into S at reconstruction, so S keeps the 2:4 mask;
* A [out, out] and B [in, in] are block diagonal with small dense blocks (32 by default).

At inference y = A (S (B x)) + bias: two cheap block-diagonal matmuls around a 2:4 sparse GEMM,
so the 2:4 speed path still applies to S (held by :class:`sparsewise.modules.ARMORLinear` as a
plain bias-free ``nn.Linear`` named ``sparse``). This module is the math, over tensors; the
method (:mod:`sparsewise.methods.armor`) walks a model and swaps the modules in.

Proxy loss, with h_j = diag(X^T X)_j the calibration energy of input channel j:

    L = sum_ij (W_hat - W)_ij^2 h_j  /  sum_ij W_ij^2 h_j

(normalised by the loss of the all-zero reconstruction). Starting point: S_bar = the NoWag-P 2:4
pruning of the normalised weight (keep the 2 largest S_bar_ij^2 h_j per group; any 2:4 mask can be
given instead), A = B = I, so the initial loss is the baseline's. Then block coordinate descent,
each iteration:

1. one Adam step on the continuous parameters (A blocks, B blocks, the kept values of S_bar and the
   norms r, c), reverted when it raises L;
2. one discrete step on the sparse core: in every tile (A-block rows x B-window columns) one group
   of 4 is drawn (by default with probability proportional to the L1 norm of dL/dS_bar over the
   group, else uniformly); for each of the C(4, 2) = 6 supports the best values are solved in
   closed form and the support with the lowest loss wins. Because A and B are block diagonal and
   h is diagonal, changing one group of row i only changes W_hat in the tile, by the rank-one
   term a u^T (a = r_i A[:, i] on the A-block, u = B^T (c ⊙ delta) on the window), so the loss
   change of each candidate is an exact 4x4 quadratic form, all tiles and supports at once.
   Only improvements are taken, and the whole step is undone if the recomputed loss rose.

L is therefore non-increasing at every iteration by construction. The run stops after
``iterations`` or when ``patience`` iterations in a row improved L by less than rtol (relative)
or atol (absolute).

Where this differs from the reference code: both steps are guarded (the reference takes every
Adam step and every closed-form support); tiles span lcm(block_size, 4) inputs so B blocks
smaller than a group (block size 1 or 2) work too; the damping of the 2x2 solves is relative
instead of a fixed 1e-9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration.stats import check_channel_stat
from ..errors import ConfigError, NumericalError, PatternError

__all__ = [
    "ARMORFactors",
    "armor_factorize",
    "block_diag_apply",
    "nowag_mask",
    "nowag_normalize",
    "proxy_loss",
]

GROUP, KEEP = 4, 2
SELECT_MODES = ("gradient", "random")
_NORM_EPS = 1e-5  # NoWag's epsilon added to every norm
# The C(4, 2) = 6 supports of a 2:4 group.
_PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


# ---------------------------------------------------------------------------------------------
# small tensor helpers


def block_diag_apply(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = blockdiag(blocks) x over the last dim of ``x``; blocks [n, b, b], x [..., n*b]."""
    count, size, _ = blocks.shape
    y = torch.einsum("...ni,noi->...no", x.reshape(*x.shape[:-1], count, size), blocks)
    return y.reshape(x.shape)


def _left(blocks: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ matrix, matrix [n*b, k]."""
    count, size, _ = blocks.shape
    return torch.bmm(blocks, matrix.reshape(count, size, -1)).reshape(matrix.shape)


def _right(matrix: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """matrix @ blockdiag(blocks), matrix [k, n*b]."""
    count, size, _ = blocks.shape
    rows = matrix.shape[0]
    return torch.einsum("onj,njk->onk", matrix.reshape(rows, count, size), blocks).reshape(matrix.shape)


def _reconstruct(a_blocks, b_blocks, values, mask, row_norms, col_norms) -> torch.Tensor:
    core = (values * mask) * row_norms[:, None] * col_norms[None, :]
    return _right(_left(a_blocks, core), b_blocks)


def nowag_normalize(weight: torch.Tensor, eps: float = _NORM_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NoWag normalisation W = diag(r) W_bar diag(c): c_j = ||W[:, j]|| + eps, then r_i over W / c.

    Returns (W_bar, r, c).
    """
    col_norms = weight.norm(dim=0) + eps
    scaled = weight / col_norms[None, :]
    row_norms = scaled.norm(dim=1) + eps
    return scaled / row_norms[:, None], row_norms, col_norms


def nowag_mask(normalized: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """NoWag-P 2:4 keep-mask: the 2 largest W_bar_ij^2 h_j of every group of 4 inputs."""
    from ..patterns import nm_mask

    return nm_mask(normalized.square() * energy[None, :], KEEP, GROUP)


def proxy_loss(
    weight: torch.Tensor, energy: torch.Tensor, approximation: torch.Tensor, *, normalize: bool = True
) -> float:
    """L = sum_ij (approximation - W)_ij^2 h_j, divided by sum_ij W_ij^2 h_j when ``normalize``.

    ``energy`` is h = diag(X^T X) [in] (``LayerStats.sq_sum``). A layer whose normalising sum is 0
    (zero weight or zero energy) has loss 0 for any approximation.
    """
    w = weight.detach().to(torch.float64)
    h = energy.detach().to(w.device, torch.float64)
    loss = ((approximation.detach().to(w.device, torch.float64) - w).square() * h).sum()
    if not normalize:
        return float(loss)
    scale = (w.square() * h).sum()
    return float(loss / scale) if scale > 0 else 0.0


def _divisors_up_to(size: int, limit: int) -> int:
    return max(d for d in range(1, min(size, limit) + 1) if size % d == 0)


def _block_sizes(block_size: int | Sequence[int], out_features: int, in_features: int) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        sizes = (block_size, block_size)
    elif isinstance(block_size, Sequence) and len(block_size) == 2:
        sizes = tuple(block_size)
    else:
        raise ConfigError(f"block_size must be an int or a pair (out_block, in_block), got {block_size!r}.")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ConfigError(f"block_size must hold positive integers, got {block_size!r}.")
    out_block, in_block = sizes
    for what, dim, size in (("out_features", out_features, out_block), ("in_features", in_features, in_block)):
        if dim % size:
            common = math.gcd(out_features, in_features)
            hint = _divisors_up_to(common, size)
            raise ConfigError(
                f"ARMOR: {what} = {dim} is not divisible by the block size {size}; use a block size dividing "
                f"both dimensions of this [{out_features}, {in_features}] layer, e.g. block_size={hint}, "
                f"or a pair block_size=({_divisors_up_to(out_features, out_block)}, "
                f"{_divisors_up_to(in_features, in_block)})."
            )
    return out_block, in_block


def _check_inputs(weight: torch.Tensor, energy: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        desc = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"ARMOR needs a 2-D floating-point weight laid out [out, in], got {desc}.")
    out_features, in_features = weight.shape
    if in_features % GROUP:
        raise PatternError(
            f"ARMOR prunes 2:4 along the input dimension, which must be divisible by 4; this layer has "
            f"in_features = {in_features}: exclude it (exclude=[...]) or pad its inputs."
        )
    check_channel_stat(energy, in_features, "ARMOR", "input-channel energy diag(X^T X)")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise NumericalError(
            f"ARMOR: the weight [{out_features}, {in_features}] holds {bad} NaN/Inf entries; check the checkpoint."
        )
    if bool((energy < 0).any()):
        raise NumericalError(
            "ARMOR: the input energy diag(X^T X) holds negative entries, so it is no sum of squares; pass "
            "LayerStats.sq_sum of this layer's inputs."
        )


def _check_mask(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise PatternError(f"init_mask must be a bool tensor of the weight's shape {list(shape)}, got {got}.")
    mask = mask.to(torch.bool)
    counts = mask.reshape(shape[0], -1, GROUP).sum(-1)
    if not bool((counts == KEEP).all()):
        raise PatternError(
            "init_mask must keep exactly 2 entries in every group of 4 inputs (a 2:4 mask, True = kept); "
            f"{int((counts != KEEP).sum())} groups do not."
        )
    return mask


def _check_settings(iterations, lr, patience, rtol, atol, select) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"iterations must be an integer >= 0 (the reference uses 3000), got {iterations!r}.")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"patience must be an integer >= 1 (the reference uses 100), got {patience!r}.")
    for name, value in (("lr", lr), ("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}.")
    if select not in SELECT_MODES:
        raise ConfigError(f"select must be one of {SELECT_MODES}, got {select!r}.")


# ---------------------------------------------------------------------------------------------
# the factors


@dataclass
class ARMORFactors:
    """The result of :func:`armor_factorize`: W ~ A . diag(r) S_bar diag(c) . B.

    a_blocks   [out/bo, bo, bo]  diagonal blocks of A
    b_blocks   [in/bi, bi, bi]   diagonal blocks of B
    values     [out, in]         normalised sparse core S_bar (zero off ``mask``)
    mask       [out, in] bool    2:4 keep-mask (exactly 2 of every 4 inputs)
    row_norms  [out], col_norms [in]   the NoWag norms r, c
    losses     normalised proxy loss before the first iteration, then after each one
    """

    a_blocks: torch.Tensor
    b_blocks: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    row_norms: torch.Tensor
    col_norms: torch.Tensor
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    adam_rejected: int = 0
    discrete_rejected: int = 0
    groups_changed: int = 0

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    @property
    def iterations(self) -> int:
        return len(self.losses) - 1

    def core(self) -> torch.Tensor:
        """S = diag(r) S_bar diag(c): the 2:4 sparse matrix with the norms folded in."""
        return (self.values * self.mask) * self.row_norms[:, None] * self.col_norms[None, :]

    def reconstruct(self) -> torch.Tensor:
        """The dense approximation A S B [out, in]."""
        return _right(_left(self.a_blocks, self.core()), self.b_blocks)

    def info(self) -> dict[str, Any]:
        return {
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "iterations": self.iterations,
            "stopped_early": self.stopped_early,
            "adam_rejected": self.adam_rejected,
            "discrete_rejected": self.discrete_rejected,
            "groups_changed": self.groups_changed,
            "block_size": (int(self.a_blocks.shape[1]), int(self.b_blocks.shape[1])),
        }


class _Tiles:
    """Index bookkeeping of the discrete step: tiles = A-blocks x windows of lcm(bi, 4) inputs."""

    def __init__(self, out_features: int, in_features: int, out_block: int, in_block: int, device):
        self.out_block = out_block
        self.width = math.lcm(in_block, GROUP)
        self.row_blocks = out_features // out_block
        self.windows = in_features // self.width
        self.in_per_window = self.width // in_block
        self.groups_per_row = self.width // GROUP
        self.choices = out_block * self.groups_per_row  # groups a tile can pick from
        grid_p, grid_q = torch.meshgrid(
            torch.arange(self.row_blocks, device=device), torch.arange(self.windows, device=device), indexing="ij"
        )
        self.tile_p, self.tile_q = grid_p, grid_q  # [P, Q]
        self.offsets = torch.arange(GROUP, device=device)
        self.pairs = _PAIRS.to(device)
        support = torch.zeros(len(_PAIRS), GROUP, dtype=torch.bool, device=device)
        support.scatter_(1, self.pairs, True)
        self.supports = support  # [6, 4]

    def window_blocks(self, b_blocks: torch.Tensor) -> torch.Tensor:
        """B restricted to each input window: [Q, width, width] (block diagonal inside)."""
        if self.in_per_window == 1:
            return b_blocks
        k, size = self.in_per_window, b_blocks.shape[1]
        per = b_blocks.reshape(self.windows, k, size, size)
        eye = torch.eye(k, dtype=b_blocks.dtype, device=b_blocks.device)
        return torch.einsum("nkij,kl->nkilj", per, eye).reshape(self.windows, self.width, self.width)

    def group_scores(self, grad: torch.Tensor) -> torch.Tensor:
        """L1 norm of ``grad`` [out, in] over each group, as [P*Q, choices] (row-major inside a tile)."""
        norms = grad.abs().reshape(self.row_blocks, self.out_block, self.windows, self.groups_per_row, GROUP).sum(-1)
        return norms.permute(0, 2, 1, 3).reshape(-1, self.choices)


def _select_groups(tiles: _Tiles, grad: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """One group index (< tiles.choices) per tile, as [P, Q]: uniform, or ~ the group's L1 gradient."""
    shape = (tiles.row_blocks, tiles.windows)
    if tiles.choices == 1:
        return torch.zeros(shape, dtype=torch.long, device=generator.device)
    if grad is None:
        return torch.randint(0, tiles.choices, shape, generator=generator, device=generator.device)
    weights = tiles.group_scores(grad).to(torch.float64)
    total = weights.sum(1, keepdim=True)
    # a tile whose gradient vanishes everywhere draws uniformly
    weights = torch.where(total > 0, weights / total.clamp_min(1e-300), 1.0 / tiles.choices)
    return torch.multinomial(weights, 1, generator=generator).reshape(shape)


@torch.no_grad()
def _discrete_step(
    tiles: _Tiles, picks: torch.Tensor, residual: torch.Tensor, a_blocks, b_blocks, values, mask,
    row_norms, col_norms, sqrt_energy,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Best support and values for the picked group of every tile; apply the improving ones in place.

    ``residual`` is (W_hat - W) * sqrt(h) [out, in]. Returns (rows, cols, old values, old mask) of
    the changed groups so the caller can undo them, or None when no tile improved.
    """
    dtype = values.dtype
    rho = picks // tiles.groups_per_row  # row inside the A-block
    gamma = picks % tiles.groups_per_row  # group inside the window
    rows = tiles.tile_p * tiles.out_block + rho  # [P, Q]
    cols = (tiles.tile_q * tiles.width + gamma * GROUP)[..., None] + tiles.offsets  # [P, Q, 4]

    # a = r_i A[:, i] on the A-block (bo), Bg = diag(c_g) B[g, window] diag(sqrt h) (4 x width)
    a = a_blocks[tiles.tile_p, :, rho] * row_norms[rows][..., None]  # [P, Q, bo]
    b_window = tiles.window_blocks(b_blocks)  # [Q, w, w]
    local = gamma[..., None] * GROUP + tiles.offsets  # [P, Q, 4]
    b_rows = b_window[tiles.tile_q[..., None], local]  # [P, Q, 4, w]
    window_energy = sqrt_energy.reshape(tiles.windows, tiles.width)[tiles.tile_q]  # [P, Q, w]
    bg = b_rows * col_norms[cols][..., None] * window_energy[:, :, None, :]

    tile_residual = residual.reshape(tiles.row_blocks, tiles.out_block, tiles.windows, tiles.width)
    ea = torch.einsum("pbqt,pqb->pqt", tile_residual, a)  # E_tile^T a
    alpha = a.square().sum(-1)  # ||a||^2  [P, Q]
    gram = torch.einsum("pqjt,pqkt->pqjk", bg, bg)  # Bg Bg^T [P, Q, 4, 4]
    current = values[rows[..., None], cols] * mask[rows[..., None], cols]  # s [P, Q, 4]
    # loss(v) - ||E0||^2 = 2 v.m + alpha v^T G v, with E0 the tile residual without the group
    m = torch.einsum("pqjt,pqt->pqj", bg, ea) - alpha[..., None] * torch.einsum("pqjk,pqk->pqj", gram, current)

    pairs = tiles.pairs
    quad = alpha[..., None, None, None] * gram[:, :, pairs[:, :, None], pairs[:, None, :]]  # [P, Q, 6, 2, 2]
    lin = m[:, :, pairs]  # [P, Q, 6, 2]
    g00, g01, g11 = quad[..., 0, 0], quad[..., 0, 1], quad[..., 1, 1]
    damp = 8 * torch.finfo(dtype).eps * (g00 + g11) + torch.finfo(dtype).tiny
    g00, g11 = g00 + damp, g11 + damp
    det = g00 * g11 - g01 * g01
    v0 = -(g11 * lin[..., 0] - g01 * lin[..., 1]) / det
    v1 = -(g00 * lin[..., 1] - g01 * lin[..., 0]) / det
    candidates = torch.zeros(*lin.shape[:-1], GROUP, dtype=dtype, device=values.device)  # [P, Q, 6, 4]
    candidates.scatter_(-1, pairs.expand(*lin.shape[:-1], KEEP), torch.stack([v0, v1], -1))
    candidates = torch.nan_to_num(candidates, nan=0.0, posinf=0.0, neginf=0.0)

    def objective(v: torch.Tensor) -> torch.Tensor:  # 2 v.m + alpha v^T G v, v [..., k, 4]
        return 2 * torch.einsum("pqkj,pqj->pqk", v, m) + alpha[..., None] * torch.einsum(
            "pqkj,pqjl,pqkl->pqk", v, gram, v
        )

    base = objective(current[:, :, None, :])  # [P, Q, 1]
    change = objective(candidates) - base  # [P, Q, 6]: the exact loss change of each support
    best = change.argmin(-1)
    best_change = change.gather(-1, best[..., None]).squeeze(-1)
    # a change within the rounding of the terms it was computed from is no improvement
    magnitude = tile_residual.square().sum((1, 3)) + base.squeeze(-1).abs() + 2 * alpha * torch.einsum(
        "pqj,pqjk,pqk->pq", current, gram, current
    )
    accept = best_change < -16 * torch.finfo(dtype).eps * magnitude
    if not bool(accept.any()):
        return None
    rows_acc, cols_acc = rows[accept], cols[accept]  # [K], [K, 4]
    best_acc = best[accept]
    new_values = candidates[accept][torch.arange(best_acc.numel(), device=best_acc.device), best_acc]  # [K, 4]
    old_values = values[rows_acc[:, None], cols_acc].clone()
    old_mask = mask[rows_acc[:, None], cols_acc].clone()
    values[rows_acc[:, None], cols_acc] = new_values
    mask[rows_acc[:, None], cols_acc] = tiles.supports[best_acc]
    return rows_acc, cols_acc, old_values, old_mask


def armor_factorize(
    weight: torch.Tensor,
    energy: torch.Tensor,
    *,
    block_size: int | tuple[int, int] = 32,
    iterations: int = 3000,
    lr: float = 1e-4,
    patience: int = 100,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    seed: int = 0,
    init_mask: torch.Tensor | None = None,
    select: str = "gradient",
    freeze_factors: bool = False,
) -> ARMORFactors:
    """Factorize one weight W [out, in] as A . S . B with S 2:4 sparse (see the module docstring).

    energy:        h = diag(X^T X) [in], the summed squared calibration inputs (``LayerStats.sq_sum``)
    block_size:    size of the diagonal blocks of A and B (an int, or a pair (out_block, in_block));
                   must divide out/in. Block size 1 makes A and B diagonal.
    iterations:    block-coordinate-descent iterations (Adam step + discrete step each); 0 returns
                   the initial 2:4 pruning
    lr:            Adam learning rate on the normalised loss; 0 skips the continuous step
    patience, rtol, atol: stop once ``patience`` iterations in a row improved the loss by less than
                   rtol * loss or atol
    seed:          seeds the torch.Generator behind every random choice (same seed, same factors)
    init_mask:     a 2:4 keep-mask [out, in] to start from (e.g. Wanda's or SparseGPT's); default
                   NoWag-P (the 2 largest W_bar_ij^2 h_j per group)
    select:        "gradient" (draw each tile's group with probability ~ the L1 norm of dL/dS_bar
                   over it, the reference's default) or "random" (uniform)
    freeze_factors: keep A = B = I and the norms fixed (only the core's values and mask move)

    Computes in float32 (float64 for a float64 weight) on the weight's device.
    """
    _check_inputs(weight, energy)
    _check_settings(iterations, lr, patience, rtol, atol, select)
    out_features, in_features = weight.shape
    out_block, in_block = _block_sizes(block_size, out_features, in_features)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    device = weight.device
    w = weight.detach().to(dtype)
    h = energy.detach().to(device, dtype)
    sqrt_h = h.sqrt()

    normalized, row_norms, col_norms = nowag_normalize(w)
    mask = _check_mask(init_mask.to(device), (out_features, in_features)) if init_mask is not None else None
    if mask is None:
        mask = nowag_mask(normalized, h)
    mask = mask.clone()
    values = (normalized * mask).contiguous()
    eye_out = torch.eye(out_block, dtype=dtype, device=device)
    eye_in = torch.eye(in_block, dtype=dtype, device=device)
    a_blocks = eye_out.repeat(out_features // out_block, 1, 1)
    b_blocks = eye_in.repeat(in_features // in_block, 1, 1)
    scale = float((w.square() * h).sum(dtype=torch.float64))

    def evaluate() -> tuple[float, torch.Tensor]:
        residual = (_reconstruct(a_blocks, b_blocks, values, mask, row_norms, col_norms) - w) * sqrt_h
        return float(residual.square().sum(dtype=torch.float64)) / scale, residual

    factors = ARMORFactors(a_blocks, b_blocks, values, mask, row_norms, col_norms)
    if scale <= 0:  # zero weight or zero energy: every reconstruction has loss 0
        factors.losses.append(0.0)
        return factors
    loss, residual = evaluate()
    factors.losses.append(loss)

    trainable = [values] if freeze_factors else [values, a_blocks, b_blocks, row_norms, col_norms]
    optimizer = None
    if lr > 0 and iterations > 0:
        for tensor in trainable:
            tensor.requires_grad_(True)
        optimizer = torch.optim.Adam(trainable, lr=lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    tiles = _Tiles(out_features, in_features, out_block, in_block, device)
    left = patience

    try:
        for _ in range(iterations):
            previous = loss
            # (i) one Adam step on the continuous parameters, undone if it raised the loss
            if optimizer is not None:
                backup = [tensor.detach().clone() for tensor in trainable]
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    diff = _reconstruct(a_blocks, b_blocks, values, mask, row_norms, col_norms) - w
                    ((diff.square() * h).sum() / scale).backward()
                optimizer.step()
                with torch.no_grad():
                    values.mul_(mask)  # momentum must not revive pruned entries
                    trial, trial_residual = evaluate()
                    if trial <= loss:
                        loss, residual = trial, trial_residual
                    else:
                        for tensor, saved in zip(trainable, backup, strict=True):
                            tensor.copy_(saved)
                        factors.adam_rejected += 1
            # (ii) one discrete step on the sparse core, undone if it raised the recomputed loss
            with torch.no_grad():
                grad = None
                if select == "gradient" and tiles.choices > 1:
                    grad = _left(a_blocks.transpose(1, 2), _right(residual * sqrt_h, b_blocks.transpose(1, 2)))
                    grad = grad * row_norms[:, None] * col_norms[None, :]
                picks = _select_groups(tiles, grad, generator)
                changed = _discrete_step(
                    tiles, picks, residual, a_blocks, b_blocks, values, mask, row_norms, col_norms, sqrt_h
                )
                if changed is not None:
                    trial, trial_residual = evaluate()
                    if trial <= loss:
                        loss, residual = trial, trial_residual
                        factors.groups_changed += int(changed[0].numel())
                    else:
                        rows_acc, cols_acc, old_values, old_mask = changed
                        values[rows_acc[:, None], cols_acc] = old_values
                        mask[rows_acc[:, None], cols_acc] = old_mask
                        factors.discrete_rejected += 1
            factors.losses.append(loss)
            if loss > (1 - rtol) * previous or loss > previous - atol:
                left -= 1
                if left == 0:
                    factors.stopped_early = True
                    break
            else:
                left = patience
    finally:
        for tensor in trainable:
            tensor.requires_grad_(False)
    factors.values = (values * mask).detach()
    return factors


# ---------------------------------------------------------------------------------------------
# the module
