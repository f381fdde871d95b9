"""Seeded views: `sample_view` draws a view's parameters, `render` applies them.

A view is a pure function of (recipe, epoch, sample index, view index, image size).
The generator is counter-based, seeded from those integers themselves, so the result
does not depend on batch size, worker count, rank count or iteration order. Both the
teacher stage and the student stage turn parameters into pixels through `render`.
Evaluation has no random parameters: `eval_view` is the standard deterministic view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .config import ViewRecipe

EVAL_RESIZES = ("crop", "squash")  # how `eval_view` fits a whole image to the model's input

# Tags that keep the generator streams of different draws apart.
_STREAM_VIEW = 1
_STREAM_ORDER = 2
_STREAM_PARTNERS = 3
_STREAM_MIX = 4


@dataclass(frozen=True)
class ViewParams:
    """The realised parameters of one view: a crop box in source pixels, a flip and
    colour factors (1.0 = unchanged). With mixing, also the partner sample whose view
    (of the same epoch and view index) is mixed in, the weight `lam` of this sample's
    pixels, and for CutMix the pasted box as fractions of the view's side (so it holds
    at any render size)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    partner: int = -1
    lam: float = 1.0
    box_top: float = 0.0
    box_left: float = 0.0
    box_height: float = 0.0
    box_width: float = 0.0

    def as_array(self, names: tuple[str, ...]) -> np.ndarray:
        """The parameters named, as float32 in that order (see `view_param_fields`)."""
        return np.array([getattr(self, name) for name in names], dtype=np.float32)


VIEW_PARAM_FIELDS = tuple(f.name for f in fields(ViewParams))[:8]  # what every archive records
MIX_PARAM_FIELDS = tuple(f.name for f in fields(ViewParams))[8:]  # added when the recipe mixes


def view_param_fields(recipe: ViewRecipe) -> tuple[str, ...]:
    """The view parameters an archive of `recipe` records, in column order."""
    return VIEW_PARAM_FIELDS + (MIX_PARAM_FIELDS if recipe.mixup else ())


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


def partners(recipe: ViewRecipe, epoch: int, num_samples: int) -> np.ndarray:
    """The mixing partner of each sample index in `epoch`: a seeded permutation of the
    whole data set, so the pairing does not depend on batch size or rank count."""
    rng = np.random.default_rng([recipe.seed, epoch, _STREAM_PARTNERS])
    return rng.permutation(num_samples).astype(np.int64)


def mix_view(recipe: ViewRecipe, epoch: int, index: int, view: int, params: ViewParams, partner: int) -> ViewParams:
    """`params` with the mix of view `view` drawn: lam ~ U(0, 1) (alpha 0, as in function
    matching) or Beta(alpha, alpha); for CutMix a box of area 1 - lam at a uniform centre,
    clipped to the view, and lam then set to the share of pixels left unpasted."""
    rng = np.random.default_rng([recipe.seed, epoch, index, view, _STREAM_MIX])
    alpha = recipe.mixup["alpha"]
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else float(rng.uniform())
    if recipe.mixup["mode"] == "mixup":
        return replace(params, partner=partner, lam=lam)
    side = math.sqrt(1 - lam)
    centre_y, centre_x = rng.uniform(size=2)
    top, bottom = max(centre_y - side / 2, 0.0), min(centre_y + side / 2, 1.0)
    left, right = max(centre_x - side / 2, 0.0), min(centre_x + side / 2, 1.0)
    box = np.float32([top, left, bottom - top, right - left])  # as stored: render from what is recorded
    return replace(params, partner=partner, lam=float(1 - box[2] * box[3]), box_top=float(box[0]),
                   box_left=float(box[1]), box_height=float(box[2]), box_width=float(box[3]))


def mix(pixels: torch.Tensor, partner_pixels: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """This view's pixels with its partner's mixed in: blended by lam (mixup), or the
    partner's pixels pasted into the box (CutMix), at the render size of `pixels`."""
    if params.box_height == 0 or params.box_width == 0:
        lam = np.float32(params.lam)  # the stored value, so every stage blends alike
        return pixels * float(lam) + partner_pixels * float(1 - lam)
    size = pixels.shape[-1]
    top, left = round(params.box_top * size), round(params.box_left * size)
    bottom = round((params.box_top + params.box_height) * size)
    right = round((params.box_left + params.box_width) * size)
    out = pixels.clone()
    out[:, top:bottom, left:right] = partner_pixels[:, top:bottom, left:right]
    return out


def full_view(image_size: tuple[int, int]) -> ViewParams:
    """The whole image, unflipped and unchanged: the view used for validation."""
    return ViewParams(0, 0, image_size[0], image_size[1], False)


def render(image: torch.Tensor, params: ViewParams, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Turn a decoded uint8 image (C, H, W) and view parameters into float32 pixels in
    [0, 1] of shape (C, size, size), the crop resized with `interpolation` (a recipe's,
    antialiased). The one renderer of both stages."""
    out = F.resized_crop(
        image, params.top, params.left, params.height, params.width, [size, size],
        interpolation=InterpolationMode(interpolation), antialias=True,
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


def eval_view(image: torch.Tensor, size: int, crop_pct: float = 1.0, interpolation: str = "bilinear",
              resize: str = "crop") -> torch.Tensor:
    """The evaluation view of a decoded uint8 image (C, H, W), as float32 in [0, 1] of
    shape (C, size, size); normalisation stays in the model.

    "crop" is the standard protocol of timm's `create_transform(..., is_training=False)`
    and torchvision's `weights.transforms()`: resize the shorter side to
    floor(size / crop_pct) (timm's rounding) with `interpolation`, antialiased, then take
    the centre size x size. Resizing the uint8 image (rounded back to uint8, as PIL does)
    keeps the pixels within one grey level of the references' PIL path. "squash" resizes
    the whole image to size x size, ignoring `crop_pct` (kdpipe's earlier validation view).
    """
    if resize == "squash":
        return render(image, full_view((image.shape[1], image.shape[2])), size, interpolation)
    if resize != "crop":
        raise ValueError(f"resize must be one of {EVAL_RESIZES}, got {resize!r}")
    # the epsilon keeps 224 / (224 / 256) at 256, where the float quotient falls just short
    shorter_side = math.floor(size / crop_pct + 1e-6)
    out = F.resize(image, [shorter_side], interpolation=InterpolationMode(interpolation), antialias=True)
    out = F.center_crop(out, [size, size])
    return F.to_dtype(out, torch.float32, scale=True)
