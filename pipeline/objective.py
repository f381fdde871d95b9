"""What a training step minimises: the distillation term against one or more teachers,
plus cross-entropy on the labels weighted by alpha, plus any feature terms (`features`),
each times its weight.

The loss is Hinton's KD by default, (1 - alpha) * distill + alpha * CE, with alpha = 0
(function matching, as in Beyer et al. 2022). Several teachers over the same classes are
combined into one target, the mean of their probabilities at temperature T; teachers
over different subsets of the student's classes each teach their own columns and their
losses are averaged; a progressive schedule (MTPD) lets one teacher at a time teach.
The individual losses are the pure functions of `losses`; this module only composes them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .losses import STATEFUL_LOSSES, get_loss, loss_options

# (student logits, teacher logits, labels or None) -> scalar loss, hyper-parameters bound
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# the partner labels and lam of mixed views
Mixing = tuple[torch.Tensor, torch.Tensor]


def make_loss(name: str, options: dict, temperature: float) -> Loss:
    """Loss `name` with its options (and the temperature, where it takes one) bound. A
    stateful loss (SEED's queue) is one object, to be built once per run."""
    loss = get_loss(name)
    options = dict(options)
    if "temperature" in loss_options(name):
        options["temperature"] = temperature
    return loss(**options) if name in STATEFUL_LOSSES else functools.partial(loss, **options)


def ensemble_logits(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the mean of the given logits' softmaxes."""
    if len(logits) == 1:
        return logits[0]
    log_probs = torch.stack([F.log_softmax(l.float() / temperature, dim=-1) for l in logits])
    return temperature * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))


def scheduled_teacher(schedule: tuple[tuple[str, int], ...], epoch: int) -> str:
    """The teacher of training epoch `epoch` (0-based) in a progressive schedule."""
    for name, epochs in schedule:
        if epoch < epochs:
            return name
        epoch -= epochs
    return schedule[-1][0]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mixing: Mixing | None = None,
                  smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the labels, each target smoothed by `smoothing` (that much of its
    mass spread evenly over all classes); for mixed views, lam-weighted over both
    samples' labels."""
    if mixing is None:
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    partner_labels, lam = mixing
    own = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    other = F.cross_entropy(logits.float(), partner_labels, reduction="none", label_smoothing=smoothing)
    return (lam * own + (1 - lam) * other).mean()


@dataclass
class Objective:
    """The loss of every step of one run, decided before the first.

    `distill` is the distillation loss (None for supervised training); `columns` maps a
    teacher that knows only some of the student's classes to their columns; `schedule`,
    when set, names the one teacher active in each epoch; `label_smoothing` smooths the
    cross-entropy term's targets; `feature_weights` weights each feature term by name
    (`features`), added to the loss as it is."""

    distill: Loss | None
    name: str = "kd"
    alpha: float = 0.0
    temperature: float = 1.0
    schedule: tuple[tuple[str, int], ...] | None = None
    columns: dict[str, list[int] | None] = field(default_factory=dict)
    label_smoothing: float = 0.0
    feature_weights: dict[str, float] = field(default_factory=dict)

    def terms(self, student_logits: torch.Tensor, teacher_logits: dict[str, torch.Tensor] | None,
              labels: torch.Tensor, mixing: Mixing | None = None, epoch: int = 0,
              features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The named terms of one step; `loss` is the one to minimise. `features` holds the
        value of each feature term by name: the loss adds each times its weight."""
        if self.distill is None or teacher_logits is None:
            ce = cross_entropy(student_logits, labels, mixing, self.label_smoothing)
            return {"loss": ce, "ce": ce}
        distill = self.distillation(student_logits, teacher_logits, labels, epoch)
        terms = {self.name: distill, "loss": (1 - self.alpha) * distill}
        if self.alpha > 0:
            terms["ce"] = cross_entropy(student_logits, labels, mixing, self.label_smoothing)
            terms["loss"] = terms["loss"] + self.alpha * terms["ce"]
        for name, value in (features or {}).items():
            terms[name] = value
            terms["loss"] = terms["loss"] + self.feature_weights[name] * value
        return terms

    def distillation(self, student_logits: torch.Tensor, teacher_logits: dict[str, torch.Tensor],
                     labels: torch.Tensor | None, epoch: int = 0) -> torch.Tensor:
        """The distillation loss against the teachers active in `epoch`."""
        active = [scheduled_teacher(self.schedule, epoch)] if self.schedule else list(teacher_logits)
        if all(self.columns.get(name) is None for name in active):
            target = ensemble_logits([teacher_logits[name] for name in active], self.temperature)
            return self.distill(student_logits, target, labels)
        return torch.stack([
            self.distill(student_logits[:, self.columns[name]] if self.columns.get(name) else student_logits,
                         teacher_logits[name], None)
            for name in active
        ]).mean()

    def state_dict(self) -> dict | None:
        """The state of a stateful loss (SEED's queue), to checkpoint with the run."""
        return self.distill.state_dict() if hasattr(self.distill, "state_dict") else None

    def load_state_dict(self, state: dict) -> None:
        self.distill.load_state_dict(state)
