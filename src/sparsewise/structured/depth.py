"""Depth pruning: score whole transformer blocks and remove the least important ones.

Importance (lower = removed first):

* Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect"): ``BI_i = 1 - mean_t cos(x_in[t], x_out[t])`` over the calibration
  tokens t, x_in / x_out the hidden states entering / leaving block i. A block whose output is
  (nearly) its input changes little and scores (nearly) 0. Collected in one walk over the blocks
  (:class:`~sparsewise.calibration.engine.BlockWalk`).
* Removal loss: ``KL(p_dense || p_skip_i)`` of the next-token distributions, averaged over the
  calibration tokens, when block i alone is skipped (its output replaced by its input); the
  increase of the calibration cross-entropy is reported next to it. One forward per block.

Removal (:func:`remove_blocks`) is generic: the blocks come from the
:class:`~sparsewise.models.ModelAdapter`, the entries are deleted from their parent
``nn.ModuleList``, the config's layer count (any int attribute naming layers that equals the old
count: ``num_hidden_layers``, ``n_layer``, ...) and per-layer lists (``layer_types``) follow, and
the ``layer_idx`` the attention modules keep for the KV cache are renumbered, so ``generate``
with a cache, ``save_pretrained`` / ``from_pretrained`` and ``sw.save`` / ``sw.load`` work on
the smaller model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

# per-layer index attributes HF modules keep (the KV cache slot of an attention module)
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id")


# ------------------------------------------------------------------------------------------------
# pure math over tensors
# ------------------------------------------------------------------------------------------------

def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ShortGPT's Block Influence ``1 - mean_t cos(x_in[t], x_out[t])`` (Men et al. 2024).

    ``x_in``, ``x_out``: [..., hidden] hidden states entering / leaving one block; ``mask``
    (bool, ``x_in.shape[:-1]``) selects the tokens that count (None: all). Returns a 0-dim
    float64 tensor."""
    if x_in.shape != x_out.shape:
        raise ConfigError(f"block_influence needs x_in and x_out of one shape, got {tuple(x_in.shape)} and "
                          f"{tuple(x_out.shape)}.")
    cos = _token_cosines(x_in, x_out, mask)
    if cos.numel() == 0:
        raise ConfigError("block_influence got no token to average over (empty input or all-False mask).")
    return 1 - cos.mean()


