"""DSnoT: training-free mask refinement by pruning-and-growing swaps within each output row.

Zhang et al. 2023, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs"
(ICLR 2024; reference code github.com/zyxxmu/DSnoT).

With c_ij = W_ij * E[x_j] (W the DENSE weight), the expected reconstruction error of row i is

    e_i = sum_{j pruned} c_ij            (E[dense output] - E[sparse output])

Each cycle, every row with |e_i| > threshold proposes one swap:

* grow the pruned j with the largest c_ij / Var[x_j]^p among those with sign(c_ij) = sign(e_i)
  (growing removes c_ij from e_i, so it must share e_i's sign; dividing by the variance prefers
  channels whose mean is a reliable stand-in for every token);
* prune a kept k. Unstructured: the smallest Wanda score |W_ik| * ||X_k|| among kept weights with
  sign(c_ik) = -sign(e_i) (pruning adds c_ik to e_i, so it must push e_i toward 0). N:M: the
  smallest Wanda score among the original kept weights of the grown weight's M-block, so every
  block keeps exactly N.

so e_i <- e_i - c_ij + c_ik. The refined weight is the dense weight times the new mask: no
gradient, no weight update. The row's sparsity is unchanged (one in, one out per swap).

Where this differs from the reference code: e_i uses the per-token mean E[x_j], whereas the
reference sums x_j over each sample's tokens (seqlen x the mean), so its threshold of 0.1 is about
0.1 / seqlen here: the default :data:`DEFAULT_THRESHOLD` is 0.1 / 2048 (the reference's default
calibration length); Var[x_j] is over all calibration tokens (the reference averages per-sample
variances); ``keep_best`` (on by default) returns each row's best point of its swap sequence; rows
with no valid candidate stop instead of swapping a wrong-signed or already-kept weight.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..calibration.stats import STAT_MOMENTS, STAT_NORMS, check_channel_stat
from ..errors import ConfigError, NumericalError
from ..methods._common import check_options
from ..patterns import check_mask
from .base import RefineResult, RefineTask, register, require_refine_stats

# The reference code's --skip_layer default: refine attention projections, leave MLP sublayers as
DEFAULT_THRESHOLD = 0.1 / 2048  # the reference's 0.1 on its per-sample token sums, seqlen 2048
# the pruner left them. Pass skip_modules=DSNOT_REPO_SKIP to DSnoT to reproduce it.
DSNOT_REPO_SKIP: tuple[str, ...] = ("mlp",)


def expected_output_error(dense_weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_i = sum_j W_ij * E[x_j] * [j pruned]: per row, E[dense output] - E[sparse output] (float64)."""
    contribution = dense_weight.detach().to(torch.float32) * mean.detach().to(dense_weight.device, torch.float32)
    return torch.where(mask, 0.0, contribution).sum(1, dtype=torch.float64)


def check_dsnot_settings(threshold: float, max_cycles: int, power: float) -> None:
    """Raise ConfigError unless the scalar settings make sense."""
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(f"dsnot threshold must be a finite number >= 0 (|e_i| below it stops a row), got {threshold!r}.")
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 0:
        raise ConfigError(f"dsnot max_cycles must be an integer >= 0 (e.g. 50), got {max_cycles!r}.")
    if not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
        raise ConfigError(f"dsnot power (exponent of Var[x_j] in the grow score) must be finite and >= 0, got {power!r}.")


