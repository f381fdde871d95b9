"""Seeded views: `sample_view` draws a view's parameters, `render` applies them.

A view is a pure function of (recipe, epoch, sample index, view index, image size).
The generator is counter-based, seeded from those integers themselves, so the result
does not depend on batch size, worker count, rank count or iteration order. Both the
teacher stage and the student stage turn parameters into pixels through `render`.
RandAugment's ops and random erasing are view parameters like the crop: drawn here from
the view's key and recorded in the archive, so the student replays the teacher's pixels.
A detection recipe draws a square window instead of a crop (zoomed, padded, never
stretched); `view_boxes` moves an image's boxes into the view from the same parameters.
Evaluation has no random parameters: `eval_view` is the standard deterministic view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .config import MAX_RANDAUGMENT_MAGNITUDE, RANDAUGMENT_OPS, ViewRecipe

EVAL_RESIZES = ("crop", "squash")  # how `eval_view` fits a whole image to the model's input

# Tags that keep the generator streams of different draws apart.
_STREAM_VIEW = 1
_STREAM_ORDER = 2
_STREAM_PARTNERS = 3
_STREAM_MIX = 4
_STREAM_RANDAUGMENT = 5
_STREAM_ERASE = 6

ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing: the box's share of the view's area,
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))  # and the log of its height / width
ERASE_SEEDS = 2**24  # fill seeds below this are exact in a float32 column
MIN_BOX_SIDE = 1.0  # pixels: a box narrower or lower than this in a view is dropped from it


@dataclass(frozen=True)
class ViewParams:
    """The realised parameters of one view: a crop box in source pixels, a flip and
    colour factors (1.0 = unchanged). With mixing, also the partner sample whose view
    (of the same epoch and view index) is mixed in, the weight `lam` of this sample's
    pixels, and for CutMix the pasted box as fractions of the view's side (so it holds
    at any render size). RandAugment's ops are (op, magnitude) pairs, the op numbered by
    its place in RANDAUGMENT_OPS; an erased box is in fractions of the view's side, its
    noise drawn from `erase_seed` (erase_height 0: nothing erased)."""

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
    erase_top: float = 0.0
    erase_left: float = 0.0
    erase_height: float = 0.0
    erase_width: float = 0.0
    erase_seed: int = 0
    randaugment: tuple[tuple[float, float], ...] = ()

    def columns(self) -> dict[str, float]:
        """Every parameter by its column name, RandAugment's slot by slot."""
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "randaugment"}
        for slot, (op, magnitude) in enumerate(self.randaugment):
            named |= {f"randaugment_op_{slot}": op, f"randaugment_magnitude_{slot}": magnitude}
        return named

    def as_array(self, names: tuple[str, ...]) -> np.ndarray:
        """The parameters named, as float32 in that order (see `view_param_fields`)."""
        columns = self.columns()
        return np.array([columns[name] for name in names], dtype=np.float32)


_COLUMNS = tuple(f.name for f in fields(ViewParams))
VIEW_PARAM_FIELDS = _COLUMNS[:8]  # what every archive records
MIX_PARAM_FIELDS = _COLUMNS[8:14]  # added when the recipe mixes
ERASE_PARAM_FIELDS = _COLUMNS[14:19]  # added, last, when the recipe erases


def randaugment_fields(num_ops: int) -> tuple[str, ...]:
    """The columns of RandAugment's `num_ops` slots: each slot's op, then its magnitude."""
    return tuple(name for slot in range(num_ops) for name in (f"randaugment_op_{slot}", f"randaugment_magnitude_{slot}"))


def view_param_fields(recipe: ViewRecipe) -> tuple[str, ...]:
    """The view parameters an archive of `recipe` records, in column order: the crop's,
    the mix's, RandAugment's slots and the erased box, each only when the recipe has it."""
    names = VIEW_PARAM_FIELDS + (MIX_PARAM_FIELDS if recipe.mixup else ())
    if recipe.randaugment:
        names += randaugment_fields(recipe.randaugment["num_ops"])
    return names + (ERASE_PARAM_FIELDS if recipe.random_erase > 0 else ())


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
    centred crop whose ratio lies in range. RandAugment's ops and the erased box have
    generator streams of their own, drawn only when the recipe has them. A detection
    recipe draws a window instead (`_detection_window`).
    """
    height, width = image_size
    rng = np.random.default_rng([recipe.seed, epoch, index, view, _STREAM_VIEW])
    if recipe.detection is not None:
        return _detection_window(recipe, rng, height, width)
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
    params = ViewParams(top, left, h, w, *_flip_and_colour(recipe, rng))
    if recipe.randaugment:
        params = replace(params, randaugment=_randaugment_slots(recipe, epoch, index, view))
    return _erase_box(recipe, epoch, index, view, params) if recipe.random_erase > 0 else params


def _flip_and_colour(recipe: ViewRecipe, rng: np.random.Generator) -> tuple[bool, float, float, float]:
    """The flip, then the brightness, contrast and saturation factors (1.0 without
    colour jitter), drawn from `rng` after the view's box."""
    flip = bool(rng.random() < recipe.flip_prob)
    jitter = recipe.color_jitter
    if jitter > 0:
        brightness, contrast, saturation = (float(f) for f in rng.uniform(1 - jitter, 1 + jitter, size=3))
    else:
        brightness = contrast = saturation = 1.0
    return flip, brightness, contrast, saturation


