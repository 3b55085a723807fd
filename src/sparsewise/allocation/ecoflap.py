"""ECoFLaP's coarse step: block importance from the loss, kept weights shared proportionally.

Sung et al. 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for Vision-Language
Models". Block score = sum over its pruned weight tensors of an importance:
  * "zeroth" (default): MeZO two-point estimates, per tensor and calibration batch, perturbing
    only that tensor by +-eps z (z ~ N(0, I), eps = 1e-3): g = (L(w + eps z) - L(w - eps z)) / 2eps,
    accumulating |g| (forward passes only);
  * "first": sum |dL/dW| (or |W dL/dW| with ``first_order="wg"``) from backpropagation.
Allocation: each block first keeps a floor (1 - max_sparsity) N_b (max_sparsity = target + 0.1),
the rest of the kept budget (1 - s) N goes to blocks in proportion to their scores, capped at
dense and redistributed until it is all placed. The loss is the model's own language-modelling
loss on the calibration tokens (labels = inputs).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..calibration.distributed import sum_across_ranks_
from ..calibration.engine import batch_rows, check_memory
from ..calibration.run import calibration_batches
from ..errors import ConfigError
from .base import AllocationContext, register


def proportional_keep(scores: dict[int, float], sizes: dict[int, int], keep_total: float,
                      floor_density: float) -> dict[int, float]:
    """Kept counts per block: floor_density * N_b each, the rest proportional to score, at most N_b."""
    keep = {block: floor_density * sizes[block] for block in sizes}
    left = keep_total - sum(keep.values())
    if left < -1e-6:
        raise ConfigError(f"the per-block floor keeps more than the budget: raise max_sparsity above "
                          f"{1 - floor_density:.3f} or lower the target sparsity.")
    open_blocks = set(sizes)
    while left > 1e-6 and open_blocks:
        weight = sum(max(scores[block], 0.0) for block in open_blocks)
        share = {block: (max(scores[block], 0.0) / weight if weight > 0 else 1 / len(open_blocks))
                 for block in open_blocks}
        placed = 0.0
        for block in sorted(open_blocks):
            room = sizes[block] - keep[block]
            give = min(room, left * share[block])
            keep[block] += give
            placed += give
            if sizes[block] - keep[block] <= 1e-9:
                open_blocks.discard(block)
        left -= placed
        if placed <= 1e-12:
            break
    return keep


def _lm_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    inputs = {key: value.to(device) for key, value in batch.items()}
    if "input_ids" not in inputs:
        raise ConfigError("ECoFLaP scores blocks by the language-modelling loss: the calibration needs input_ids.")
    output = model(**inputs, labels=inputs["input_ids"])
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ConfigError("ECoFLaP needs a model that returns a loss given labels (a causal LM).")
    return loss


@register
class ECoFLaP:
    name: ClassVar[str] = "ecoflap"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, score: str = "zeroth", first_order: str = "g", eps: float = 1e-3,
                 max_sparsity: float | None = None, batch_size: int = 8, max_batches: int | None = None):
        if score not in ("zeroth", "first"):
            raise ValueError(f"score must be 'zeroth' or 'first', got {score!r}.")
        if first_order not in ("g", "wg", "w2g2"):
            raise ValueError(f"first_order must be 'g', 'wg' or 'w2g2', got {first_order!r}.")
        self.score, self.first_order, self.eps = score, first_order, eps
        self.max_sparsity, self.batch_size, self.max_batches = max_sparsity, batch_size, max_batches
        self.info: dict = {}

    def _batches(self, context: AllocationContext) -> list[dict]:
        """The calibration re-batched by ``batch_size`` samples, whatever form it came in (one dict
        holding every sample is cut too: the backward of "first" runs one micro-batch at a time)."""
        batches = calibration_batches(context.calibration, self.batch_size)
        return batches[: self.max_batches] if self.max_batches else batches

    def check_memory(self, context: AllocationContext, batches: list[dict]) -> None:
        """Refuse a loss pass that clearly cannot fit on the device, before it starts.

        Lower bound per micro-batch of T tokens: the float32 log-probabilities over the vocabulary
        and their gradient (2 T V 4 bytes; "zeroth": the logits only, T V 4), and for "first" the
        input of every scored layer saved for its weight gradient (T times the distinct input
        widths of each block's layers) plus the weight gradients themselves.
        """
        model = context.model
        tokens = max((int(batch["input_ids"].numel()) for batch in batches
                      if isinstance(batch.get("input_ids"), torch.Tensor)), default=0)
        if model is None or not tokens:
            return
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(getattr(head, "out_features", 0) or getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        element = next(model.parameters()).element_size()
        need = tokens * vocab * 4
        if self.score == "first":
            widths: dict[int, set[int]] = {}
            for shape in context.shapes.values():
                widths.setdefault(shape.block, set()).add(shape.in_features)
            need = 2 * need + tokens * element * sum(sum(block) for block in widths.values())
            need += element * sum(shape.params for shape in context.shapes.values())
        rows = max(batch_rows(batch) for batch in batches)
        what = "forward passes" if self.score == "zeroth" else "backward passes"
        check_memory(need, context.device,
                     f"ECoFLaP's {what} over micro-batches of {rows} samples ({tokens} tokens, vocabulary {vocab})",
                     f"lower allocation_options batch_size (now {self.batch_size}) or the calibration seqlen",
                     all_ranks=True)

    def tensor_scores(self, context: AllocationContext) -> dict[str, float]:
        """Importance of every counted layer's weight (see module docstring)."""
        model, device = context.model, context.device
        if model is None or context.calibration is None:
            raise ConfigError("allocation 'ecoflap' needs the model and calibration data.")
        batches = self._batches(context)
        home = next(model.parameters()).device
        model.to(device)
        scores = dict.fromkeys(context.shapes, 0.0)
        try:
            self.check_memory(context, batches)
            if self.score == "zeroth":
                self._zeroth(context, scores, batches)
            else:
                self._first(context, scores, batches)
        finally:
            model.to(home)
        # under torchrun each rank saw its share of the batches: the sums over all of them
        names = list(scores)
        total = sum_across_ranks_(torch.tensor([scores[name] for name in names], dtype=torch.float64))
        return dict(zip(names, total.tolist(), strict=True))

    @torch.no_grad()
    def _zeroth(self, context: AllocationContext, scores: dict[str, float], batches: list[dict]) -> None:
        generator = torch.Generator(device="cpu").manual_seed(context.seed)
        for batch in batches:
            for name in context.shapes:
                layer = context.layers[name]
                weight = layer.get_weight()
                original = weight.detach().clone()
                direction = torch.randn(original.shape, generator=generator).to(original)
                try:  # a failing forward must not leave a perturbed weight behind
                    layer.set_weight(original + self.eps * direction)
                    plus = float(_lm_loss(context.model, batch, context.device))
                    layer.set_weight(original - self.eps * direction)
                    minus = float(_lm_loss(context.model, batch, context.device))
                finally:
                    layer.set_weight(original)
                scores[name] += abs(plus - minus) / (2 * self.eps)

    def _first(self, context: AllocationContext, scores: dict[str, float], batches: list[dict]) -> None:
        modules = {name: context.layers[name].module for name in context.shapes}
        previous = {name: module.weight.requires_grad for name, module in modules.items()}
        try:
            for module in modules.values():
                module.weight.requires_grad_(True)
                module.weight.grad = None
            for batch in batches:
                _lm_loss(context.model, batch, context.device).backward()
            for name, module in modules.items():  # to_rows: an expert's slice of a fused parameter's gradient
                layer = context.layers[name]
                grad, weight = layer.to_rows(module.weight.grad).float(), layer.get_weight().float()
                value = {"g": grad.abs(), "wg": (weight * grad).abs(), "w2g2": (weight * grad) ** 2}[self.first_order]
                scores[name] = float(value.sum())
        finally:
            for name, module in modules.items():
                module.weight.grad = None
                module.weight.requires_grad_(previous[name])

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        tensor_scores = self.tensor_scores(context)
        blocks = sorted({shape.block for shape in context.shapes.values()})
        block_scores = {block: sum(tensor_scores[name] for name, shape in context.shapes.items()
                                   if shape.block == block) for block in blocks}
        sizes = {block: sum(shape.params for shape in context.shapes.values() if shape.block == block)
                 for block in blocks}
        max_sparsity = self.max_sparsity if self.max_sparsity is not None else min(0.99, context.target + 0.1)
        keep = proportional_keep(block_scores, sizes, (1 - context.target) * sum(sizes.values()), 1 - max_sparsity)
        self.info = {"block_scores": block_scores, "max_sparsity": max_sparsity}
        return {name: 1 - keep[shape.block] / sizes[shape.block] for name, shape in context.shapes.items()}
