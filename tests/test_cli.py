"""Bad input gets one line on stderr, exit code 2, no traceback, and loses nothing."""

import subprocess

import pytest
import torch

from pipeline.config import ModelSpec
from pipeline.models import build_model

from .conftest import KDPIPE, REPO, assert_user_error, cli_json, run_cli, subprocess_env, write_image_folder


def cache(data, out, *extra):
    return run_cli("cache-teacher", "--data", data, "--teacher", "kdpipe:cnn", "--out", out, "--size", 16, *extra)


def test_missing_data_path(tmp_path):
    assert_user_error(cache(tmp_path / "nowhere", tmp_path / "a.zarr"), "does not exist", "nowhere")
    assert not (tmp_path / "a.zarr").exists()


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(cache(tmp_path / "empty", tmp_path / "a.zarr"), "no images found")


@pytest.mark.parametrize("model", ["torchvision:resnet9000", "kdpipe:nope", "nosuchpackage.models:build"])
def test_unknown_model(tmp_path, image_folder, model):
    result = run_cli("cache-teacher", "--data", image_folder, "--teacher", model, "--out", tmp_path / "a.zarr")
    assert_user_error(result, model.split(":")[-1] if "nosuch" not in model else "nosuchpackage")


def test_class_count_mismatch_between_teacher_and_data(tmp_path, image_folder):
    assert_user_error(cache(image_folder, tmp_path / "a.zarr", "--num-classes", 10), "10 classes", "3 class folders")
    ten = tmp_path / "ten.pt"
    torch.save(build_model(ModelSpec("kdpipe:cnn", num_classes=10)).net.state_dict(), ten)
    # a teacher of logits keeps the head of its weights: a re-initialised one would teach noise
    assert_user_error(cache(image_folder, tmp_path / "b.zarr", "--weights", ten), "10 classes in its weights",
                      "fine-tune it first")
    result = run_cli("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--mode", "online",
                     "--teacher", "kdpipe:cnn", "--weights", ten, "--num-classes", 10, "--out", tmp_path / "run")
    assert_user_error(result, "10 classes", "3 class folders")


def test_existing_outputs(tmp_path, image_folder):
    (tmp_path / "file").write_text("x")
    assert_user_error(cache(image_folder, tmp_path / "file"), "is a file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = run_cli("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--mode", "supervised",
                     "--out", tmp_path / "busy", "--epochs", 1)
    assert_user_error(result, "not empty")
    result = run_cli("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--mode", "supervised",
                     "--out", tmp_path / "busy", "--epochs", 1, "--resume")
    assert_user_error(result, "holds no run")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--mode", "teleport"], "--mode must be one of"),
        (["--mode", "cached"], "--mode cached needs --cache"),
        (["--mode", "online"], "--mode online needs --teacher"),
        (["--mode", "supervised", "--scale", "0.5"], "--scale takes 2"),
        (["--mode", "supervised", "--temperature", "0"], "temperature must be positive"),
        (["--mode", "supervised", "--optimizer", "lion"], "--optimizer must be one of"),
        (["--mode", "online", "--teacher", "kdpipe:cnn", "--cache", "x.zarr"], "--cache is used only with --mode cached"),
        (["--mode", "supervised", "--teacher", "kdpipe:cnn"], "--teacher is not used in supervised mode"),
        (["--weights", "teacher.pt"], "add --teacher MODEL"),
    ],
)
def test_bad_options(tmp_path, image_folder, options, message):
    result = run_cli("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--out", tmp_path / "r", *options)
    assert_user_error(result, message)


def test_unlabelled_data_needs_a_class_count_and_cannot_train_supervised(tmp_path):
    pool = write_image_folder(tmp_path / "pool", labelled=False)
    assert_user_error(cache(pool, tmp_path / "a.zarr"), "--num-classes")
    result = run_cli("train-student", "--data", pool, "--student", "kdpipe:mlp", "--mode", "supervised",
                     "--out", tmp_path / "r")
    assert_user_error(result, "needs labelled data")


@pytest.mark.slow
def test_errors_are_one_line_from_the_real_console_script(tmp_path):
    """The same promise in a real process: exit status 2, one stderr line, no traceback."""
    result = subprocess.run(KDPIPE + ["cache-teacher", "--data", str(tmp_path / "nowhere"), "--teacher", "kdpipe:cnn",
                                      "--out", str(tmp_path / "a.zarr")],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: data folder {tmp_path / 'nowhere'} does not exist"]
    assert result.stdout == ""


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in ("cache-teacher", "train-student", "quickstart"):
        assert command in result.stdout


def test_quickstart_never_replaces_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2,3")
    assert_user_error(run_cli("quickstart", "--out", tmp_path / "mine"), "not a quickstart folder")
    assert (tmp_path / "mine" / "data.csv").read_text() == "1,2,3"


def test_mode_follows_from_the_options(tmp_path, image_folder):
    base = ("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--epochs", 1, "--size", 16, "--workers", 0)
    assert cli_json(*base, "--out", tmp_path / "s")["mode"] == "supervised"
    assert cli_json(*base, "--teacher", "kdpipe:cnn", "--out", tmp_path / "o")["mode"] == "online"