def cosine_sum(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(sum_t cos(x_in[t], x_out[t]), token count)``: Block Influence accumulated over batches."""
    cos = _token_cosines(x_in, x_out, mask)
    return float(cos.sum()), cos.numel()


def _token_cosines(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """cos(x_in[t], x_out[t]) in float64 for the tokens ``mask`` selects (all when None)."""
    cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
    return cos if mask is None else cos[mask.to(torch.bool)]


def next_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(sum_t KL(softmax(ref[t]) || softmax(logits[t])), token count)`` over the [..., vocab] logits."""
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    new = torch.log_softmax(logits.double(), dim=-1)
    kl = (ref.exp() * (ref - new)).sum(-1)
    if mask is not None:
        kl = kl[mask.to(torch.bool)]
    return float(kl.sum()), kl.numel()


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(sum of -log p(ids[t+1] | ..t), count)``: the calibration cross-entropy of [batch, seq, vocab] logits."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)
    if mask is not None:
        nll = nll[mask[:, 1:].to(torch.bool)]
    return float(nll.sum()), nll.numel()


def depth_count(blocks: int, ratio: float) -> int:
    """Blocks to remove for ``ratio`` of ``blocks``: ``round(ratio * blocks)``; refused when that is
    0 for a ratio > 0, or every block."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"depth pruning ratio must be in [0, 1), got {ratio:g}.")
    count = round(ratio * blocks)
    if ratio > 0 and count == 0:
        raise ConfigError(f"depth ratio {ratio:g} of {blocks} blocks rounds to 0 whole blocks: use a ratio of at "
                          f"least {0.5 / blocks:.3g} (one block is {1 / blocks:.3g}).")
    if count >= blocks:
        raise ConfigError(f"depth ratio {ratio:g} of {blocks} blocks removes all of them: use a ratio of at most "
                          f"{(blocks - 1) / blocks:.3g} ({blocks - 1} blocks).")
    return count


def blocks_to_remove(scores: Sequence[float] | torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest ``scores`` (ties: the lower index first), sorted ascending."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not 0 <= count < scores.numel():
        raise ConfigError(f"cannot remove {count} of {scores.numel()} blocks: remove between 0 and "
                          f"{scores.numel() - 1}.")
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:count].tolist())


# ------------------------------------------------------------------------------------------------
# scores on a model
# ------------------------------------------------------------------------------------------------

def _single_stack(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..models import ModelAdapter

    adapter = ModelAdapter(model)
    if len(adapter.stack_starts) > 1:
        raise ConfigError(f"{type(model).__name__} has {len(adapter.stack_starts)} stacks of blocks (an "
                          "encoder-decoder): depth pruning handles models of one stack (decoder-only LLMs).")
    return adapter.blocks


def _token_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@torch.no_grad()
def block_influence_scores(model: nn.Module, calibration: Any, *, device: torch.device | str = "cpu",
                           batch_size: int | None = None) -> list[float]:
    """Block Influence of every block on ``calibration`` (any form ``sw.data.as_calibration``
    takes), from one walk over the blocks; padded tokens (``attention_mask`` 0) do not count."""
    from ..calibration.engine import BlockWalk, run_block
    from ..calibration.run import calibration_batches

    blocks = _single_stack(model)
    batches = calibration_batches(calibration, batch_size)
    masks = [_token_mask(batch) for batch in batches]
    scores = []
    with BlockWalk(model, blocks, None, device, batches=batches, later_arguments=False) as walk:
        for step in walk:
            outputs = run_block(step.block, step.calls)
            total, count = 0.0, 0
            for call, out, mask in zip(step.calls, outputs, masks, strict=True):
                part, n = cosine_sum(call.hidden_states, out, None if mask is None else mask.to(out.device))
                total, count = total + part, count + n
            scores.append(1 - total / max(count, 1))
            step.outputs = outputs
    return scores


def _skip_hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook that makes a block the identity: its output hidden states are its input's."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    raise ConfigError(f"cannot skip a block whose output is a {type(output).__name__} (expected a tensor or tuple).")


@torch.no_grad()
def removal_loss_scores(model: nn.Module, calibration: Any, *, device: torch.device | str = "cpu",
                        batch_size: int | None = 4) -> dict[str, list[float]]:
    """Per block i, with block i alone skipped: ``kl`` = mean over calibration tokens of
    KL(p_dense || p_skip_i) of the next-token distributions, and ``ce_increase`` = calibration
    cross-entropy (nats/token) minus the dense one. Costs one forward of the model per block and batch."""
    from ..calibration.engine import model_inputs
    from ..calibration.run import calibration_batches

    blocks = _single_stack(model)
    batches = calibration_batches(calibration, batch_size)
    kl = [0.0] * len(blocks)
    nll = [0.0] * len(blocks)
    dense_nll, tokens, kl_tokens = 0.0, 0, 0
    forward_kwargs = {"use_cache": False}
    for batch in batches:
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        inputs = model_inputs(model, batch)
        mask = _token_mask(batch)
        ids = batch["input_ids"]
        ref = model(**inputs, **forward_kwargs).logits
        part, n = next_token_nll(ref, ids, mask)
        dense_nll, tokens = dense_nll + part, tokens + n
        for index, (_, block) in enumerate(blocks):
            handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
            try:
                logits = model(**inputs, **forward_kwargs).logits
            finally:
                handle.remove()
            part, count = next_token_kl(ref, logits, mask)
            kl[index] += part
            nll[index] += next_token_nll(logits, ids, mask)[0]
        kl_tokens += count
    return {"kl": [value / max(kl_tokens, 1) for value in kl],
            "ce_increase": [(value - dense_nll) / max(tokens, 1) for value in nll]}


# ------------------------------------------------------------------------------------------------
# removal
# ------------------------------------------------------------------------------------------------

def _layer_count_attributes(config: Any, old: int) -> list[str]:
    """The config's int attributes naming layers that equal the old block count."""
    found = []
    for key, value in vars(config).items():
        if isinstance(value, int) and not isinstance(value, bool) and value == old and "layer" in key.lower():
            found.append(key)
    return found


def _layer_list_attributes(config: Any, old: int) -> list[str]:
    return [key for key, value in vars(config).items()
            if isinstance(value, (list, tuple)) and len(value) == old and "layer" in key.lower()]


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> dict[str, Any]:
    """Delete the blocks ``indices`` (positions in the adapter's block order) from the model.

    Updates the config's layer count and per-layer lists, renumbers ``layer_idx`` of the kept
    blocks' modules and the records of pruned layers; returns what changed
    (``removed``: names, ``config``: changed attributes, ``params_removed``). Every check runs
    before the first change."""
    from ..records import get_records, set_records

    blocks = _single_stack(model)
    old = len(blocks)
    chosen = sorted({int(index) for index in indices})
    if len(chosen) != len(list(indices)):
        raise ConfigError(f"remove_blocks got repeated block indices {list(indices)}: name each block once.")
    bad = [index for index in chosen if not 0 <= index < old]
    if bad:
        raise ConfigError(f"block indices {bad} are out of range: the model has {old} blocks (0..{old - 1}).")
    if len(chosen) >= old:
        raise ConfigError(f"removing all {old} blocks leaves no model: remove at most {old - 1}.")
    parents = {name.rpartition(".")[0] for name, _ in blocks}
    last = [name.rpartition(".")[2] for name, _ in blocks]
    if len(parents) != 1 or last != [str(i) for i in range(old)]:
        raise ConfigError("depth pruning needs the blocks as the entries 0..n-1 of one nn.ModuleList; found "
                          f"{blocks[0][0]} .. {blocks[-1][0]}: pass blocks of one list.")
    parent_name = parents.pop()
    block_list = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(block_list, nn.ModuleList):
        raise ConfigError(f"{parent_name} is a {type(block_list).__name__}, not an nn.ModuleList: depth pruning "
                          "deletes entries of the blocks' ModuleList.")
    config = getattr(model, "config", None)
    counts = _layer_count_attributes(config, old) if config is not None else []
    if config is not None and chosen and not counts:
        raise ConfigError(f"{type(config).__name__} has no int attribute naming layers equal to the {old} blocks "
                          "(num_hidden_layers, n_layer, ...), so the config cannot describe the smaller model: set "
                          "the layer count attribute by hand after removal, or add it to the config.")
    lists = _layer_list_attributes(config, old) if config is not None else []
    if not chosen:
        return {"removed": [], "kept": list(range(old)), "config": [], "params_removed": 0}

    before = sum(param.numel() for param in model.parameters())
    keep = [index for index in range(old) if index not in chosen]
    new_index = {old_index: new for new, old_index in enumerate(keep)}
    for new, old_index in enumerate(keep):  # the KV cache slots follow the new positions
        for module in blocks[old_index][1].modules():
            for attribute in LAYER_INDEX_ATTRIBUTES:
                if getattr(module, attribute, None) == old_index and isinstance(getattr(module, attribute), int):
                    setattr(module, attribute, new)
    for index in reversed(chosen):
        del block_list[index]
    changed = []
    for key in counts:
        setattr(config, key, len(keep))
        changed.append(f"{key}={len(keep)}")
    for key in lists:
        value = getattr(config, key)
        setattr(config, key, type(value)(value[index] for index in keep))
        changed.append(f"{key} (per-layer list)")
    prefix = f"{parent_name}." if parent_name else ""
    records = {}
    for name, record in get_records(model).items():
        if name.startswith(prefix):
            head, _, rest = name[len(prefix):].partition(".")
            if head.isdigit():
                if int(head) in chosen:
                    continue
                name = f"{prefix}{new_index[int(head)]}" + (f".{rest}" if rest else "")
                record.name = name
        records[name] = record
    set_records(model, records)
    after = sum(param.numel() for param in model.parameters())
    return {"removed": [blocks[index][0] for index in chosen], "removed_indices": chosen, "kept": keep,
            "config": changed, "params_before": before, "params_removed": before - after}