def _detection_window(recipe: ViewRecipe, rng: np.random.Generator, height: int, width: int) -> ViewParams:
    """A detection view: a square window in source pixels, so the image is never stretched.

    The zoom s ~ U(lo, hi) of `recipe.detection["scale"]` sets the window's side to
    max(1, round(max(height, width) / s)) (Python's round): at s = 1 the image's longer
    side fills the view, above 1 the window is a crop, below 1 it is larger than the image.
    Its top is a uniform integer in [min(0, height - side), max(0, height - side)], its
    left likewise: a crop at a random place, or the image at a random place inside the
    window, the rest zero padding (render pads a window that runs past the image).
    """
    low, high = recipe.detection["scale"]
    side = max(1, round(max(height, width) / rng.uniform(low, high)))
    top = int(rng.integers(min(0, height - side), max(0, height - side) + 1))
    left = int(rng.integers(min(0, width - side), max(0, width - side) + 1))
    return ViewParams(top, left, side, side, *_flip_and_colour(recipe, rng))


def detection_eval_view(image_size: tuple[int, int]) -> ViewParams:
    """The evaluation view of a detection model: the whole image, unflipped, its longer
    side filling the view, padded below or to the right to a square (never stretched)."""
    side = max(image_size)
    return ViewParams(0, 0, side, side, False)


