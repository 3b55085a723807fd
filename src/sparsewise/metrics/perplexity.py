"""Perplexity over non-overlapping windows (the Wanda/SparseGPT evaluation protocol).

The text is tokenized once without special tokens and cut into ``total = tokens // seqlen``
windows (the tail is dropped). Window loss = mean cross-entropy over its ``seqlen - 1`` shifted
targets; ``ppl = exp(mean of window losses)``. With ``max_windows`` an evenly spaced subset is
used: ``stride = total // max_windows``, windows ``0, stride, 2 * stride, ...``.

``seqlen`` may not exceed the positions the model was built for (``config.max_position_embeddings``,
or GPT-2's ``n_positions``): beyond them the numbers mean nothing, so it is refused, not reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..calibration.progress import progress_bar
from ..data import _encode, _logits, _model_device
from ..errors import ConfigError, DataError

_POSITION_ATTRS = ("max_position_embeddings", "n_positions")


@dataclass
class PerplexityResult:
    """ppl = exp(mean_nll); window_nll holds the loss of every evaluated window, in order."""

    ppl: float
    mean_nll: float
    window_nll: list[float]
    n_windows: int
    total_windows: int
    seqlen: int
    tokens: int
    source: str
    window_indices: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"ppl {self.ppl:.4f} (mean NLL {self.mean_nll:.5f}) on {self.n_windows}/{self.total_windows} "
                f"windows of {self.seqlen} tokens, {self.source}")


def window_indices(total_windows: int, max_windows: int | None) -> list[int]:
    """Evenly spaced window indices: every ``total // max_windows``-th, the first ``max_windows``."""
    if max_windows is None or max_windows >= total_windows:
        return list(range(total_windows))
    if max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1 (or None for all windows), got {max_windows}.")
    stride = total_windows // max_windows
    return [index * stride for index in range(max_windows)]


def max_positions(model: torch.nn.Module) -> int | None:
    """Positions the model was built for (its config's ``max_position_embeddings`` or ``n_positions``),
    or None when its config names none."""
    config = getattr(model, "config", None)
    for attr in _POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seqlen(model: torch.nn.Module, seqlen: int, *, name: str = "seqlen") -> None:
    """Refuse a window longer than the model's positions (ConfigError naming the limit)."""
    limit = max_positions(model)
    if limit is not None and int(seqlen) > limit:
        attr = next(a for a in _POSITION_ATTRS if getattr(model.config, a, None) == limit)
        raise ConfigError(
            f"{name}={seqlen} exceeds the {limit} positions this model was built for (config.{attr}={limit}): "
            f"pass {name} <= {limit}."
        )


def window_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row: logits [B, T, V], input_ids [B, T] -> [B]."""
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:].to(shifted.device)
    losses = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape).mean(dim=1)


@torch.no_grad()
def perplexity_from_ids(model: torch.nn.Module, input_ids: torch.Tensor | list[int], *, seqlen: int = 512,
                        max_windows: int | None = None, batch_size: int = 1,
                        device: torch.device | str | None = None, progress: bool = True,
                        source: str = "<token ids>") -> PerplexityResult:
    """Perplexity of ``model`` on one token stream (1-D, or [1, T]); see the module docstring."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise DataError(f"perplexity needs one token stream (1-D or [1, T]), got shape {tuple(ids.shape)}.")
    if seqlen < 2:
        raise ConfigError(f"seqlen must be >= 2 (one window predicts seqlen - 1 tokens), got {seqlen}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    check_seqlen(model, seqlen)
    total_windows = ids.numel() // seqlen
    if total_windows == 0:
        raise DataError(
            f"{source} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}: "
            "use a longer text or a smaller seqlen."
        )
    chosen = window_indices(total_windows, max_windows)
    windows = ids[: total_windows * seqlen].view(total_windows, seqlen)[chosen]
    device = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        with progress_bar(len(chosen), f"perplexity (seqlen {seqlen})", progress, unit="window") as bar:
            for start in range(0, len(chosen), batch_size):
                batch = windows[start : start + batch_size].to(device)
                losses.extend(window_losses(_logits(model(input_ids=batch)), batch).double().cpu().tolist())
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    mean_nll = math.fsum(losses) / len(losses)
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll, window_nll=losses, n_windows=len(chosen),
                            total_windows=total_windows, seqlen=seqlen, tokens=int(ids.numel()), source=source,
                            window_indices=chosen)


def _load_eval_text(text_or_path: str | Path) -> tuple[str, str]:
    """(text, label): files and dataset names are read; a path-like string that does not exist is an
    error (never scored as text); anything else is the text itself (sparsewise.data.resolve_text)."""
    from ..data import resolve_text

    return resolve_text(text_or_path)


def perplexity(model: torch.nn.Module, tokenizer: Any, text_or_path: str | Path, *, seqlen: int = 512,
               max_windows: int | None = None, batch_size: int = 1, device: torch.device | str | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM on a text, a file (see :func:`sparsewise.data.read_text`) or "wikitext2".

    Tokenized once with ``add_special_tokens=False``; losses in float32; no gradients.
    """
    text, label = _load_eval_text(text_or_path)
    ids = _encode(tokenizer, text)
    return perplexity_from_ids(model, ids, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                               device=device, progress=progress, source=label)
