"""A model's outputs on the evaluation views of labelled images (`outputs`, `features`,
`whole_images`; `evaluation` turns class scores into accuracy figures), and the score of
a student distilled from embeddings (SEED), which has no classifier: a linear probe.

The probe scores the student the way self-supervised representations are scored: a
linear classifier is fitted on its frozen outputs for labelled training images and
scored on the validation images.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import Source, ValDataset
from .host import quiet_worker

PROBE_STEPS = 200  # L-BFGS iterations: full-batch, so a few hundred suffice
WEIGHT_DECAY = 1e-4


def outputs(model: nn.Module, loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The model's float outputs (on the CPU) and the labels, batch by batch, in eval and
    inference mode: what both evaluations (accuracy and the linear probe) run over."""
    model.eval()
    with torch.inference_mode():
        for images, labels in loader:
            yield model(images.to(device)).float().cpu(), labels


def features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on every image of `loader`, and the labels."""
    batches = list(outputs(model, loader, device))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def whole_images(source: Source, size: int, workers: int = 0, interpolation: str = "bilinear", crop_pct: float = 1.0,
                 resize: str = "squash", batch_size: int = 256) -> DataLoader:
    """The evaluation views of `source` at `size` px (see `data.ValDataset`), in order."""
    return DataLoader(ValDataset(source, size, interpolation, crop_pct, resize), batch_size=batch_size,
                      num_workers=workers, persistent_workers=workers > 0, worker_init_fn=quiet_worker)


def linear_probe(model: nn.Module, train: DataLoader, val: DataLoader, device: torch.device) -> float:
    """Top-1 % on `val` of a linear classifier fitted (L-BFGS, a little weight decay) on
    the frozen model's standardised outputs for `train`."""
    train_x, train_y = features(model, train, device)
    val_x, val_y = features(model, val, device)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + WEIGHT_DECAY * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return 100.0 * float((head(val_x).argmax(1) == val_y).float().mean())
