"""Distillation from the dense model while fine-tuning a sparse one (SquareHead, logit KL).

Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large Language Models":
the sparse student learns from its dense teacher through

    L = h_ce * CE + h_kl * KL(teacher || student, T) + h_sq * SquareHead

where SquareHead matches every block's output hidden state, each layer's MSE normalized by the
teacher's energy in that layer so deep layers with large activations do not dominate. The
reference setting (MPT-7B, GSM8K) is h_ce = 1, h_sq = 1, h_kl = 0: :class:`Distiller`'s defaults.

    distiller = Distiller(student, teacher)                     # teacher: the dense original
    sparsity = sw.training.attach(student, optimizer, method="magnitude", sparsity=0.7, total_steps=T)
    for batch in data:
        loss, parts = distiller.loss(batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad(); sparsity.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.adapters import ModelAdapter, unwrap_parallel

__all__ = ["BlockOutputs", "Distiller", "logit_kl", "squarehead_loss"]


def _tokens(tensor: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[batch, seq, ...] -> [tokens, features] over the non-padding tokens (all without a mask)."""
    if attention_mask is None:
        return tensor.reshape(-1, tensor.shape[-1])
    keep = attention_mask.to(tensor.device) != 0
    if tuple(keep.shape) != tuple(tensor.shape[: keep.dim()]):
        raise ConfigError(f"attention_mask of shape {tuple(keep.shape)} does not match hidden states "
                          f"{tuple(tensor.shape)}: pass the [batch, seq] mask of the same batch.")
    return tensor[keep]


