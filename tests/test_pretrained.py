"""Real teachers: timm and torchvision models with their published weights, read from
the libraries' own caches (filled here with real files, never downloaded), their own
preprocessing recorded in the archive and in the teacher's fingerprint, classifier
heads re-initialised for another class count, and models whose forward pass returns
something other than logits refused in one line."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import timm.data
import torch
import torchvision

from pipeline.config import ModelSpec, Preprocessing
from pipeline.models import build_model, model_fingerprint, output_classes
from pipeline.store.manifest import json_bytes, seal

from .conftest import (TIMM_NAME, TIMM_TAG, assert_user_error, cli_json, offline_env, put_timm_weights, run_cli,
                       run_kdpipe, write_image_folder)

DATA = "synthetic:12:3:32"
TORCHVISION_NAME = "squeezenet1_1"
TORCHVISION_WEIGHTS = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1


def put_torchvision_weights(env: dict) -> dict[str, torch.Tensor]:
    """A 1000-class squeezenet1_1's weights where torchvision keeps IMAGENET1K_V1:
    $TORCH_HOME/hub/checkpoints/<the file name of the weights' URL>."""
    torch.manual_seed(2)
    state = torchvision.models.squeezenet1_1().state_dict()
    folder = Path(env["TORCH_HOME"]) / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / os.path.basename(TORCHVISION_WEIGHTS.url))
    return state


def manifest_of(archive: Path) -> dict:
    return json.loads((archive / "manifest.json").read_text())


def test_timm_and_torchvision_teachers_with_published_weights_record_their_own_preprocessing(tmp_path):
    env = offline_env(tmp_path)
    put_timm_weights(env)
    put_torchvision_weights(env)
    own_timm = timm.data.resolve_data_config(model=timm.create_model(f"{TIMM_NAME}.{TIMM_TAG}"))
    own_torchvision = TORCHVISION_WEIGHTS.transforms()
    expected = {
        "timm": {"mean": list(own_timm["mean"]), "std": list(own_timm["std"]), "interpolation": own_timm["interpolation"],
                 "crop_pct": own_timm["crop_pct"], "input_size": own_timm["input_size"][-1]},
        "torchvision": {"mean": own_torchvision.mean, "std": own_torchvision.std, "interpolation": "bilinear",
                        "crop_pct": own_torchvision.crop_size[0] / own_torchvision.resize_size[0],
                        "input_size": own_torchvision.crop_size[0]},
    }
    # unlabelled images, taught the teachers' own 1000 classes; timm with its views at the
    # model's own input size (the --size default), torchvision at 32 px
    pool = write_image_folder(tmp_path / "pool", per_class=4, labelled=False)
    for source, teacher, pretrained, size in [
        ("timm", f"timm:{TIMM_NAME}", TIMM_TAG, []),
        ("torchvision", f"torchvision:{TORCHVISION_NAME}", "DEFAULT", ["--size", "32"]),
    ]:
        archive = tmp_path / f"{source}.zarr"
        cached = run_kdpipe("cache-teacher", "--data", pool, "--teacher", teacher, "--pretrained", pretrained, *size,
                            "--num-classes", "1000", "--out", archive, "--workers", "0", env=env)
        assert cached.exit_code == 0, cached.stderr
        manifest = manifest_of(archive)
        assert manifest["teacher"]["preprocessing"] == expected[source]
        assert manifest["recipe"]["size"] == (expected[source]["input_size"] if not size else 32)
        trained = run_kdpipe("train-student", "--data", pool, "--cache", archive, "--student", "kdpipe:mlp",
                             "--workers", "0", "--out", tmp_path / f"{source}-run", env=env)
        assert trained.exit_code == 0, trained.stderr
        # a teacher of logits keeps its head: 3 class folders would re-initialise it, which is refused
        refused = run_kdpipe("cache-teacher", "--data", DATA, "--teacher", teacher, "--pretrained", pretrained, *size,
                             "--out", tmp_path / f"{source}-3.zarr", "--workers", "0", env=env)
        assert_user_error(refused, "1000 classes in its weights but 3 are asked for", "fine-tune it first")
    assert expected["timm"]["input_size"] == 160 and expected["torchvision"]["crop_pct"] == 0.875


