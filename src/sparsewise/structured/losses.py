"""Channel-wise knowledge distillation (CWD) loss.

Shu et al. 2021, "Channel-wise Knowledge Distillation for Dense Prediction", used as stage 3 of the
YOLOv8 compression recipe (methods.md, ``yolov8-prune-cwd``): each channel's activation map becomes
a distribution over spatial positions, p_c = softmax(x_c / tau), and

    L_cwd = tau^2 * mean_{n, c} KL(p_teacher,c || p_student,c)

It is 0 for identical features and unchanged when a constant is added to a channel (softmax is
shift-invariant). A pruned student has fewer channels than its teacher: a learned 1x1 conv
(``align``) maps the student's channels to the teacher's first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["ChannelWiseDistillLoss", "channel_wise_kl"]


def channel_wise_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """tau^2 * mean over (sample, channel) of KL(softmax(teacher_c / tau) || softmax(student_c / tau)),
    the softmax taken over the spatial positions of each [N, C, H, W] channel."""
    if student.shape != teacher.shape or student.dim() < 3:
        raise ConfigError(f"CWD compares [N, C, H, W] maps of equal shape, got student {tuple(student.shape)} "
                          f"and teacher {tuple(teacher.shape)}; give ChannelWiseDistillLoss the channel counts "
                          "so it learns a 1x1 alignment.")
    if tau <= 0:
        raise ConfigError(f"CWD temperature tau must be > 0, got {tau}.")
    log_student = F.log_softmax(student.flatten(2).float() / tau, dim=-1)
    log_teacher = F.log_softmax(teacher.detach().flatten(2).float() / tau, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return tau * tau * kl.mean()


class ChannelWiseDistillLoss(nn.Module):
    """CWD between a student and a teacher feature map, with a learned 1x1 conv alignment when the
    student (pruned) has fewer channels; add its parameters to the optimizer."""

    def __init__(self, tau: float = 1.0, student_channels: int | None = None, teacher_channels: int | None = None):
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"CWD temperature tau must be > 0, got {tau}.")
        self.tau = tau
        self.align = None
        if student_channels is not None and teacher_channels is not None and student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.align is not None:
            student = self.align(student)
        return channel_wise_kl(student, teacher, self.tau)
