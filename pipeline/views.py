"""Seeded views: `sample_view` draws a view's parameters, `render` applies them.

A view is a pure function of (recipe, epoch, sample index, view index, image size).
The generator is counter-based, seeded from those integers themselves, so the result
does not depend on batch size, worker count, rank count or iteration order. Both the
teacher stage and the student stage turn parameters into pixels through `render`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from .config import ViewRecipe

# Tags that keep the generator streams of different draws apart.
_STREAM_VIEW = 1
_STREAM_ORDER = 2


@dataclass(frozen=True)
class ViewParams:
    """The realised parameters of one view: a crop box in source pixels, a flip and
    colour factors (1.0 = unchanged). Schema 1 has no mixup; when it comes, the partner,
    lambda and partner box are added as further fields."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    def as_array(self) -> np.ndarray:
        """The parameters as float32, in the column order of `VIEW_PARAM_FIELDS`."""
        return np.array([getattr(self, name) for name in VIEW_PARAM_FIELDS], dtype=np.float32)


VIEW_PARAM_FIELDS = tuple(f.name for f in fields(ViewParams))


def epoch_order(recipe: ViewRecipe, epoch: int, num_samples: int) -> np.ndarray:
    """The sample indices of `epoch` in training order: a seeded permutation."""
    rng = np.random.default_rng([recipe.seed, epoch, _STREAM_ORDER])
    return rng.permutation(num_samples).astype(np.int64)


def sample_view(
    recipe: ViewRecipe, epoch: int, index: int, view: int, image_size: tuple[int, int]
) -> ViewParams:
    """Draw the parameters of view `view` of sample `index` in `epoch`.

    The crop is inception-style random-resized-crop: up to 10 tries at an area fraction
    in `recipe.scale` and a log-uniform aspect ratio in `recipe.ratio`, then the largest
    centred crop whose ratio lies in range.
    """
    height, width = image_size
    rng = np.random.default_rng([recipe.seed, epoch, index, view, _STREAM_VIEW])
    area = height * width
    log_ratio = (math.log(recipe.ratio[0]), math.log(recipe.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(recipe.scale[0], recipe.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < recipe.ratio[0]:
            w, h = width, int(round(width / recipe.ratio[0]))
        elif in_ratio > recipe.ratio[1]:
            h, w = height, int(round(height * recipe.ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(rng.random() < recipe.flip_prob)
    jitter = recipe.color_jitter
    if jitter > 0:
        brightness, contrast, saturation = (float(f) for f in rng.uniform(1 - jitter, 1 + jitter, size=3))
    else:
        brightness = contrast = saturation = 1.0
    return ViewParams(top, left, h, w, flip, brightness, contrast, saturation)


def full_view(image_size: tuple[int, int]) -> ViewParams:
    """The whole image, unflipped and unchanged: the view used for validation."""
    return ViewParams(0, 0, image_size[0], image_size[1], False)


def render(image: torch.Tensor, params: ViewParams, size: int) -> torch.Tensor:
    """Turn a decoded uint8 image (C, H, W) and view parameters into float32 pixels in
    [0, 1] of shape (C, size, size). The one renderer of both stages."""
    out = F.resized_crop(
        image, params.top, params.left, params.height, params.width, [size, size], antialias=True
    )
    if params.flip:
        out = F.horizontal_flip(out)
    out = F.to_dtype(out, torch.float32, scale=True)
    if params.brightness != 1.0:
        out = F.adjust_brightness(out, params.brightness)
    if params.contrast != 1.0:
        out = F.adjust_contrast(out, params.contrast)
    if params.saturation != 1.0:
        out = F.adjust_saturation(out, params.saturation)
    return out
