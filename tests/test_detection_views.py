"""Detection views: square, zoomed windows (never stretched) that are pure functions of the
view's key like every view, rendered by the one renderer, with the boxes moved by the same
parameters the pixels are."""

import json
import random

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.config import DETECTION_DEFAULTS, ViewRecipe, canonical_json, fingerprint
from pipeline.errors import ConfigError
from pipeline.views import (
    MIN_BOX_SIDE, VIEW_PARAM_FIELDS, ViewParams, detection_eval_view, render, sample_view, view_boxes, view_param_fields,
)

DETECTION = ViewRecipe(size=64, seed=11, color_jitter=0.2, detection=DETECTION_DEFAULTS)
KEYS = [(epoch, index, view) for epoch in range(3) for index in range(5) for view in range(3)]


def _window(params: ViewParams) -> tuple[int, int, int, int]:
    return params.top, params.left, params.height, params.width


# --- view_boxes: hand-computed cases -----------------------------------------------------

# image 100 x 200 (H x W); boxes are x0, y0, x1, y1 in source pixels
CROP = ViewParams(top=10, left=20, height=80, width=80, flip=False)  # rendered at 40: scale 0.5, a crop
CROP_BOXES = np.float32([
    [40, 30, 70, 70],    # inside: (10, 10, 25, 30)
    [0, 50, 60, 80],     # moved (-10, 20, 20, 35), clipped (0, 20, 20, 35): 300 / 450 of it visible, kept
    [80, 60, 140, 120],  # moved (30, 25, 60, 55), clipped (30, 25, 40, 40): 150 / 900 visible, dropped
    [50, 40, 51, 90],    # inside but 0.5 pixels wide in the view: dropped for MIN_BOX_SIDE
    [150, 0, 190, 20],   # outside the window: dropped
])


def test_view_boxes_of_a_crop_by_hand():
    boxes, keep = view_boxes(CROP, CROP_BOXES, 40, min_visible=0.5)
    assert keep.tolist() == [True, True, False, False, False]
    np.testing.assert_array_equal(boxes, np.float32([[10, 10, 25, 30], [0, 20, 20, 35]]))
    assert boxes.dtype == np.float32 and keep.dtype == bool


def test_view_boxes_of_a_flipped_crop_by_hand():
    boxes, keep = view_boxes(ViewParams(10, 20, 80, 80, flip=True), CROP_BOXES, 40, min_visible=0.5)
    assert keep.tolist() == [True, True, False, False, False]
    # x0', x1' = 40 - x1', 40 - x0'
    np.testing.assert_array_equal(boxes, np.float32([[15, 10, 30, 30], [20, 20, 40, 35]]))


def test_min_box_side_drops_slivers_at_the_edge_even_at_min_visible_zero():
    assert MIN_BOX_SIDE == 1.0
    slivers = np.float32([[0, 40, 21, 60], [0, 40, 22, 60]])  # moved: x1' = 0.5 and 1.0 after clipping at 0
    boxes, keep = view_boxes(CROP, slivers, 40, min_visible=0.0)
    assert keep.tolist() == [False, True]
    np.testing.assert_array_equal(boxes, np.float32([[0, 15, 1, 25]]))


def test_view_boxes_of_a_padded_window_by_hand():
    # a window larger than the image: top -20, left -40, side 160, rendered at 80 (scale 0.5);
    # the image lands at x in [20, 120) (clipped at 80) and y in [10, 60)
    boxes = np.float32([
        [0, 0, 20, 20],        # (20, 10, 30, 20), kept
        [100, 0, 180, 40],     # moved (70, 10, 110, 30), clipped (70, 10, 80, 30): 200 / 800, dropped
        [110, 50, 130, 99.5],  # moved (75, 35, 85, 59.75), clipped to x1 = 80: exactly half visible, kept
    ])
    for flip, expected in ((False, [[20, 10, 30, 20], [75, 35, 80, 59.75]]),
                           (True, [[50, 10, 60, 20], [0, 35, 5, 59.75]])):
        kept, keep = view_boxes(ViewParams(-20, -40, 160, 160, flip), boxes, 80, min_visible=0.5)
        assert keep.tolist() == [True, False, True]
        np.testing.assert_array_equal(kept, np.float32(expected))


