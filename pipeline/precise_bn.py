"""Precise BatchNorm: a student's BatchNorm running statistics recomputed from its
current weights before it is scored or saved.

In training mode BatchNorm normalises with each batch's own statistics and only keeps
an exponential moving average of them for evaluation. With a small momentum
(MobileNetV3's is 0.01) and a short run, that average is still close to its start
(mean 0, variance 1) when the student is scored, so an evaluation in eval mode gives
one class for every image although the student has learned. As in pycls and timm
("precise BN"), the averages are reset and refilled from a fixed sample of training
views with the weights as they are now; training itself never reads them, so the
weights a run ends with are unchanged.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from .config import ViewRecipe
from .data import RangeBatches, Source, ViewDataset
from .host import quiet_worker


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recompute_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Reset every BatchNorm layer's running statistics and set them to the average of
    the batch statistics over `batches`, each batch weighted by its size, so a layer's
    running mean is the mean of all its inputs (its running variance the size-weighted
    mean of the batches' variances). Runs the model in training mode without gradients,
    then restores each layer's momentum and the model's mode."""
    norms = batch_norms(model)
    momenta, was_training = [bn.momentum for bn in norms], model.training
    for bn in norms:
        bn.reset_running_stats()
    model.train()
    seen = 0
    try:
        with torch.no_grad():
            for images in batches:
                # running <- (1 - m) * running + m * batch with m = n / (seen + n): the
                # cumulative average of all inputs so far (momentum=None would weight
                # every batch alike, a short last one too)
                seen += len(images)
                for bn in norms:
                    bn.momentum = len(images) / seen
                model(images)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)


def sample_views(source: Source, recipe: ViewRecipe, size: int, epoch: int, count: int, batch_size: int,
                 workers: int = 0) -> Iterator[torch.Tensor]:
    """The first `count` views (fewer if the epoch has fewer) of recipe epoch `epoch`, at
    `size` px, in batches of `batch_size` samples' views: the epoch's own training views
    in its seeded order, so the sample is a pure function of the recipe and the epoch."""
    samples = min(len(source), math.ceil(count / recipe.views_per_sample))
    views = ViewDataset(source, recipe, {"views": size})
    loader = DataLoader(views, batch_sampler=RangeBatches([(epoch, 0, samples)], len(source), batch_size),
                        num_workers=workers, worker_init_fn=quiet_worker)
    left = count
    for batch in loader:
        images = batch["views"].flatten(0, 1)[:left]
        left -= len(images)
        yield images
