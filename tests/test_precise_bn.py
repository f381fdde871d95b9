"""Precise BN: a student whose BatchNorm momentum is tiny (MobileNetV3's 0.01) is scored
and saved with BatchNorm statistics recomputed from its weights, not with running
averages that a short run never warmed up."""

from __future__ import annotations

import json

import torch
from torch import nn

from pipeline.config import ModelSpec, ViewRecipe
from pipeline.data import open_source
from pipeline.models import build_model
from pipeline.precise_bn import recompute_batch_norm, sample_views

from .conftest import cli_json, train_until, weights, write_image_folder

STUDENT = "tests.toy_models:slow_bn_cnn"


def _val_top1s(run) -> list[float]:
    return [json.loads(line)["val_top1"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _batch_statistics_top1(run, data) -> float:
    """Top-1 % of the saved student on `data`'s whole images with BatchNorm in
    batch-statistics mode (train mode, all images in one batch): what it has learned,
    whatever its running statistics."""
    from pipeline.probe import whole_images

    student = build_model(ModelSpec(STUDENT, num_classes=3))
    student.net.load_state_dict(weights(run))
    images, labels = next(iter(whole_images(open_source(str(data)), 16)))
    with torch.no_grad():
        return 100.0 * float((student.train()(images).argmax(1) == labels).float().mean())


def test_a_short_run_with_slow_batchnorm_scores_what_it_learned(tmp_path):
    """The issue's case at small scale: 18 steps leave momentum-0.01 running statistics
    near their start, so without precise BN the saved student scores far below what it
    has learned; with it (the default) it scores what batch statistics give. Training is
    the same either way: only the BatchNorm statistics differ."""
    data = write_image_folder(tmp_path / "data", per_class=20)
    args = ["train-student", "--data", data, "--val", data, "--student", STUDENT, "--size", 16, "--batch-size", 10,
            "--epochs", 3, "--lr", 1e-2, "--workers", 0]
    cli_json(*args, "--out", tmp_path / "off", "--precise-bn", 0)
    cli_json(*args, "--out", tmp_path / "on")
    learned = _batch_statistics_top1(tmp_path / "off", data)
    off, on = _val_top1s(tmp_path / "off")[-1], _val_top1s(tmp_path / "on")[-1]
    assert learned >= 95 and off <= learned - 25, (learned, off)
    assert on >= learned - 5, (on, learned)
    # the same training: the weights are equal, the running statistics are not
    off_weights, on_weights = weights(tmp_path / "off"), weights(tmp_path / "on")
    statistics = [name for name in off_weights if "running" in name or "num_batches" in name]
    assert statistics and all(torch.equal(off_weights[k], on_weights[k]) for k in off_weights if k not in statistics)
    assert not torch.equal(off_weights["1.running_mean"], on_weights["1.running_mean"])
    assert json.loads((tmp_path / "on" / "config.json").read_text())["precise_bn"] == 1024


def test_recomputed_statistics_are_those_of_the_inputs():
    """After the recompute, a layer's running mean is the mean of all its inputs over the
    batches (a short last batch weighted by its size), its running variance the
    size-weighted mean of the batches' unbiased variances; momentum and mode are restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(), nn.Dropout(0.5))
    batches = [torch.randn(5, 3, 8, 8) * 3 + 1, torch.randn(2, 3, 8, 8)]
    inputs = [model[0](batch).detach() for batch in batches]
    model.eval()
    recompute_batch_norm(model, batches)
    bn = model[1]
    everything = torch.cat(inputs)
    assert torch.allclose(bn.running_mean, everything.mean((0, 2, 3)), atol=1e-5)
    variances = [x.var((0, 2, 3), unbiased=True) for x in inputs]
    assert torch.allclose(bn.running_var, (5 * variances[0] + 2 * variances[1]) / 7, atol=1e-5)
    assert bn.momentum == 0.01 and not model.training


def test_the_views_are_a_function_of_the_recipe_and_the_epoch():
    source, recipe = open_source("synthetic:12:3:16"), ViewRecipe(size=8, views_per_sample=2, epochs=2)
    first = torch.cat(list(sample_views(source, recipe, 8, 0, 7, batch_size=2)))
    again = torch.cat(list(sample_views(source, recipe, 8, 0, 7, batch_size=3)))
    other = torch.cat(list(sample_views(source, recipe, 8, 1, 7, batch_size=2)))
    assert first.shape == (7, 3, 8, 8) and torch.equal(first, again) and not torch.equal(first, other)


def test_a_resumed_run_saves_the_statistics_of_an_uninterrupted_one(tmp_path, monkeypatch):
    args = ["--data", "synthetic:24:3:16", "--student", STUDENT, "--batch-size", 6, "--epochs", 3, "--workers", 0]
    cli_json("train-student", *args, "--out", tmp_path / "whole")
    train_until(monkeypatch, 1, *args, "--out", tmp_path / "resumed")
    cli_json("train-student", *args, "--out", tmp_path / "resumed", "--resume")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