def squarehead_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                    attention_mask: torch.Tensor | None = None, eps: float = 1e-6, *,
                    reduction: str = "sum") -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023): per-layer normalized feature MSE,

        L_sq = sum_l mean((h_s^l - h_t^l)^2) / (mean((h_t^l)^2) + eps),

    means over the non-padding tokens (``attention_mask`` != 0) and hidden units.

    Layers are *summed* by default, as in the paper and its reference code (IST-DASLab
    SparseFinetuning, ``KnowledgeDistillation``), so the published loss weights (h_sq = 1 next to
    h_ce = 1) mean the same here; ``reduction="mean"`` divides by the number of layers, making the
    term's scale independent of depth. Each term is invariant to scaling teacher and student
    features jointly (up to ``eps``). Computed in float32 on the student's device; the teacher's
    states carry no gradient.
    """
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ConfigError(f"SquareHead pairs layers: got {len(student_hidden)} student and {len(teacher_hidden)} "
                          "teacher hidden states (student and teacher need the same number of blocks, >= 1).")
    terms = []
    for index, (student, teacher) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        if student.shape != teacher.shape:
            raise ConfigError(f"layer {index}: student hidden state {tuple(student.shape)} and teacher "
                              f"{tuple(teacher.shape)} differ in shape.")
        student = _tokens(student.float(), attention_mask)
        teacher = _tokens(teacher.detach().to(student.device, torch.float32), attention_mask)
        terms.append((student - teacher).pow(2).mean() / (teacher.pow(2).mean() + eps))
    stacked = torch.stack(terms)
    return stacked.sum() if reduction == "sum" else stacked.mean()


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation KL (Hinton et al. 2015) per token, averaged over the non-padding tokens:

        T^2 * KL(softmax(z_t / T) || softmax(z_s / T)),

    the T^2 keeping gradient magnitudes comparable across temperatures. Float32, student's device.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}.")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ: distill between models with the same vocabulary.")
    student = _tokens(student_logits.float(), attention_mask)
    teacher = _tokens(teacher_logits.detach().to(student.device, torch.float32), attention_mask)
    if student.shape[0] == 0:  # every token is padding: nothing to match
        return student_logits.sum() * 0.0
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") / student.shape[0]
    return kl * temperature**2


class BlockOutputs:
    """Captures the output hidden state of every repeated block (``ModelAdapter(model).blocks``)
    through forward hooks, for any family with repeated blocks::

        with BlockOutputs(model) as captured:
            model(**batch)
        captured.hidden          # [block 0 output, block 1 output, ...]

    A block returning a tuple (most transformers families) gives its first element; one returning
    a tensor (LLaMA in transformers 5) gives the tensor. Gradients flow through the captured
    tensors. A later forward inside the same ``with`` replaces the captures.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[tuple[str, nn.Module]] | None = None):
        self.model = unwrap_parallel(model)
        self.blocks = list(ModelAdapter(self.model).blocks if blocks is None else blocks)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles: list[Any] = []

    def _hook(self, index: int):
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple | list) else output
            if not torch.is_tensor(hidden):
                hidden = getattr(hidden, "last_hidden_state", None)
            if not torch.is_tensor(hidden):
                raise ConfigError(f"block {self.blocks[index][0]} returned {type(output).__name__}; BlockOutputs "
                                  "expects a tensor or a tuple starting with the hidden state.")
            self.outputs[index] = hidden
        return capture

    def __enter__(self) -> BlockOutputs:
        self.clear()
        self._handles = [block.register_forward_hook(self._hook(index))
                         for index, (_, block) in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.outputs = [None] * len(self.blocks)

    @property
    def hidden(self) -> list[torch.Tensor]:
        """Every block's captured output, in block order."""
        missing = [name for (name, _), out in zip(self.blocks, self.outputs, strict=True) if out is None]
        if missing:
            raise ConfigError(f"blocks {', '.join(missing[:3])} produced no output: run the model's forward "
                              "inside the `with BlockOutputs(model)` block.")
        return list(self.outputs)  # type: ignore[arg-type]


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _moved(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class Distiller:
    """Task loss + distillation from a dense teacher: h_ce * CE + h_kl * KL + h_sq * SquareHead.

    ``loss(batch)`` runs the teacher under no_grad and the student with gradients on the same
    batch (``input_ids``, ``attention_mask``; ``labels`` default to ``input_ids`` with padding
    ignored, the causal-LM objective) and returns (weighted total, {term: unweighted value}).
    The teacher may sit on another device or dtype; its outputs are moved to the student's device
    in float32. The teacher is put in eval mode (no dropout).

    ce, squarehead, kl: the weights h_ce, h_sq, h_kl (a zero weight skips the term's work)
    temperature:        T of the KL term
    reduction:          how SquareHead combines layers: "sum" (paper, default) or "mean"
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce: float = 1.0, squarehead: float = 1.0,
                 kl: float = 0.0, temperature: float = 1.0, eps: float = 1e-6, reduction: str = "sum"):
        weights = {"ce": ce, "squarehead": squarehead, "kl": kl}
        if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
            raise ConfigError(f"loss weights must be >= 0 with at least one > 0, got {weights}.")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}.")
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.student, self.teacher = student, teacher.eval()
        self.weights, self.temperature, self.eps, self.reduction = weights, temperature, eps, reduction
        if squarehead:
            student_blocks = len(ModelAdapter(unwrap_parallel(student)).blocks)
            teacher_blocks = len(ModelAdapter(unwrap_parallel(teacher)).blocks)
            if student_blocks != teacher_blocks:
                raise ConfigError(f"SquareHead matches block by block: the student has {student_blocks} blocks, "
                                  f"the teacher {teacher_blocks}; use squarehead=0 (logit KL only) across depths.")

    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """(h_ce * CE + h_kl * KL + h_sq * SquareHead, {"ce", "kl", "squarehead", "loss"})."""
        if "input_ids" not in batch:
            raise ConfigError("the batch needs input_ids (and attention_mask for padded batches).")
        student_inputs = _moved(batch, _device(self.student))
        attention_mask = student_inputs.get("attention_mask")
        if self.weights["ce"] and "labels" not in student_inputs:
            labels = student_inputs["input_ids"].clone()
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)  # no loss on padding
            student_inputs["labels"] = labels
        elif not self.weights["ce"]:
            student_inputs.pop("labels", None)  # no CE asked: spare the student's loss computation
        want_hidden = bool(self.weights["squarehead"])
        teacher_out, teacher_hidden = None, None
        if self.weights["squarehead"] or self.weights["kl"]:
            teacher_inputs = _moved({k: v for k, v in batch.items() if k != "labels"}, _device(self.teacher))
            with torch.no_grad(), (BlockOutputs(self.teacher) if want_hidden else contextlib.nullcontext()) as cap:
                teacher_out = self.teacher(**teacher_inputs)
            teacher_hidden = cap.hidden if want_hidden else None
        with BlockOutputs(self.student) if want_hidden else contextlib.nullcontext() as captured:
            student_out = self.student(**student_inputs)
        total = torch.zeros((), device=_device(self.student))
        parts: dict[str, float] = {}
        if self.weights["ce"]:
            ce = getattr(student_out, "loss", None)
            if ce is None:
                raise ConfigError(f"{type(self.student).__name__} returned no loss for the labels: use a model "
                                  "with a language-model head (or ce=0 with squarehead/kl only).")
            total = total + self.weights["ce"] * ce.float()
            parts["ce"] = float(ce.detach())
        if self.weights["kl"]:
            kl = logit_kl(student_out.logits, teacher_out.logits, self.temperature, attention_mask)
            total = total + self.weights["kl"] * kl
            parts["kl"] = float(kl.detach())
        if want_hidden:
            squarehead = squarehead_loss(captured.hidden, teacher_hidden, attention_mask, self.eps,
                                         reduction=self.reduction)
            total = total + self.weights["squarehead"] * squarehead
            parts["squarehead"] = float(squarehead.detach())
        parts["loss"] = float(total.detach())
        return total, parts