def test_view_boxes_follow_a_stretched_crop_too():
    # a classification crop 50 high, 100 wide at 50 pixels: x halves, y stays
    boxes, keep = view_boxes(ViewParams(0, 0, 50, 100, False), np.float32([[20, 10, 60, 30]]), 50, 0.5)
    assert keep.tolist() == [True]
    np.testing.assert_array_equal(boxes, np.float32([[10, 10, 30, 30]]))


def test_view_boxes_of_no_boxes():
    for empty in (np.zeros((0, 4), np.float32), np.zeros((0,)), []):
        boxes, keep = view_boxes(CROP, empty, 40, 0.3)
        assert boxes.shape == (0, 4) and boxes.dtype == np.float32
        assert keep.shape == (0,) and keep.dtype == bool


def test_detection_eval_view_is_the_whole_image_padded_to_a_square():
    assert detection_eval_view((100, 200)) == ViewParams(0, 0, 200, 200, False)
    assert detection_eval_view((300, 120)) == ViewParams(0, 0, 300, 300, False)
    boxes, keep = view_boxes(detection_eval_view((100, 200)), np.float32([[0, 0, 200, 100]]), 50, 1.0)
    np.testing.assert_array_equal(boxes, np.float32([[0, 0, 50, 25]]))


# --- sample_view: purity and ranges --------------------------------------------------------


def test_detection_views_are_pure_functions_of_the_key():
    size = (480, 640)
    reference = {key: sample_view(DETECTION, *key, size) for key in KEYS}
    # shuffled, with draws of other recipes and sizes in between: nothing but the key counts
    other = ViewRecipe(seed=11, color_jitter=0.2)
    for k in np.random.default_rng(1).permutation(len(KEYS)):
        sample_view(other, *KEYS[k], size)
        sample_view(DETECTION, *KEYS[k], (50, 50))
        assert sample_view(DETECTION, *KEYS[k], size) == reference[KEYS[k]]
    # every key its own window; another seed moves every window
    assert len({_window(p) for p in reference.values()}) == len(KEYS)
    reseeded = ViewRecipe(size=64, seed=12, color_jitter=0.2, detection=DETECTION_DEFAULTS)
    assert all(_window(sample_view(reseeded, *key, size)) != _window(reference[key]) for key in KEYS)


def test_detection_views_ignore_every_global_generator():
    """No global state: reseeding Python's, numpy's and torch's global generators (as a
    fresh process or a worker would find them) changes no draw."""
    reference = [sample_view(DETECTION, *key, (480, 640)) for key in KEYS]
    for seed in (0, 1):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        assert [sample_view(DETECTION, *key, (480, 640)) for key in KEYS] == reference


@pytest.mark.parametrize("image_size", [(60, 90), (90, 60), (75, 75)])
def test_windows_stay_in_the_zoom_and_place_ranges(image_size):
    height, width = image_size
    longer, jitter = max(image_size), 0.25
    recipe = ViewRecipe(seed=3, color_jitter=jitter, detection={"scale": (0.5, 2.0), "min_visible": 0.3})
    draws = [sample_view(recipe, 0, index, view, image_size) for index in range(500) for view in range(2)]
    sides = np.array([p.height for p in draws])
    assert all(p.height == p.width for p in draws)  # square: the image is never stretched
    assert sides.min() >= round(longer / 2.0) and sides.max() <= round(longer / 0.5)
    assert sides.min() <= round(longer / 2.0) + 2 and sides.max() >= round(longer / 0.5) - 4  # the range is used
    for p in draws:
        assert min(0, height - p.height) <= p.top <= max(0, height - p.height)
        assert min(0, width - p.width) <= p.left <= max(0, width - p.width)
        assert all(1 - jitter <= f <= 1 + jitter for f in (p.brightness, p.contrast, p.saturation))
    assert any(p.height > longer for p in draws) and any(p.height < min(image_size) for p in draws)  # pads and crops
    assert 0.4 < np.mean([p.flip for p in draws]) < 0.6


