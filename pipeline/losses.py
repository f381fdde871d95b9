"""Distillation losses: small pure functions of logits, found through a plain dict.

Each takes (student_logits, teacher_logits, labels, **hparams) and returns a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hinton's KD term: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes and
    averaged over the batch. The T^2 keeps gradient sizes comparable across temperatures."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


LOSSES = {"kd": kd_loss}


def get_loss(name: str):
    """The loss function called `name`; an unknown name lists the valid ones."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