def view_boxes(params: ViewParams, boxes: np.ndarray, size: int, min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """The boxes a `size` x `size` view with `params` shows, and which of `boxes` they are.

    `boxes` are (n, 4) x0, y0, x1, y1 in source pixels (edges, not centres). Each is moved
    into the view as render moves the pixels: x' = (x - left) * size / width,
    y' = (y - top) * size / height, clipped to [0, size], and mirrored (x0', x1' =
    size - x1', size - x0') when the view is flipped. A box is kept when its clipped area
    is at least `min_visible` times its unclipped area in the view, and its clipped width
    and height are each at least MIN_BOX_SIDE pixels: a sliver at the edge teaches
    nothing. Returns the kept boxes (m, 4) float32 and the keep mask (n,) bool.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.float32([size / params.width, size / params.height] * 2)
    moved = (boxes - np.float32([params.left, params.top] * 2)) * scale
    clipped = np.clip(moved, 0, np.float32(size))
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    box_width, box_height = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (box_width * box_height >= min_visible * area) & (box_width >= MIN_BOX_SIDE) & (box_height >= MIN_BOX_SIDE)
    kept = clipped[keep]
    if params.flip:
        kept[:, [0, 2]] = size - kept[:, [2, 0]]
    return kept, keep


def _randaugment_slots(recipe: ViewRecipe, epoch: int, index: int, view: int) -> tuple[tuple[float, float], ...]:
    """RandAugment's N (op, magnitude) slots: each op uniform from the recipe's ops, with
    replacement, at magnitude M, negated for an op with a direction when its coin says so."""
    rng = np.random.default_rng([recipe.seed, epoch, index, view, _STREAM_RANDAUGMENT])
    spec = recipe.randaugment
    choices = rng.integers(0, len(spec["ops"]), size=spec["num_ops"])
    negate = rng.random(spec["num_ops"]) < 0.5
    magnitude = float(np.float32(spec["magnitude"]))  # as stored: render from what is recorded
    slots = []
    for choice, flip in zip(choices, negate):
        name = spec["ops"][choice]
        signed = flip and RANDAUGMENT[name].signed
        slots.append((float(RANDAUGMENT_OPS.index(name)), -magnitude if signed else magnitude))
    return tuple(slots)


def _erase_box(recipe: ViewRecipe, epoch: int, index: int, view: int, params: ViewParams) -> ViewParams:
    """`params` with, at probability `recipe.random_erase`, timm's random-erasing box drawn:
    up to 10 tries at an area share in ERASE_AREA and a log-uniform height / width ratio,
    until one fits inside the view, at a uniform place; and the seed of its noise."""
    rng = np.random.default_rng([recipe.seed, epoch, index, view, _STREAM_ERASE])
    if rng.random() >= recipe.random_erase:
        return params
    for _ in range(10):
        area = rng.uniform(*ERASE_AREA)
        aspect = math.exp(rng.uniform(*ERASE_LOG_RATIO))
        height, width = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if height < 1 and width < 1:
            box = np.float32([rng.uniform(0, 1 - height), rng.uniform(0, 1 - width), height, width])
            return replace(params, erase_top=float(box[0]), erase_left=float(box[1]), erase_height=float(box[2]),
                           erase_width=float(box[3]), erase_seed=int(rng.integers(ERASE_SEEDS)))
    return params


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
    rows, cols = _pixel_box(params.box_top, params.box_left, params.box_height, params.box_width, pixels.shape[-1])
    out = pixels.clone()
    out[:, rows, cols] = partner_pixels[:, rows, cols]
    return out


def _pixel_box(top: float, left: float, height: float, width: float, size: int) -> tuple[slice, slice]:
    """The rows and columns of a box given in fractions of a size x size view's side: each
    edge rounded (Python's round) to the nearest pixel boundary."""
    return slice(round(top * size), round((top + height) * size)), slice(round(left * size), round((left + width) * size))


def _affine(image: torch.Tensor, translate: tuple[int, int] = (0, 0), shear: tuple[float, float] = (0.0, 0.0),
            center: list[float] | None = None) -> torch.Tensor:
    """A shear or a translation as torchvision's RandAugment makes it: nearest, filled black."""
    return F.affine(image, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=InterpolationMode.NEAREST, fill=None, center=center)


def _shear(strength: float) -> float:
    """The shear angle in degrees of RandAugment's shear at `strength`: a factor of 0.3 at most."""
    return math.degrees(math.atan(0.3 * strength))


class RandAugmentOp(NamedTuple):
    """One of RandAugment's ops on a uint8 view (C, size, size)."""

    signed: bool  # whether a negative magnitude turns it the other way (the others are never drawn negative)
    apply: Callable[[torch.Tensor, float], torch.Tensor]  # (view, strength = magnitude / 30) -> view


# RandAugment's ops by name, with torchvision RandAugment's ranges; docs/format.md spells each out.
RANDAUGMENT: dict[str, RandAugmentOp] = {
    "Identity": RandAugmentOp(False, lambda image, s: image),
    "ShearX": RandAugmentOp(True, lambda image, s: _affine(image, shear=(_shear(s), 0.0), center=[0.0, 0.0])),
    "ShearY": RandAugmentOp(True, lambda image, s: _affine(image, shear=(0.0, _shear(s)), center=[0.0, 0.0])),
    "TranslateX": RandAugmentOp(True, lambda image, s: _affine(image, translate=(int(150 / 331 * s * image.shape[-1]), 0))),
    "TranslateY": RandAugmentOp(True, lambda image, s: _affine(image, translate=(0, int(150 / 331 * s * image.shape[-2])))),
    "Rotate": RandAugmentOp(True, lambda image, s: F.rotate(image, 30.0 * s, interpolation=InterpolationMode.NEAREST)),
    "Brightness": RandAugmentOp(True, lambda image, s: F.adjust_brightness(image, 1 + 0.9 * s)),
    "Color": RandAugmentOp(True, lambda image, s: F.adjust_saturation(image, 1 + 0.9 * s)),
    "Contrast": RandAugmentOp(True, lambda image, s: F.adjust_contrast(image, 1 + 0.9 * s)),
    "Sharpness": RandAugmentOp(True, lambda image, s: F.adjust_sharpness(image, 1 + 0.9 * s)),
    "Posterize": RandAugmentOp(False, lambda image, s: F.posterize(image, 8 - round(4 * s))),
    "Solarize": RandAugmentOp(False, lambda image, s: F.solarize(image, 255.0 * (1 - s))),
    "AutoContrast": RandAugmentOp(False, lambda image, s: F.autocontrast(image)),
    "Equalize": RandAugmentOp(False, lambda image, s: F.equalize(image)),
    "Invert": RandAugmentOp(False, lambda image, s: F.invert(image)),
}


def full_view(image_size: tuple[int, int]) -> ViewParams:
    """The whole image, unflipped and unchanged: the view used for validation."""
    return ViewParams(0, 0, image_size[0], image_size[1], False)


def render(image: torch.Tensor, params: ViewParams, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Turn a decoded uint8 image (C, H, W) and view parameters into float32 pixels in
    [0, 1] of shape (C, size, size), the crop resized with `interpolation` (a recipe's,
    antialiased; a window that runs past the image, as a detection view's may, is zero-
    padded first). The one renderer of both stages: crop, flip, RandAugment's ops (on
    uint8, as torchvision's), colour, then the erased box."""
    out = F.resized_crop(
        image, params.top, params.left, params.height, params.width, [size, size],
        interpolation=InterpolationMode(interpolation), antialias=True,
    )
    if params.flip:
        out = F.horizontal_flip(out)
    for op, magnitude in params.randaugment:
        out = RANDAUGMENT[RANDAUGMENT_OPS[int(op)]].apply(out, magnitude / MAX_RANDAUGMENT_MAGNITUDE)
    out = F.to_dtype(out, torch.float32, scale=True)
    if params.brightness != 1.0:
        out = F.adjust_brightness(out, params.brightness)
    if params.contrast != 1.0:
        out = F.adjust_contrast(out, params.contrast)
    if params.saturation != 1.0:
        out = F.adjust_saturation(out, params.saturation)
    if params.erase_height > 0 and params.erase_width > 0:
        rows, cols = _pixel_box(params.erase_top, params.erase_left, params.erase_height, params.erase_width, size)
        box = out[:, rows, cols]
        generator = torch.Generator().manual_seed(params.erase_seed)
        out[:, rows, cols] = torch.rand(box.shape, generator=generator)  # out is this call's own tensor
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