def test_weights_missing_from_the_cache_offline_name_the_file_and_where_it_goes(tmp_path):
    env = offline_env(tmp_path)
    timm_missing = run_kdpipe("cache-teacher", "--data", DATA, "--teacher", f"timm:{TIMM_NAME}", "--pretrained",
                              "default", "--out", tmp_path / "a", "--workers", "0", env=env)
    assert_user_error(timm_missing, f"timm/{TIMM_NAME}.{TIMM_TAG}", "model.safetensors", env["HF_HUB_CACHE"])
    torchvision_missing = run_kdpipe("cache-teacher", "--data", DATA, "--teacher", f"torchvision:{TORCHVISION_NAME}",
                                     "--pretrained", "IMAGENET1K_V1", "--out", tmp_path / "b", "--workers", "0", env=env)
    folder = Path(env["TORCH_HOME"]) / "hub" / "checkpoints"
    assert_user_error(torchvision_missing, os.path.basename(TORCHVISION_WEIGHTS.url), str(folder))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # without HF_HUB_OFFLINE and without a network: the same one line, at once, not a minute of retries
    started = time.monotonic()
    unreachable = run_kdpipe("cache-teacher", "--data", DATA, "--teacher", f"timm:{TIMM_NAME}", "--pretrained",
                             "default", "--out", tmp_path / "c", "--workers", "0",
                             env={k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"})
    assert_user_error(unreachable, f"timm/{TIMM_NAME}.{TIMM_TAG}", "model.safetensors", env["HF_HUB_CACHE"])
    assert time.monotonic() - started < 15


def test_damaged_weights_in_the_cache_are_one_line_naming_the_file(tmp_path):
    env = offline_env(tmp_path)
    folder = Path(env["TORCH_HOME"]) / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / os.path.basename(TORCHVISION_WEIGHTS.url)).write_bytes(b"not a checkpoint")
    damaged = run_kdpipe("cache-teacher", "--data", DATA, "--teacher", f"torchvision:{TORCHVISION_NAME}",
                         "--pretrained", "IMAGENET1K_V1", "--out", tmp_path / "a", "--workers", "0", env=env)
    assert_user_error(damaged, "cannot read the weights", os.path.basename(TORCHVISION_WEIGHTS.url), "delete")
    put_timm_weights(env)
    snapshot = next((Path(env["HF_HUB_CACHE"]) / f"models--timm--{TIMM_NAME}.{TIMM_TAG}" / "snapshots").iterdir())
    (snapshot / "model.safetensors").write_bytes(b"not safetensors")
    damaged = run_kdpipe("cache-teacher", "--data", DATA, "--teacher", f"timm:{TIMM_NAME}", "--pretrained",
                         "default", "--out", tmp_path / "b", "--workers", "0", env=env)
    assert_user_error(damaged, f"timm:{TIMM_NAME}", "Hugging Face cache", "delete")


@pytest.mark.parametrize("teacher, pretrained, fragments", [
    (f"timm:{TIMM_NAME}", "no_such_tag", ["no pretrained weights 'no_such_tag'", TIMM_TAG]),
    (f"timm:{TIMM_NAME}.{TIMM_TAG}", "other_tag", ["give the tag once"]),
    ("timm:no_such_net", "default", ["unknown timm model 'no_such_net'"]),
    (f"torchvision:{TORCHVISION_NAME}", "IMAGENET9K_V9", ["no weights 'IMAGENET9K_V9'", "IMAGENET1K_V1, DEFAULT"]),
    ("kdpipe:cnn", "default", ["kdpipe:cnn has no published weights"]),
])
def test_pretrained_weights_that_do_not_exist_are_refused_listing_valid_ones(tmp_path, teacher, pretrained, fragments):
    result = run_cli("cache-teacher", "--data", DATA, "--teacher", teacher, "--pretrained", pretrained,
                     "--out", tmp_path / "a", "--workers", "0")
    assert_user_error(result, *fragments)


def test_a_head_of_another_class_count_is_re_initialised_and_only_the_head(tmp_path, capsys):
    torch.manual_seed(3)
    source = timm.create_model(TIMM_NAME).state_dict()  # 1000 classes
    files = {"plain.pt": source, "timm-ema.pth": {"state_dict": {}, "state_dict_ema": source},
             "model.safetensors": source}
    for name, content in files.items():
        if name.endswith(".safetensors"):
            safetensors.torch.save_file(content, tmp_path / name)
        else:
            torch.save(content, tmp_path / name)
    for name in files:
        model = build_model(ModelSpec(f"timm:{TIMM_NAME}", 3, weights=str(tmp_path / name)), seed=5)
        said = capsys.readouterr().err
        assert "re-initialised fc.weight, fc.bias (the weights have 1000 classes, the model 3)" in said
        loaded = model.net.state_dict()
        assert all(torch.equal(loaded[key], tensor) for key, tensor in source.items() if not key.startswith("fc.")), name
        assert loaded["fc.weight"].shape == (3, source["fc.weight"].shape[1])
    again = build_model(ModelSpec(f"timm:{TIMM_NAME}", 3, weights=str(tmp_path / "plain.pt")), seed=5)
    assert torch.equal(again.net.fc.weight, model.net.fc.weight)  # the fresh head is seeded

    damaged = dict(source) | {"conv1.0.weight": torch.zeros(1, 1, 1, 1)}
    torch.save(damaged, tmp_path / "damaged.pt")
    result = run_cli("cache-teacher", "--data", DATA, "--teacher", f"timm:{TIMM_NAME}", "--weights",
                     tmp_path / "damaged.pt", "--size", "32", "--out", tmp_path / "a", "--workers", "0")
    assert_user_error(result, "do not fit the model", "conv1.0.weight")


BAD_OUTPUTS = [("dict_output", "returns dict (keys: logits)"), ("tuple_output", "returns tuple of 2"),
               ("list_output", "returns list of 1"), ("map_output", "returns a tensor of shape (1, 3, 4, 4)")]


@pytest.mark.parametrize("factory, fragment", BAD_OUTPUTS)
def test_a_teacher_that_returns_anything_but_logits_is_refused_in_one_line(tmp_path, factory, fragment):
    result = run_cli("cache-teacher", "--data", DATA, "--teacher", f"tests.toy_models:{factory}",
                     "--out", tmp_path / "a", "--workers", "0")
    assert_user_error(result, f"the teacher {fragment}", "package.module:factory")


@pytest.mark.parametrize("factory, fragment", BAD_OUTPUTS + [
    ("aux_in_training", "returns AuxOutputs (fields: logits, aux_logits) in training mode"),
])
def test_a_student_that_returns_anything_but_logits_is_refused_in_one_line(tmp_path, factory, fragment):
    result = run_cli("train-student", "--data", DATA, "--student", f"tests.toy_models:{factory}",
                     "--mode", "supervised", "--epochs", "1", "--out", tmp_path / "run", "--workers", "0")
    assert_user_error(result, f"the student {fragment}", "aux_logits=False")


def test_the_students_training_mode_check_leaves_its_statistics_and_torchs_generator_alone():
    student = build_model(ModelSpec("kdpipe:cnn", 3))  # batch norm: a training-mode pass would update its statistics
    before, generator = copy.deepcopy(student.state_dict()), torch.random.get_rng_state()
    assert output_classes(student, 16, "student") == 3
    assert all(torch.equal(before[key], tensor) for key, tensor in student.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), generator) and student.training