def _check_inputs(
    dense_weight: torch.Tensor,
    mask: torch.Tensor,
    channel_stats: dict[str, torch.Tensor],
    m_block: int | None,
) -> None:
    if not isinstance(dense_weight, torch.Tensor) or dense_weight.dim() != 2 or not dense_weight.is_floating_point():
        got = tuple(dense_weight.shape) if isinstance(dense_weight, torch.Tensor) else type(dense_weight).__name__
        raise ConfigError(f"dsnot needs a 2-D floating-point dense weight laid out [out, in], got {got}.")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != dense_weight.shape:
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ConfigError(
            f"dsnot needs a bool keep-mask shaped like the weight {tuple(dense_weight.shape)}, got {got}; "
            "pass the pruner's mask (True = kept) for this same layer."
        )
    in_features = dense_weight.shape[1]
    for label, values in channel_stats.items():
        check_channel_stat(values, in_features, "dsnot", label)
    for label in ("var", "sq_norms"):
        if bool((channel_stats[label] < 0).any()):
            raise NumericalError(f"dsnot: {label} must be >= 0; pass Var[x_j] and sum_t x_tj^2, not signed values.")
    if not bool(torch.isfinite(dense_weight).all()):
        raise NumericalError("dsnot: the dense weight holds NaN/Inf; check the checkpoint before pruning.")
    if m_block is not None:
        if isinstance(m_block, bool) or not isinstance(m_block, int) or m_block < 2 or in_features % m_block:
            raise ConfigError(
                f"dsnot m_block must be None (unstructured) or the M of an N:M pattern, an integer >= 2 dividing "
                f"the input dimension ({in_features}); got {m_block!r}."
            )


