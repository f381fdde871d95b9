"""RandAugment and random erasing are view parameters: drawn from the view's key, recorded
in the archive, and replayed by the student exactly as the teacher saw them."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.config import DEFAULT_RANDAUGMENT_OPS, RANDAUGMENT_OPS, ModelSpec, ViewRecipe
from pipeline.data import RangeBatches, ViewDataset, open_source
from pipeline.errors import ArchiveMismatchError, ConfigError
from pipeline.models import build_model
from pipeline.replay import ReplayBatches
from pipeline.store import ArchiveReader
from pipeline.views import RANDAUGMENT, VIEW_PARAM_FIELDS, full_view, render, sample_view, view_param_fields

from .conftest import assert_user_error, cli_json, run_cli, weights

RANDAUGMENT_ON = {"num_ops": 2, "magnitude": 9.0, "ops": list(DEFAULT_RANDAUGMENT_OPS)}
RECIPE = ViewRecipe(size=16, views_per_sample=2, epochs=2, seed=5, randaugment=RANDAUGMENT_ON, random_erase=0.5)
AUGMENT = ["--randaugment", "2,9", "--random-erase", 0.5]
DATA = "synthetic:12:4:16"


def _params_from_loader(source, recipe, batch_size, workers):
    """(epoch, index, view) -> recorded params bytes, as a DataLoader delivers them."""
    n = len(source)
    loader = DataLoader(ViewDataset(source, recipe), num_workers=workers,
                        batch_sampler=RangeBatches([(e, 0, n) for e in range(recipe.epochs)], n, batch_size))
    return {(int(epoch), int(index), view): row.numpy().tobytes()
            for batch in loader for epoch, index, params in zip(batch["epoch"], batch["index"], batch["params"])
            for view, row in enumerate(params)}


def test_ops_and_erased_boxes_are_a_pure_function_of_the_view_key():
    source = open_source(DATA)
    reference = _params_from_loader(source, RECIPE, batch_size=1, workers=0)
    assert _params_from_loader(source, RECIPE, batch_size=5, workers=2) == reference
    fields = view_param_fields(RECIPE)
    for (epoch, index, view), row in reversed(reference.items()):
        assert sample_view(RECIPE, epoch, index, view, (16, 16)).as_array(fields).tobytes() == row
    rows = np.stack([np.frombuffer(row, dtype=np.float32) for row in reference.values()])
    ops = rows[:, [fields.index(f"randaugment_op_{slot}") for slot in range(2)]]
    assert len(np.unique(ops)) > 5 and set(np.unique(ops)) <= set(range(len(DEFAULT_RANDAUGMENT_OPS)))
    assert set(np.abs(rows[:, fields.index("randaugment_magnitude_0")])) == {9.0}
    erased = rows[:, fields.index("erase_height")] > 0
    assert 0.25 < erased.mean() < 0.75  # probability 0.5, over 48 views
    # the crop's stream is untouched: the same views as without the new augmentations
    plain = replace(RECIPE, randaugment=None, random_erase=0.0)
    assert sample_view(plain, 1, 3, 1, (16, 16)) == replace(sample_view(RECIPE, 1, 3, 1, (16, 16)), randaugment=(),
                                                            erase_top=0.0, erase_left=0.0, erase_height=0.0,
                                                            erase_width=0.0, erase_seed=0)


def test_a_hand_checked_view():
    recipe = ViewRecipe(size=16, seed=3, scale=(1, 1), ratio=(1, 1), flip_prob=0, random_erase=1.0,
                        randaugment={"num_ops": 3, "magnitude": 9, "ops": ["Rotate", "Invert", "ShearX"]})
    params = sample_view(recipe, 1, 4, 0, (20, 20))
    # stream 5 of key (3, 1, 4, 0): ops [1, 2, 0] of the recipe's list and coins [0.36, 0.17, 0.72] < 0.5:
    # Invert (unsigned, +9), ShearX (negated), Rotate (not negated), numbered by RANDAUGMENT_OPS
    assert params.randaugment == ((14.0, 9.0), (1.0, -9.0), (5.0, 9.0))
    assert RANDAUGMENT_OPS[14] == "Invert" and RANDAUGMENT_OPS[1] == "ShearX" and RANDAUGMENT_OPS[5] == "Rotate"
    # stream 6: 0.199 < 1 erases; area 0.2754 of the view at height/width exp(-0.4055): sqrt(area * ratio) high
    assert params.erase_height == pytest.approx(math.sqrt(0.275365257840758 * math.exp(-0.40552690295187865)), abs=1e-7)
    assert params.erase_width == pytest.approx(math.sqrt(0.275365257840758 / math.exp(-0.40552690295187865)), abs=1e-7)
    assert 0 <= params.erase_top <= 1 - params.erase_height and 0 <= params.erase_left <= 1 - params.erase_width
    # the pixels: the ops in slot order on the uint8 view, then the box filled with the seed's noise
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = F.resize(image, [16, 16], antialias=True)
    out = F.invert(out)
    out = F.affine(out, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(-0.09)), 0.0],
                   interpolation=InterpolationMode.NEAREST, center=[0, 0])
    out = F.to_dtype(F.rotate(out, 9.0), torch.float32, scale=True)
    rows = slice(round(params.erase_top * 16), round((params.erase_top + params.erase_height) * 16))
    cols = slice(round(params.erase_left * 16), round((params.erase_left + params.erase_width) * 16))
    noise = torch.rand((3, rows.stop - rows.start, cols.stop - cols.start),
                       generator=torch.Generator().manual_seed(params.erase_seed))
    out[:, rows, cols] = noise
    assert torch.equal(render(image, params, 16), out)


def test_every_op_renders_and_the_table_is_the_formats():
    assert tuple(RANDAUGMENT) == RANDAUGMENT_OPS  # the op numbers of docs/format.md
    # grey levels 20-230, skewed dark: autocontrast, equalize and solarize each have work to do
    uniform = torch.rand((3, 20, 20), generator=torch.Generator().manual_seed(1))
    image = (20 + 210 * uniform**2).to(torch.uint8)
    plain = render(image, full_view((20, 20)), 20)
    for number, name in enumerate(RANDAUGMENT_OPS):
        for magnitude in (-30.0, 9.0, 30.0) if RANDAUGMENT[name].signed else (9.0, 30.0):
            out = render(image, replace(full_view((20, 20)), randaugment=((float(number), magnitude),)), 20)
            assert out.shape == (3, 20, 20) and 0 <= out.min() and out.max() <= 1
            assert torch.equal(out, plain) == (name == "Identity"), (name, magnitude)
    inverted = render(image, replace(full_view((20, 20)), randaugment=((14.0, 9.0),)), 20)
    assert torch.allclose(inverted, 1 - plain, atol=1e-6)
    posterized = render(image, replace(full_view((20, 20)), randaugment=((10.0, 30.0),)), 20)
    assert torch.all((posterized * 255).round() % 16 == 0)  # magnitude 30 keeps 4 bits


def test_rendering_is_deterministic():
    dataset = ViewDataset(open_source(DATA), replace(RECIPE, mixup={"mode": "cutmix", "alpha": 0.0}))
    first = [dataset[i]["views"] for i in range(len(dataset))]
    again = [dataset[i]["views"] for i in reversed(range(len(dataset)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_recipes_without_them_keep_their_json_and_columns():
    plain = ViewRecipe()
    assert "randaugment" not in plain.to_dict() and "random_erase" not in plain.to_dict()
    assert view_param_fields(plain) == VIEW_PARAM_FIELDS
    assert ViewRecipe.from_dict(RECIPE.to_dict()) == RECIPE
    assert RECIPE.to_dict()["random_erase"] == 0.5
    assert view_param_fields(RECIPE)[8:] == ("randaugment_op_0", "randaugment_magnitude_0", "randaugment_op_1",
                                             "randaugment_magnitude_1", "erase_top", "erase_left", "erase_height",
                                             "erase_width", "erase_seed")


@pytest.mark.parametrize("randaugment, match", [
    ({"num_ops": 2, "magnitude": 31, "ops": ["Rotate"]}, "magnitude"),
    ({"num_ops": 0, "magnitude": 9, "ops": ["Rotate"]}, "ops per view"),
    ({"num_ops": 2, "magnitude": 9, "ops": ["Rotat"]}, "did you mean Rotate"),
    ({"num_ops": 2, "magnitude": 9, "ops": []}, "at least one"),
    ({"num_ops": 2, "magnitude": 9}, "randaugment must be"),
])
def test_bad_randaugment_is_refused(randaugment, match):
    with pytest.raises(ConfigError, match=match):
        ViewRecipe(randaugment=randaugment)


def test_the_student_replays_what_the_teacher_saw_and_a_changed_op_is_caught(tmp_path, monkeypatch):
    archive = tmp_path / "t.zarr"
    cli_json("cache-teacher", "--data", DATA, "--teacher", "kdpipe:mlp", "--out", archive, "--epochs", 1,
             "--views-per-sample", 2, "--size", 16, "--workers", 0, *AUGMENT)
    reader = ArchiveReader(archive)
    recipe = reader.manifest.recipe
    assert recipe.randaugment == RANDAUGMENT_ON and recipe.random_erase == 0.5
    fields = reader.manifest.layout.view_param_fields
    assert fields == view_param_fields(recipe)
    batches = ReplayBatches(ViewDataset(open_source(DATA), recipe), {"main": str(archive)}, {}, None)
    batch = batches[list(range(12))]
    _, stored, _ = reader.read(0, 0, 12)
    assert np.array_equal(stored, batch["params"].numpy())  # every column the student redrew
    column = fields.index("randaugment_op_1")
    read = ArchiveReader.read_fields

    def tampered(self, epoch, start, stop):
        fields = dict(read(self, epoch, start, stop))
        params = fields["view_params"] = fields["view_params"].copy()
        params[0, 0, column] = (params[0, 0, column] + 1) % len(RANDAUGMENT_OPS)
        return fields

    monkeypatch.setattr(ArchiveReader, "read_fields", tampered)
    with pytest.raises(ArchiveMismatchError, match="recorded other view parameters"):
        ReplayBatches(ViewDataset(open_source(DATA), recipe), {"main": str(archive)}, {}, None)[list(range(12))]
    # view options given to train-student must agree with the archive's
    result = run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--out", tmp_path / "s",
                     "--cache", archive, "--randaugment", "2,8", "--workers", 0)
    assert_user_error(result, "recipe.randaugment.magnitude")


def test_an_archive_without_them_reads_as_before_and_agrees_with_erasing_0(tmp_path):
    archive = tmp_path / "plain.zarr"
    cli_json("cache-teacher", "--data", DATA, "--teacher", "kdpipe:mlp", "--out", archive, "--size", 16, "--workers", 0)
    manifest = json.loads((archive / "manifest.json").read_text())
    assert "randaugment" not in manifest["recipe"] and "random_erase" not in manifest["recipe"]  # as kdpipe wrote before
    assert manifest["layout"]["view_param_fields"] == list(VIEW_PARAM_FIELDS)
    cli_json("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--out", tmp_path / "s", "--cache", archive,
             "--random-erase", 0, "--workers", 0, "--precise-bn", 0)


def test_offline_equals_online_bit_for_bit_with_randaugment_and_erasing(tmp_path):
    """A student trained from a float32 cache of augmented, erased, CutMix-ed views ends
    with exactly the weights of one trained with the teacher running live on them."""
    common = ["--data", DATA, "--views-per-sample", 2, "--size", 16, "--workers", 0, "--mixup", "cutmix", *AUGMENT]
    cli_json("cache-teacher", "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "t.zarr",
             "--codec", "dense-fp32", "--batch-size", 6, *common)
    teacher_weights = tmp_path / "teacher.pt"
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4)).net.state_dict(), teacher_weights)
    student = ["train-student", "--student", "kdpipe:mlp", "--batch-size", 6, "--epochs", 1, "--precise-bn", 0]
    cli_json(*student, "--out", tmp_path / "cached", "--cache", tmp_path / "t.zarr", *common)
    cli_json(*student, "--out", tmp_path / "online", "--mode", "online", "--teacher", "tests.toy_models:tiny_cnn",
             "--weights", teacher_weights, *common)
    cached, online = weights(tmp_path / "cached"), weights(tmp_path / "online")
    assert cached.keys() == online.keys()
    assert all(torch.equal(cached[name], online[name]) for name in cached)
    untouched = build_model(ModelSpec("kdpipe:mlp", num_classes=4)).net.state_dict()
    assert not torch.equal(cached["2.weight"], untouched["2.weight"])


@pytest.mark.parametrize("options, message", [
    (["--randaugment", "2,9", "--randaugment-ops", "Rotate,Solarise"], "no op 'Solarise'; did you mean Solarize?"),
    (["--randaugment", "2,31"], "magnitude M must be a finite number >= 0 and <= 30"),
    (["--randaugment", "2.5,9"], "whole number of ops"),
    (["--randaugment", "2"], "--randaugment takes 2 comma-separated numbers"),
    (["--randaugment-ops", "Rotate"], "add --randaugment N,M"),
    (["--random-erase", "1.5"], "--random-erase must be a finite number >= 0 and <= 1"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, options, message):
    for command, model in (("cache-teacher", "--teacher"), ("train-student", "--student")):
        result = run_cli(command, "--data", DATA, model, "kdpipe:mlp", "--out", tmp_path / command, *options)
        assert_user_error(result, message)
        assert not (tmp_path / command).exists()
