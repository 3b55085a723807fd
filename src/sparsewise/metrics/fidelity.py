"""Output fidelity of a pruned model against its dense reference on held-out inputs.

KL(reference || model) per position = sum_v p_ref(v) (log p_ref(v) - log p_model(v)), averaged
over all positions; top-1 agreement = share of positions where both argmaxes are equal.

Precision: the reference log-probs are stored on the CPU in ``dtype`` (bfloat16 by default:
2 bytes x positions x vocab, about 0.8 GB for 16 x 512 positions of a 49k vocabulary). The
compared model's log-probs are rounded to the same dtype before the difference, so an
unchanged model gives exactly 0 KL and agreement 1.0; the rounding limits the KL resolution
to roughly 1e-3 nats. Use ``dtype=torch.float32`` for finer values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data import CalibrationSet, _logits, _model_device
from ..errors import ConfigError, DataError


@dataclass
class FidelityResult:
    kl: float  # mean KL(reference || model) per position, in nats
    top1_agreement: float  # fraction of positions with the same argmax token
    tokens: int  # positions compared

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"KL {self.kl:.5f} nats/token, top-1 agreement {self.top1_agreement:.2%} over {self.tokens} tokens"


def kl_and_agreement(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(ref || model) and argmax agreement over the last (vocabulary) dim.

    Both inputs are log-probabilities [..., V]; returns (kl [...], agree bool [...]), computed in float32.
    """
    if ref_logprobs.shape != logprobs.shape:
        raise DataError(f"log-prob shapes differ: reference {tuple(ref_logprobs.shape)} vs {tuple(logprobs.shape)}.")
    ref = ref_logprobs.float()
    other = logprobs.float().to(ref.device)
    kl = (ref.exp() * (ref - other)).sum(dim=-1)
    agree = ref.argmax(dim=-1) == other.argmax(dim=-1)
    return kl, agree


def _as_ids(inputs: torch.Tensor | CalibrationSet) -> torch.Tensor:
    ids = inputs.input_ids if isinstance(inputs, CalibrationSet) else inputs
    if ids is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise DataError("a fidelity probe needs input_ids of shape [n, seqlen] (a tensor or a text CalibrationSet).")
    return ids.long()


class FidelityProbe:
    """Reference log-probs of held-out inputs, captured once, compared against later models."""

    def __init__(self, input_ids: torch.Tensor, ref_logprobs: list[torch.Tensor], batch_size: int,
                 dtype: torch.dtype) -> None:
        self.input_ids = input_ids
        self.ref_logprobs = ref_logprobs  # one [b, seqlen, V] tensor per batch, on the CPU
        self.batch_size = batch_size
        self.dtype = dtype

    @classmethod
    @torch.no_grad()
    def capture(cls, reference_model: torch.nn.Module, input_ids: torch.Tensor | CalibrationSet, *,
                batch_size: int = 4, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.bfloat16) -> FidelityProbe:
        """Run the reference model once and keep its log-probs (in ``dtype``, on the CPU)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        ids = _as_ids(input_ids).cpu()
        stored = [logprobs.to(dtype).cpu() for logprobs in _batched_logprobs(reference_model, ids, batch_size, device)]
        return cls(ids, stored, batch_size, dtype)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    @torch.no_grad()
    def compare(self, model: torch.nn.Module, *, device: torch.device | str | None = None) -> FidelityResult:
        """KL(reference || model) and top-1 agreement, averaged over all probe positions."""
        kl_sum, agree_sum = 0.0, 0
        batches = _batched_logprobs(model, self.input_ids, self.batch_size, device)
        for ref, logprobs in zip(self.ref_logprobs, batches, strict=True):
            # same rounding on both sides: identical models compare as exactly equal
            kl, agree = kl_and_agreement(ref, logprobs.to(self.dtype).cpu())
            kl_sum += float(kl.double().sum())
            agree_sum += int(agree.sum())
        return FidelityResult(kl=kl_sum / self.tokens, top1_agreement=agree_sum / self.tokens, tokens=self.tokens)


def _batched_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int,
                      device: torch.device | str | None):
    """Yield float32 log-softmax outputs [b, seqlen, V] batch by batch (model in eval mode)."""
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            yield torch.log_softmax(_logits(model(input_ids=batch)).float(), dim=-1)
    finally:
        model.train(was_training)