def test_a_mean_that_contradicts_the_models_own_is_warned_about(tmp_path):
    result = run_cli("cache-teacher", "--data", DATA, "--teacher", f"timm:{TIMM_NAME}", "--mean", "0.1,0.2,0.3",
                     "--size", "32", "--out", tmp_path / "a", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert (f"warning: timm:{TIMM_NAME} was made for mean 0.5,0.5,0.5 and std 0.5,0.5,0.5, but it is given "
            "mean 0.1,0.2,0.3") in result.stderr
    assert manifest_of(tmp_path / "a")["teacher"]["preprocessing"]["mean"] == [0.1, 0.2, 0.3]
    plain = run_cli("cache-teacher", "--data", DATA, "--teacher", "kdpipe:cnn", "--mean", "0.1,0.2,0.3",
                    "--out", tmp_path / "b", "--workers", "0")  # kdpipe's own nets record no preprocessing
    assert plain.exit_code == 0 and "warning" not in plain.stderr


def test_a_factory_can_give_its_preprocessing_and_inspect_shows_it(tmp_path):
    cli_json("cache-teacher", "--data", DATA, "--teacher", "tests.toy_models:with_pretrained_cfg",
             "--out", tmp_path / "a", "--workers", "0")
    recorded = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic", "crop_pct": 0.9,
                "input_size": 24}
    assert manifest_of(tmp_path / "a")["recipe"]["size"] == 24
    report = json.loads(run_cli("inspect", tmp_path / "a", "--json", "--no-stats").stdout)
    assert report["teacher"]["preprocessing"] == recorded
    text = run_cli("inspect", tmp_path / "a", "--no-stats").stdout
    assert "  preprocessing:\n    mean: [0.5, 0.5, 0.5]\n    std: [0.25, 0.25, 0.25]\n    interpolation: bicubic" in text