def test_zoom_one_fills_the_view_with_the_longer_side():
    recipe = ViewRecipe(flip_prob=0.0, detection={"scale": (1, 1), "min_visible": 0.3})
    for index in range(20):
        p = sample_view(recipe, 0, index, 0, (40, 100))
        assert (p.height, p.width, p.left, p.flip) == (100, 100, 0, False) and -60 <= p.top <= 0


# --- render: the one renderer agrees with the box transform --------------------------------


def test_render_pads_with_zeros_and_rescales_the_image():
    image = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # the evaluation window (0, 0, 50) at 100 pixels: the image fills rows 0..59, zeros below
    out = render(image, detection_eval_view((30, 50)), 100, "nearest")
    expected = F.resize(image, [60, 100], interpolation=InterpolationMode.NEAREST)
    assert torch.equal(out[:, :60], F.to_dtype(expected, torch.float32, scale=True))
    assert torch.all(out[:, 60:] == 0)
    # bilinear: the same away from the one row whose filter reaches the padding
    out = render(image, detection_eval_view((30, 50)), 100, "bilinear")
    expected = F.resize(image, [60, 100], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(out[:, :59], F.to_dtype(expected, torch.float32, scale=True)[:, :59])
    assert torch.all(out[:, 61:] == 0)
    # the image inside a larger window, padded on every side: rows 20..79, columns 40..139
    out = render(image, ViewParams(-10, -20, 70, 70, False), 140, "nearest")
    assert torch.equal(out[:, 20:80, 40:140], F.to_dtype(expected_nearest_2x(image), torch.float32, scale=True))
    out[:, 20:80, 40:140] = 0
    assert torch.all(out == 0)


def expected_nearest_2x(image: torch.Tensor) -> torch.Tensor:
    return image.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


@pytest.mark.parametrize("flip", [False, True])
def test_a_bright_square_lands_where_view_boxes_puts_its_box(flip):
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 8:20, 30:46] = 255  # the box (30, 8, 46, 20)
    params = ViewParams(-10, -20, 80, 80, flip)  # padded; rendered at 160, scale 2
    boxes, keep = view_boxes(params, np.float32([[30, 8, 46, 20]]), 160, 0.5)
    np.testing.assert_array_equal(boxes, np.float32([[28 if flip else 100, 36, 60 if flip else 132, 60]]))
    # bilinear upsampling by 2 puts 0.75 / 0.25 on either side of an edge: > 0.5 is the box exactly
    bright = render(image, params, 160)[0] > 0.5
    expected = torch.zeros(160, 160, dtype=torch.bool)
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    expected[y0:y1, x0:x1] = True
    assert torch.equal(bright, expected)


def test_drawn_views_render_the_image_where_view_boxes_puts_it():
    """Over drawn windows (crops and padding, flipped or not), a flat image renders inside
    the box view_boxes gives for the whole image, and padding (zero) outside it."""
    height, width, size = 30, 44, 48
    image = torch.full((3, height, width), 200, dtype=torch.uint8)
    recipe = ViewRecipe(seed=5, detection={"scale": (0.4, 1.6), "min_visible": 0.0})
    for index in range(40):
        params = sample_view(recipe, 0, index, 0, (height, width))
        out = render(image, params, size)[0]
        boxes, _ = view_boxes(params, np.float32([[0, 0, width, height]]), size, 0.0)
        x0, y0, x1, y1 = boxes[0]
        # pixel centres more than one pixel inside the box are the image, more than one outside are padding
        centres = torch.arange(size) + 0.5
        inside_y, inside_x = (centres > y0 + 1) & (centres < y1 - 1), (centres > x0 + 1) & (centres < x1 - 1)
        outside_y, outside_x = (centres < y0 - 1) | (centres > y1 + 1), (centres < x0 - 1) | (centres > x1 + 1)
        inside = inside_y[:, None] & inside_x[None, :]
        outside = outside_y[:, None] | outside_x[None, :]
        assert inside.any()
        assert torch.allclose(out[inside], torch.tensor(200 / 255), atol=1 / 255)
        assert torch.all(out[outside] == 0)


