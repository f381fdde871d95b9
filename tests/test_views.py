"""Views are pure functions of (recipe, epoch, index, view, image size), and one renderer
turns them into the same pixels in every stage."""

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config import ViewRecipe
from pipeline.data import RangeBatches, ViewDataset, open_source
from pipeline.errors import ConfigError
from pipeline.views import VIEW_PARAM_FIELDS, epoch_order, full_view, render, sample_view

RECIPE = ViewRecipe(size=12, views_per_sample=3, epochs=3, seed=7, color_jitter=0.3)


def _params_from_loader(source, recipe, batch_size, workers):
    """(epoch, index, view) -> params bytes, as a DataLoader delivers them."""
    n = len(source)
    loader = DataLoader(
        ViewDataset(source, recipe),
        batch_sampler=RangeBatches([(e, 0, n) for e in range(recipe.epochs)], n, batch_size),
        num_workers=workers,
    )
    seen = {}
    for batch in loader:
        for epoch, index, params in zip(batch["epoch"], batch["index"], batch["params"]):
            for view, row in enumerate(params):
                seen[(int(epoch), int(index), view)] = row.numpy().tobytes()
    return seen


def test_view_params_do_not_depend_on_workers_batch_size_or_order():
    source = open_source("synthetic:20:4:16")
    reference = _params_from_loader(source, RECIPE, batch_size=1, workers=0)
    assert len(reference) == 3 * 20 * 3
    assert _params_from_loader(source, RECIPE, batch_size=7, workers=2) == reference
    assert _params_from_loader(source, RECIPE, batch_size=20, workers=0) == reference
    # direct calls in a shuffled order give the same parameters
    keys = list(reference)
    for k in np.random.default_rng(0).permutation(len(keys)):
        epoch, index, view = keys[k]
        assert sample_view(RECIPE, epoch, index, view, (16, 16)).as_array(VIEW_PARAM_FIELDS).tobytes() == reference[keys[k]]


def test_views_differ_across_epochs_views_and_seeds():
    size = (64, 48)
    params = {(e, v): sample_view(RECIPE, e, 5, v, size) for e in range(3) for v in range(3)}
    assert len(set(params.values())) == 9
    other_seed = ViewRecipe(size=12, views_per_sample=3, epochs=3, seed=8, color_jitter=0.3)
    assert sample_view(other_seed, 0, 5, 0, size) != params[(0, 0)]
    assert sample_view(RECIPE, 0, 6, 0, size) != params[(0, 0)]


def test_crop_boxes_respect_the_recipe():
    recipe = ViewRecipe(scale=(0.25, 0.5), ratio=(0.5, 2.0), flip_prob=0.0)
    for index in range(200):
        p = sample_view(recipe, 0, index, 0, (40, 60))
        assert 0 <= p.top and p.top + p.height <= 40 and 0 <= p.left and p.left + p.width <= 60
        assert p.flip is False
        assert 0.2 <= p.height * p.width / (40 * 60) <= 0.55  # rounding widens the range a little
        assert (p.brightness, p.contrast, p.saturation) == (1.0, 1.0, 1.0)


def test_flip_probability_is_honoured():
    flips = [sample_view(ViewRecipe(flip_prob=0.5), 0, i, 0, (32, 32)).flip for i in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(RECIPE, 0, 50)
    assert sorted(order) == list(range(50))
    assert np.array_equal(order, epoch_order(RECIPE, 0, 50))
    assert not np.array_equal(order, epoch_order(RECIPE, 1, 50))


def test_render_applies_crop_flip_and_colour():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    whole = render(image, full_view((8, 8)), 8)
    assert whole.dtype == torch.float32 and whole.shape == (3, 8, 8)
    assert torch.allclose(whole, image.float() / 255, atol=1e-6)
    flipped = render(image, sample_view(ViewRecipe(scale=(1, 1), ratio=(1, 1), flip_prob=1.0), 0, 0, 0, (8, 8)), 8)
    assert torch.equal(flipped, whole.flip(-1))
    p = sample_view(ViewRecipe(color_jitter=0.5, scale=(1, 1), ratio=(1, 1), flip_prob=0), 0, 3, 0, (8, 8))
    assert p.brightness != 1.0
    assert not torch.equal(render(image, p, 8), whole)
    out = render(image, sample_view(RECIPE, 0, 0, 0, (8, 8)), 5)
    assert out.shape == (3, 5, 5) and 0 <= out.min() and out.max() <= 1


def test_rendering_is_deterministic():
    source = open_source("synthetic:4:2:20")
    dataset = ViewDataset(source, RECIPE)
    first = [hashlib.sha256(dataset[i]["views"].numpy().tobytes()).hexdigest() for i in range(len(dataset))]
    again = [hashlib.sha256(dataset[i]["views"].numpy().tobytes()).hexdigest() for i in reversed(range(len(dataset)))]
    assert first == again[::-1]


@pytest.mark.parametrize(
    "options",
    [{"size": 0}, {"scale": (0.5, 0.2)}, {"ratio": (0, 1)}, {"flip_prob": 2}, {"views_per_sample": 0}, {"seed": -1}],
)
def test_bad_recipes_are_refused(options):
    with pytest.raises(ConfigError):
        ViewRecipe(**options)


def test_recipe_round_trips_through_dict():
    assert ViewRecipe.from_dict(RECIPE.to_dict()) == RECIPE
    with pytest.raises(ConfigError, match="no field"):
        ViewRecipe.from_dict(RECIPE.to_dict() | {"crop": 1})


def test_the_renderer_resizes_with_the_recipes_interpolation():
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    params = sample_view(ViewRecipe(size=16), 0, 0, 0, (40, 56))
    bilinear, bicubic = render(image, params, 16), render(image, params, 16, "bicubic")
    assert not torch.equal(bilinear, bicubic)
    assert torch.equal(bicubic, render(image, params, 16, "bicubic"))
