"""Linear-probe evaluation: how good a frozen network's outputs are as features.

A student distilled from embeddings (SEED) has no classifier; it is scored the way
self-supervised representations are: a linear classifier is fitted on its outputs for
labelled training images and scored on the validation images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import Source, ValDataset

PROBE_STEPS = 200  # L-BFGS iterations: full-batch, so a few hundred suffice
WEIGHT_DECAY = 1e-4


def features(model: nn.Module, source: Source, size: int, device: torch.device, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on each whole image (the validation view), and the labels."""
    model.eval()
    outputs, labels = [], []
    with torch.inference_mode():
        for images, batch_labels in DataLoader(ValDataset(source, size), batch_size=256, num_workers=workers):
            outputs.append(model(images.to(device)).float().cpu())
            labels.append(batch_labels)
    return torch.cat(outputs), torch.cat(labels)


def linear_probe(model: nn.Module, train: Source, val: Source, size: int, device: torch.device, workers: int = 0) -> float:
    """Top-1 % on `val` of a linear classifier fitted (L-BFGS, a little weight decay) on
    the frozen model's standardised outputs for `train`."""
    train_x, train_y = features(model, train, size, device, workers)
    val_x, val_y = features(model, val, size, device, workers)
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