# --- the recipe -----------------------------------------------------------------------------


def test_a_detection_recipe_round_trips_through_json():
    for detection in (DETECTION_DEFAULTS, {"scale": [0.25, 4], "min_visible": 0}, {"scale": (1, 1), "min_visible": 1.0}):
        recipe = ViewRecipe(size=96, seed=4, detection=detection)
        assert isinstance(recipe.detection["scale"], tuple)
        data = recipe.to_dict()
        assert data["detection"]["min_visible"] == detection["min_visible"]
        again = ViewRecipe.from_dict(json.loads(json.dumps(data)))
        assert again == recipe and again == ViewRecipe.from_dict(data)
        assert fingerprint(again.to_dict()) == fingerprint(data)
    assert ViewRecipe(detection=DETECTION_DEFAULTS).detection is not DETECTION_DEFAULTS  # a copy, not an alias


def test_classification_recipes_keep_their_json():
    assert "detection" not in ViewRecipe(color_jitter=0.4).to_dict()
    assert canonical_json(ViewRecipe().to_dict()) == (
        '{"color_jitter":0.0,"epochs":1,"flip_prob":0.5,"interpolation":"bilinear","mixup":null,'
        '"ratio":[0.75,1.3333333333333333],"scale":[0.08,1.0],"seed":0,"size":32,"views_per_sample":1}')
    assert ViewRecipe.from_dict(ViewRecipe().to_dict()).detection is None


@pytest.mark.parametrize("changes, message", [
    ({"detection": {"scale": (0.5, 1.5)}}, r"detection must be \{'scale': \[LO, HI\], 'min_visible': F\}"),
    ({"detection": {"scale": (0.5, 1.5), "min_visible": 0.3, "max": 2}}, "detection must be"),
    ({"detection": [0.5, 1.5]}, "detection must be"),
    ({"detection": {"scale": 1.0, "min_visible": 0.3}}, "--scale of detection views needs two zooms LO,HI"),
    ({"detection": {"scale": (0.5, 1.0, 2.0), "min_visible": 0.3}}, "--scale of detection views needs two zooms"),
    ({"detection": {"scale": (0, 1.5), "min_visible": 0.3}}, r"--scale \(a detection view's zoom\) must be a finite number > 0"),
    ({"detection": {"scale": (0.5, 11), "min_visible": 0.3}}, "<= 10, got 11"),
    ({"detection": {"scale": (0.5, float("nan")), "min_visible": 0.3}}, "must be a finite number"),
    ({"detection": {"scale": (2, 1), "min_visible": 0.3}}, r"must satisfy 0 < LO <= HI <= 10, got \(2, 1\)"),
    ({"detection": {"scale": (0.5, 1.5), "min_visible": 1.5}}, r"min_visible .* must be a finite number >= 0 and <= 1"),
    ({"detection": {"scale": (0.5, 1.5), "min_visible": -0.1}}, "min_visible"),
    ({"detection": DETECTION_DEFAULTS, "mixup": {"mode": "mixup", "alpha": 0}},
     "detection views cannot use --mixup: it changes pixels without their boxes; drop --mixup"),
    ({"detection": DETECTION_DEFAULTS, "randaugment": {"num_ops": 2, "magnitude": 9, "ops": ["Rotate"]}},
     "cannot use --randaugment.*drop --randaugment"),
    ({"detection": DETECTION_DEFAULTS, "random_erase": 0.25}, "cannot use --random-erase.*drop --random-erase"),
])
def test_bad_detection_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        ViewRecipe(**changes)
    assert "\n" not in str(error.value)


def test_a_detection_archive_records_the_classification_columns():
    assert view_param_fields(DETECTION) == VIEW_PARAM_FIELDS
    params = sample_view(ViewRecipe(detection={"scale": (0.2, 0.3), "min_visible": 0.3}), 0, 0, 0, (480, 640))
    row = params.as_array(view_param_fields(DETECTION))
    assert params.top < 0 and params.left < 0  # padding: negative offsets are recorded exactly
    assert [int(v) for v in row[:4]] == [params.top, params.left, params.height, params.width]