def _sorted_candidates(
    allowed: torch.Tensor, key: torch.Tensor, descending: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column indices with ``allowed`` set, best key first (stable), and how many there are."""
    filler = -math.inf if descending else math.inf
    order = torch.sort(torch.where(allowed, key, filler), dim=1, descending=descending, stable=True).indices
    return order, allowed.sum(1)


def _pick(order: torch.Tensor, pointer: torch.Tensor) -> torch.Tensor:
    """order[i, pointer[i]] per row (pointer clamped; callers check it against the count)."""
    return order.gather(1, pointer.clamp(max=order.shape[1] - 1).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def dsnot_masks(
    dense_weight: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sq_norms: torch.Tensor,
    *,
    m_block: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_cycles: int = 50,
    power: float = 1.0,
    sign_check: bool = False,
    keep_best: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine a keep-mask by DSnoT swaps (see the module docstring for the formulas).

    ``mean``, ``var``, ``sq_norms``: E[x_j], Var[x_j] and sum_t x_tj^2 of the layer input, [in].
    ``m_block``: M of an N:M mask (swaps stay inside an M-block), None for unstructured.
    ``threshold``: a row swaps only while |e_i| > threshold (absolute, in output units).
    ``max_cycles``: number of cycles; each cycle tries at most one swap per row.
    ``power``: p in the grow score c_ij / Var[x_j]^p (0: no variance scaling).
    ``sign_check``: stop a row at its first swap that would flip sign(e_i) from its initial sign
    (the reference code's ``--without_same_sign False``; its default, as here, is off).
    ``keep_best``: return, per row, the mask at the point of its swap sequence with the smallest
    |e_i|, so no row ends worse than it started (swaps may overshoot e_i = 0). False returns the
    mask where the sequence stopped, as the reference code does.
    A row stops when |e_i| <= threshold, when it has no candidate left on the side it needs, or
    after ``max_cycles`` cycles. Each candidate is tried once, in list order.

    Returns the new mask (bool, on the weight's device) and info: swaps, rows_updated, cycles,
    max_swaps_per_row, mean_abs_error_before / mean_abs_error_after (mean_i |e_i|).
    """
    channel_stats = {"mean": mean, "var": var, "sq_norms": sq_norms}
    _check_inputs(dense_weight, mask, channel_stats, m_block)
    check_dsnot_settings(threshold, max_cycles, power)
    device = dense_weight.device
    weight = dense_weight.detach().to(torch.float32)
    mean, var, sq_norms = (values.detach().to(device, torch.float32) for values in (mean, var, sq_norms))
    out_features = weight.shape[0]

    keep = mask.detach().to(device).clone()
    originally_kept = keep.clone()
    contribution = weight * mean.unsqueeze(0)  # c_ij
    error = torch.where(keep, 0.0, contribution).sum(1, dtype=torch.float64)  # e_i, float64: many updates
    error_before = error.clone()
    initial_sign = torch.sign(error)

    # A floor on Var keeps constant channels (Var = 0) finite; they still rank first, as in the reference code.
    var_floor = max(float(var.max()) * 1e-12, torch.finfo(torch.float32).tiny)
    grow_score = contribution / var.clamp_min(var_floor).pow(power)
    pruned = ~keep
    # Candidate lists are fixed up front: a grown weight is never pruned again and a weight pruned
    # by a swap is never regrown, so each list is walked once, front to back, with a pointer.
    grow_if_positive, grow_count_positive = _sorted_candidates(pruned & (contribution > 0), grow_score, True)
    grow_if_negative, grow_count_negative = _sorted_candidates(pruned & (contribution < 0), grow_score, False)
    grow_pointer_positive = torch.zeros(out_features, dtype=torch.long, device=device)
    grow_pointer_negative = torch.zeros_like(grow_pointer_positive)

    wanda = weight.abs() * sq_norms.sqrt().unsqueeze(0)
    if m_block is None:
        prune_if_positive, prune_count_positive = _sorted_candidates(keep & (contribution < 0), wanda, False)
        prune_if_negative, prune_count_negative = _sorted_candidates(keep & (contribution > 0), wanda, False)
        prune_pointer_positive = torch.zeros_like(grow_pointer_positive)
        prune_pointer_negative = torch.zeros_like(grow_pointer_positive)
    else:
        block_offsets = torch.arange(m_block, device=device)

    rows = torch.arange(out_features, device=device)
    swaps_per_row = torch.zeros(out_features, dtype=torch.long, device=device)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (accepted, grown, pruned) per cycle
    best_abs_error = error.abs()
    best_cycle = torch.zeros(out_features, dtype=torch.long, device=device)  # cycles of swaps to keep
    active = error.abs() > threshold
    cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        positive = error > 0

        grow_pointer = torch.where(positive, grow_pointer_positive, grow_pointer_negative)
        has_grow = grow_pointer < torch.where(positive, grow_count_positive, grow_count_negative)
        grow_index = torch.where(positive, _pick(grow_if_positive, grow_pointer), _pick(grow_if_negative, grow_pointer))

        if m_block is None:
            prune_pointer = torch.where(positive, prune_pointer_positive, prune_pointer_negative)
            has_prune = prune_pointer < torch.where(positive, prune_count_positive, prune_count_negative)
            prune_index = torch.where(
                positive, _pick(prune_if_positive, prune_pointer), _pick(prune_if_negative, prune_pointer)
            )
            # e_i only changes by a swap, so a row out of candidates on its side is done for good
            active &= has_grow & has_prune
        else:
            # N:M: the weight pruned must leave the grown weight's block, so the block keeps N.
            # Weights grown earlier are not candidates (as in the reference code).
            block_start = grow_index - grow_index % m_block
            block_columns = block_start.unsqueeze(1) + block_offsets
            prunable = keep.gather(1, block_columns) & originally_kept.gather(1, block_columns)
            block_scores = torch.where(prunable, wanda.gather(1, block_columns), math.inf)
            prune_index = block_start + block_scores.argmin(1)
            has_prune = prunable.any(1)  # if not, only this grow candidate is skipped
            active &= has_grow

        error_after = (
            error
            - contribution.gather(1, grow_index.unsqueeze(1)).squeeze(1).double()
            + contribution.gather(1, prune_index.unsqueeze(1)).squeeze(1).double()
        )
        if sign_check:
            # as in the reference code, a row stops at its first swap that would flip sign(e_i)
            active &= torch.sign(error_after) == initial_sign
        accept = active & has_prune

        swapped = rows[accept]
        keep[swapped, grow_index[accept]] = True
        keep[swapped, prune_index[accept]] = False
        error = torch.where(accept, error_after, error)
        swaps_per_row += accept
        history.append((accept, grow_index, prune_index))

        # each candidate is tried once, taken or not (the reference code walks its lists the same way)
        grow_pointer_positive += active & positive
        grow_pointer_negative += active & ~positive
        if m_block is None:
            prune_pointer_positive += active & positive
            prune_pointer_negative += active & ~positive

        improved = error.abs() < best_abs_error
        best_abs_error = torch.where(improved, error.abs(), best_abs_error)
        best_cycle = torch.where(improved, cycles, best_cycle)
        active &= error.abs() > threshold

    if keep_best:
        # Undo, per row, the swaps made after its smallest |e_i|. Swaps of one row touch disjoint
        # entries (a grown weight is never pruned again, a pruned one never regrown), so undoing
        # them in any order restores exactly the mask at the best point.
        for cycle, (accepted, grown, pruned_now) in enumerate(history):
            undo = accepted & (cycle >= best_cycle)
            undone = rows[undo]
            keep[undone, grown[undo]] = False
            keep[undone, pruned_now[undo]] = True
            swaps_per_row -= undo.long()
    final_abs_error = best_abs_error if keep_best else error.abs()

    info = {
        "swaps": int(swaps_per_row.sum()),
        "rows_updated": int((swaps_per_row > 0).sum()),
        "max_swaps_per_row": int(swaps_per_row.max()) if out_features else 0,
        "cycles": cycles,
        "mean_abs_error_before": float(error_before.abs().mean()) if out_features else 0.0,
        "mean_abs_error_after": float(final_abs_error.mean()) if out_features else 0.0,
    }
    return keep, info


@register
class DSnoT:
    """DSnoT as a :class:`MaskRefiner` ("dsnot"); see :func:`dsnot_masks` for the options.

    ``skip_modules``: dotted-name parts whose layers are passed through unrefined (the reference
    code skips MLP sublayers: :data:`DSNOT_REPO_SKIP`). Default: the reference's (attention only);
    refining every layer (``skip_modules=()``) made SmolLM2 at 70% worse (ppl 2067 vs 1128, RESULTS.md).
    Unstructured (any scope) and N:M masks are supported; block masks are refused.
    """

    name: ClassVar[str] = "dsnot"
    needs: ClassVar[frozenset[str]] = frozenset({STAT_NORMS, STAT_MOMENTS})

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        max_cycles: int = 50,
        power: float = 1.0,
        sign_check: bool = False,
        keep_best: bool = True,
        skip_modules: tuple[str, ...] = DSNOT_REPO_SKIP,
    ) -> None:
        check_dsnot_settings(threshold, max_cycles, power)
        self.defaults: dict[str, Any] = {
            "threshold": threshold, "max_cycles": max_cycles, "power": power,
            "sign_check": sign_check, "keep_best": keep_best, "skip_modules": tuple(skip_modules),
        }

    def refine(self, task: RefineTask) -> RefineResult:
        options = {**self.defaults, **check_options(task, self.name, self.defaults)}
        skip_modules = options.pop("skip_modules")
        if isinstance(skip_modules, str):
            skip_modules = (skip_modules,)
        pattern = task.pattern
        if pattern.kind == "block":
            raise ConfigError(
                f"{task.name}: dsnot swaps single weights, which would break the {pattern} tiles; "
                "use an unstructured or N:M pattern, or do not refine this layer."
            )
        if skip_modules and set(task.name.split(".")) & set(skip_modules):
            mask = task.mask.clone()
            return RefineResult(
                weight=torch.where(mask, task.dense_weight, 0.0), mask=mask, info={"skipped": True, "swaps": 0}
            )
        pattern.check_shape(tuple(task.dense_weight.shape), task.name)
        if isinstance(task.mask, torch.Tensor) and task.mask.shape == task.dense_weight.shape:
            if not check_mask(task.mask, pattern):
                raise ConfigError(
                    f"{task.name}: the mask does not obey pattern {pattern}; pass the pattern the pruner used."
                )
        stats = require_refine_stats(task, self.name, {"sq_sum": STAT_NORMS, "col_sum": STAT_MOMENTS})
        try:
            mask, info = dsnot_masks(
                task.dense_weight, task.mask, stats.mean, stats.var, stats.sq_sum,
                m_block=pattern.m if pattern.kind == "nm" else None, **options,
            )
        except (ConfigError, NumericalError) as error:
            raise type(error)(f"{task.name}: {error}") from error
        info["tokens"] = stats.tokens
        return RefineResult(weight=torch.where(mask, task.dense_weight, 0.0), mask=mask, info=info)