def test_the_teacher_fingerprint_covers_the_preprocessing(tmp_path):
    archive = tmp_path / "a"
    cli_json("cache-teacher", "--data", DATA, "--teacher", "kdpipe:cnn", "--out", archive, "--workers", "0")
    manifest = manifest_of(archive)
    model = build_model(ModelSpec("kdpipe:cnn", 3))
    recorded = Preprocessing.from_dict(manifest["teacher"]["preprocessing"])
    assert manifest["teacher"]["fingerprint"] == model_fingerprint(model, recorded) != model_fingerprint(model)
    assert model_fingerprint(model, recorded) != model_fingerprint(model, Preprocessing.from_dict(
        manifest["teacher"]["preprocessing"] | {"crop_pct": 0.875}))


def older_archive(tmp_path: Path) -> Path:
    """A kdpipe:cnn archive as kdpipe wrote it before it recorded preprocessing: no
    teacher.preprocessing, explicit mean/std in the spec, a state-dict-only fingerprint."""
    archive = tmp_path / "older"
    cli_json("cache-teacher", "--data", DATA, "--teacher", "kdpipe:cnn", "--out", archive, "--workers", "0")
    older = manifest_of(archive)
    del older["teacher"]["preprocessing"], older["teacher"]["spec"]["pretrained"]
    older["teacher"]["spec"] |= {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    older["teacher"]["fingerprint"] = model_fingerprint(build_model(ModelSpec("kdpipe:cnn", 3)))
    (archive / "manifest.json").write_bytes(json_bytes(seal(older)))
    return archive


def test_an_older_archive_without_preprocessing_is_read_and_verified_with_its_teacher(tmp_path):
    archive = older_archive(tmp_path)
    assert "preprocessing" not in json.loads(run_cli("inspect", archive, "--json", "--no-stats").stdout)["teacher"]
    verified = run_cli("verify", archive, "--teacher", "kdpipe:cnn", "--data", DATA, "--recompute", "2", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["recomputed"]["samples"] == 2


def test_an_older_archive_without_preprocessing_trains_with_its_teacher_named(tmp_path):
    archive = older_archive(tmp_path)
    cli_json("train-student", "--data", DATA, "--cache", archive, "--teacher", "kdpipe:cnn", "--student", "kdpipe:mlp",
             "--epochs", "1", "--workers", "0", "--out", tmp_path / "run")
    other = run_cli("train-student", "--data", DATA, "--cache", archive, "--teacher", "kdpipe:cnn", "--teacher-mean",
                    "0.5,0.5,0.5", "--student", "kdpipe:mlp", "--workers", "0", "--out", tmp_path / "run2")
    assert_user_error(other, "teacher.fingerprint")


def test_verify_takes_a_weights_file_for_an_archive_cached_with_published_weights(tmp_path):
    """The manifest names published weights; --weights gives them as a file instead (e.g.
    on a machine without the hub cache), and the fingerprint check still holds."""
    env = offline_env(tmp_path)
    state = put_torchvision_weights(env)
    pool = write_image_folder(tmp_path / "pool", per_class=2, labelled=False)
    cached = run_kdpipe("cache-teacher", "--data", pool, "--teacher", f"torchvision:{TORCHVISION_NAME}", "--pretrained",
                        "IMAGENET1K_V1", "--num-classes", "1000", "--size", "32", "--out", tmp_path / "a",
                        "--workers", "0", env=env)
    assert cached.exit_code == 0, cached.stderr
    torch.save(state, tmp_path / "file.pt")
    verified = run_kdpipe("verify", tmp_path / "a", "--recompute", "2", "--weights", tmp_path / "file.pt", env=env)
    assert verified.exit_code == 0, verified.output
