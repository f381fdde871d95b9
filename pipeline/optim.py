"""How a student's weights are updated: the optimizer, the learning-rate schedule
(linear warmup, then cosine decay to 0, per optimizer step) and an exponential moving
average (EMA) of the weights.

The EMA follows timm's ModelEmaV3 and big_vision: after every optimizer step each
parameter and floating-point buffer of the copy moves towards the student's,
ema <- d * ema + (1 - d) * weight, with the decay warmed up as d = min(decay,
(1 + t) / (10 + t)) over the t-th update, so that a short run's average is not stuck
near the initial weights. Integer buffers (BatchNorm's batch counter) are copied.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import TrainSpec


def make_optimizer(spec: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (Beyer et al. 2022), or SGD with momentum, as `spec` says."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def updates_per_epoch(spec: TrainSpec, num_samples: int) -> int:
    """Optimizer steps per epoch: one per `spec.accumulate` batches, and one for the
    epoch's last batches however few (an epoch never carries gradients into the next)."""
    return math.ceil(math.ceil(num_samples / spec.batch_size) / spec.accumulate)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak:
    (step + 1) / warmup_steps while warming up, then a cosine from 1 down to 0 over the
    steps left."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(spec: TrainSpec, optimizer: torch.optim.Optimizer,
                   num_samples: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of the whole run: `spec.warmup_epochs` epochs of linear
    warmup (rounded to whole optimizer steps), then cosine decay."""
    per_epoch = updates_per_epoch(spec, num_samples)
    total, warmup = spec.epochs * per_epoch, round(spec.warmup_epochs * per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


class WeightAverage:
    """An EMA copy of a model (see the module's docstring); `model` is the copy, kept in
    eval mode and out of autograd."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(current.detach().to(average.dtype), 1 - decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
