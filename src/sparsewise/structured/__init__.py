"""Structured pruning: physically smaller dense models (see ../shared/docs/methods.md, structured-pruning).

Pure math lives in functions over tensors (:mod:`.importance`, :mod:`.budget`, :mod:`.prox`,
:mod:`.losses`); model surgery is separate (:mod:`.graph` traces which tensors are coupled,
:mod:`.surgery` rebuilds modules). CNN methods so far:

* network slimming / YOLOv8-prune-CWD: :class:`BNScaleL1` while training, :func:`prune_channels`
  (``importance="bn_scale"``), fine-tuning with :class:`ChannelWiseDistillLoss`;
* PreCropping: :class:`ChannelBudgetSolver` turns pruning-at-init layer densities into widths,
  :func:`precrop` rebuilds the net at those widths for training from scratch;
* WGSEF: :class:`ProxRegularizer` with the weighted group sparse envelope prox over :class:`GroupSpec`.
"""

from __future__ import annotations

from .channels import (
                       ChannelPruneResult,
                       available_channel_importances,
                       count_params,
                       prune_channels,
                       register_channel_importance,
                       select_channels,
)
from .graph import ChannelGraph, ChannelGroup, trace_channels
from .surgery import fold_removed_into_bias, remove_channels, zero_channels

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelPruneResult", "available_channel_importances", "count_params",
           "fold_removed_into_bias", "prune_channels", "register_channel_importance", "remove_channels",
           "select_channels", "trace_channels", "zero_channels"]
