"""Defaults taken from what is already known: a cached run takes its epochs and recipe
from the archive, an added teacher its recipe, `verify --recompute` its teacher and data
from the manifest; `--resume` compares only what changes the result."""

import json

import torch

from pipeline.config import ModelSpec
from pipeline.models import build_model

from .conftest import assert_user_error, cli_json, run_cli, train_until, weights, write_image_folder

DATA = "synthetic:18:3:20"
RECIPE = ["--size", 16, "--epochs", 3, "--views-per-sample", 2, "--color-jitter", 0.2, "--seed", 5]
CACHE = ["--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", *RECIPE, "--workers", 0, "--codec", "dense-fp32"]


def test_a_first_cached_run_takes_the_archives_epochs_and_recipe(tmp_path):
    cli_json("cache-teacher", *CACHE, "--out", tmp_path / "a")
    summary = cli_json("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "a",
                       "--out", tmp_path / "run", "--batch-size", 6, "--workers", 0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert summary["epochs"] == config["epochs"] == 3
    assert config["recipe"] == manifest["recipe"] and config["recipe"]["size"] == 16
    # an explicit --epochs beyond the archive is still refused, and a schedule gives its sum
    assert_user_error(run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "a",
                              "--out", tmp_path / "x", "--epochs", 4, "--workers", 0), "holds 3 epochs")
    summary = cli_json("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "a",
                       "--out", tmp_path / "scheduled", "--schedule", "main:2", "--batch-size", 6, "--workers", 0)
    assert summary["epochs"] == 2


def test_resume_ignores_the_worker_count_and_how_paths_are_written(tmp_path, monkeypatch):
    """A run killed after one epoch, resumed with another --workers and with its paths
    given relative instead of absolute (and through a link), ends with the weights of an uninterrupted run; a
    change that alters the result (--lr) is still refused by name."""
    cli_json("cache-teacher", *CACHE, "--out", tmp_path / "a")
    train = ["--data", DATA, "--student", "kdpipe:mlp", "--batch-size", 6]
    cli_json("train-student", *train, "--cache", tmp_path / "a", "--out", tmp_path / "whole", "--workers", 0)
    train_until(monkeypatch, 1, *train, "--cache", tmp_path / "a", "--out", tmp_path / "run", "--workers", 0)
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_cli("train-student", *train, "--cache", "a", "--out", "run", "--workers", 2, "--resume",
                              "--lr", 0.01), "lr differs")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache"] == str(tmp_path / "a") and config["out"] == str(tmp_path / "run")
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    cli_json("train-student", *train, "--cache", "link", "--out", "run", "--workers", 2, "--resume")
    assert weights(tmp_path / "run").keys() == weights(tmp_path / "whole").keys()
    assert all(weights(tmp_path / "run")[k].equal(v) for k, v in weights(tmp_path / "whole").items())


def test_verify_recompute_takes_the_teacher_and_data_from_the_manifest(tmp_path, monkeypatch):
    """The manifest records the teacher (weights as an absolute path) and where the data
    was: `verify --recompute` needs neither retyped, from any folder; a weights file that
    moved is named, and given with --weights."""
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=3)).net.state_dict(), tmp_path / "t.pt")
    data = write_image_folder(tmp_path / "data", per_class=3)
    monkeypatch.chdir(tmp_path)
    cli_json("cache-teacher", *CACHE[2:], "--data", "data", "--weights", "t.pt", "--out", "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["teacher"]["spec"]["weights"] == str(tmp_path / "t.pt")
    assert manifest["dataset"]["location"] == str(data)
    monkeypatch.chdir(data)
    report = json.loads(run_cli("verify", tmp_path / "a", "--recompute", 3, "--json").stdout)
    assert report["recomputed"]["samples"] == 3 and report["problems"] == []
    (tmp_path / "t.pt").rename(tmp_path / "moved.pt")
    assert_user_error(run_cli("verify", tmp_path / "a", "--recompute", 3), str(tmp_path / "t.pt"), "--weights")
    report = json.loads(run_cli("verify", tmp_path / "a", "--recompute", 3, "--weights", tmp_path / "moved.pt",
                                "--json").stdout)
    assert report["recomputed"]["samples"] == 3 and report["problems"] == []
    # another teacher is still checked against the archive's
    assert_user_error(run_cli("verify", tmp_path / "a", "--recompute", 1, "--teacher", "kdpipe:cnn"),
                      "teacher.fingerprint")


def test_an_added_teacher_takes_the_archives_recipe(tmp_path):
    cli_json("cache-teacher", *CACHE, "--out", tmp_path / "a")
    cli_json("cache-teacher", "--data", DATA, "--teacher", "kdpipe:cnn", "--teacher-name", "big", "--workers", 0,
             "--out", tmp_path / "a")
    added = json.loads((tmp_path / "a" / "teachers" / "big" / "manifest.json").read_text())
    assert added["recipe"] == json.loads((tmp_path / "a" / "manifest.json").read_text())["recipe"]
    # an option given must still agree with the archive's
    assert_user_error(run_cli("cache-teacher", "--data", DATA, "--teacher", "kdpipe:cnn", "--teacher-name", "other",
                              "--size", 32, "--out", tmp_path / "a"), "recipe.size")


def test_the_view_size_and_interpolation_default_to_the_models_own(tmp_path):
    """timm's test_vit was made for 160 px views resized bicubic: cache-teacher renders its
    views so unless told otherwise, and a supervised run of it as a student too."""
    cli_json("cache-teacher", "--data", "synthetic:4:3:20", "--teacher", "timm:test_vit", "--workers", 0,
             "--out", tmp_path / "a")
    recipe = json.loads((tmp_path / "a" / "manifest.json").read_text())["recipe"]
    assert (recipe["size"], recipe["interpolation"]) == (160, "bicubic")
    cli_json("cache-teacher", "--data", "synthetic:4:3:20", "--teacher", "timm:test_vit", "--workers", 0,
             "--size", 32, "--interpolation", "nearest", "--out", tmp_path / "b")
    recipe = json.loads((tmp_path / "b" / "manifest.json").read_text())["recipe"]
    assert (recipe["size"], recipe["interpolation"]) == (32, "nearest")
    cli_json("train-student", "--data", "synthetic:4:3:20", "--student", "timm:test_vit", "--mode", "supervised",
             "--epochs", 1, "--workers", 0, "--out", tmp_path / "run")
    recipe = json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]
    assert (recipe["size"], recipe["interpolation"]) == (160, "bicubic")
    assert_user_error(run_cli("cache-teacher", "--data", "synthetic:4:3:20", "--teacher", "kdpipe:cnn",
                              "--interpolation", "lanczos", "--out", tmp_path / "c"), "--interpolation")
