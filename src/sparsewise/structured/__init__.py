"""Structured pruning: physically smaller dense models (see ../shared/docs/methods.md, structured-pruning).

Pure math lives in functions over tensors (:mod:`.importance`, :mod:`.budget`, :mod:`.prox`,
:mod:`.losses`); model surgery is separate (:mod:`.graph` traces which tensors are coupled,
:mod:`.surgery` rebuilds modules). CNN methods so far:

* network slimming / YOLOv8-prune-CWD: :class:`BNScaleL1` while training, :func:`prune_channels`
  (``importance="bn_scale"``), fine-tuning with :class:`ChannelWiseDistillLoss`;
* PreCropping: :class:`ChannelBudgetSolver` turns pruning-at-init layer densities into widths,
  :func:`precrop` rebuilds the net at those widths for training from scratch;
* WGSEF: :class:`ProxRegularizer` with the weighted group sparse envelope prox over :class:`GroupSpec`,
  then :func:`nonzero_channels` + :func:`remove_channels`.

Depth pruning of LLMs (:mod:`.depth`): :func:`block_influence` (ShortGPT) and :func:`removal_loss_scores`
rank whole blocks, :func:`remove_blocks` deletes them (method ``"depth"``).

The regularizers follow the sparse-training loop protocol (``loss_term()`` before backward,
``step()`` after ``optimizer.step()``), so they run next to ``sw.training.attach`` in one loop.
"""

from __future__ import annotations

from .budget import BudgetLayer, ChannelBudgetSolver, solve_width_ratios
from .channels import (
    ChannelPruneResult,
    available_channel_importances,
    count_params,
    prune_channels,
    register_channel_importance,
    select_channels,
)
from .depth import (
    block_influence,
    block_influence_scores,
    blocks_to_remove,
    depth_count,
    removal_loss_scores,
    remove_blocks,
)
from .graph import ChannelGraph, ChannelGroup, trace_channels
from .losses import ChannelWiseDistillLoss, channel_wise_kl
from .precropping import PrecropResult, layer_densities, precrop, snip_layer_scores
from .prox import GroupSpec, ProxRegularizer, channel_group_specs, wgsef_penalty, wgsef_scales
from .slimming import BNScaleL1
from .surgery import fold_removed_into_bias, nonzero_channels, remove_channels, zero_channels

__all__ = ["BNScaleL1", "BudgetLayer", "ChannelBudgetSolver", "ChannelGraph", "ChannelGroup", "ChannelPruneResult",
           "ChannelWiseDistillLoss", "GroupSpec", "PrecropResult", "ProxRegularizer", "available_channel_importances",
           "block_influence", "block_influence_scores", "blocks_to_remove", "depth_count", "removal_loss_scores",
           "remove_blocks",
           "channel_group_specs", "channel_wise_kl", "count_params", "fold_removed_into_bias", "layer_densities",
           "nonzero_channels", "precrop", "prune_channels", "register_channel_importance", "remove_channels",
           "select_channels", "snip_layer_scores", "solve_width_ratios", "trace_channels", "wgsef_penalty",
           "wgsef_scales", "zero_channels"]
