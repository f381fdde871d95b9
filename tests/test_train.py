"""train-student: offline equals online, the same pixels in both stages, its run directory, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline import models, train
from pipeline.config import ModelSpec
from pipeline.models import Teacher, build_model, small_cnn
from pipeline.store import ArchiveReader

from . import toy_models
from .conftest import assert_user_error, cli_json, run_cli, weights, write_image_folder

DATA = "synthetic:24:4:20"


def _cache(out, *extra, data=DATA):
    return cli_json(
        "cache-teacher", "--data", data, "--teacher", "tests.toy_models:tiny_cnn", "--out", out, "--epochs", 3,
        "--views-per-sample", 2, "--size", 16, "--color-jitter", 0.2, "--batch-size", 6, "--shard-size", 12,
        "--workers", 0, *extra,
    )


def _train(out, *extra, data=DATA):
    return cli_json("train-student", "--data", data, "--student", "kdpipe:mlp", "--out", out, "--batch-size", 6,
                    "--epochs", 3, "--workers", 0, *extra)


# the training recipe's options, all on: they must keep offline == online
RECIPE = ("--ema", 0.9, "--accumulate", 2, "--warmup-epochs", 1, "--alpha", 0.5, "--label-smoothing", 0.1,
          "--clip-norm", 0.5, "--val", "synthetic:12:4:20")


@pytest.mark.parametrize("backend, recipe", [("zarr", RECIPE), ("webdataset", ())], ids=["zarr-recipe", "webdataset"])
def test_offline_equals_online_bit_for_bit(tmp_path, backend, recipe):
    """The central invariant: a student trained from a float32 cache ends with exactly the
    weights of a student trained with the teacher running live on the same views; with
    the recipe's options on, its EMA too, and the scores on --val, the agreement with
    the teacher included (cached mode builds the archive's teacher for it)."""
    _cache(tmp_path / "t.zarr", "--codec", "dense-fp32", "--format", backend)
    # the archive's teacher is built from seed 0; save exactly those weights for the online run
    teacher_weights = tmp_path / "teacher.pt"
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4)).net.state_dict(), teacher_weights)
    cached = _train(tmp_path / "cached", "--cache", tmp_path / "t.zarr", "--workers", 2, *recipe)
    online = _train(tmp_path / "online", "--mode", "online", "--teacher", "tests.toy_models:tiny_cnn",
                    "--weights", teacher_weights, "--views-per-sample", 2, "--size", 16, "--color-jitter", 0.2, *recipe)
    assert cached["mode"] == "cached" and online["mode"] == "online"
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "online")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if recipe:
        ema = [torch.load(tmp_path / run / "student_ema.pt", weights_only=True)["model"] for run in ("cached", "online")]
        assert all(torch.equal(ema[0][name], ema[1][name]) for name in a)
        assert not torch.equal(ema[0]["2.weight"], a["2.weight"])
        scores = ("val_top1", "val_top1_ema", "val_agreement", "val_kl")
        assert {key: cached[key] for key in scores} == {key: online[key] for key in scores}
        assert cached["val_agreement"] is not None and cached["val_kl"] > 0
    # and training moved the weights: the comparison is not between two untouched inits
    untouched = build_model(ModelSpec("kdpipe:mlp", num_classes=4)).net.state_dict()
    assert not torch.equal(a["2.weight"], untouched["2.weight"])
    lines = [json.loads(l) for l in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    online_lines = [json.loads(l) for l in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert [l["kd"] for l in lines] == [l["kd"] for l in online_lines]


def test_student_sees_the_pixels_the_teacher_saw(tmp_path):
    toy_models.SEEN.clear()
    cli_json("cache-teacher", "--data", DATA, "--teacher", "tests.toy_models:recording_teacher", "--out", tmp_path / "t.zarr",
             "--epochs", 2, "--views-per-sample", 3, "--size", 12, "--color-jitter", 0.3, "--batch-size", 5,
             "--interpolation", "bicubic", "--workers", 0)
    cli_json("train-student", "--data", DATA, "--student", "tests.toy_models:recording_student", "--out", tmp_path / "s",
             "--cache", tmp_path / "t.zarr", "--epochs", 2, "--batch-size", 7, "--workers", 2)
    teacher_seen, student_seen = toy_models.SEEN["teacher"], toy_models.SEEN["student"]
    assert len(teacher_seen) == 2 * 24 * 3
    assert student_seen == teacher_seen  # every view, in the same order
    assert len(set(teacher_seen)) == len(teacher_seen)  # and the views really differ


def test_run_dir_holds_weights_metrics_summary_and_config(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=10)
    val = write_image_folder(tmp_path / "val", per_class=4, seed=1)
    summary = cli_json("train-student", "--data", data, "--val", val, "--student", "kdpipe:cnn", "--mode", "supervised",
                       "--out", tmp_path / "run", "--epochs", 4, "--batch-size", 10, "--size", 16, "--lr", 0.01,
                       "--workers", 0)
    run = tmp_path / "run"
    own = {p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents.")}  # TensorBoard's: test_monitor
    assert own == {"student.pt", "student_best.pt", "checkpoint.pt", "metrics.jsonl", "summary.json", "config.json",
                   "options.yaml"}
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "supervised" and summary["epochs"] == 4 and summary["views_per_sec"] > 0
    assert summary["val_top1"] > 50  # three well-separated colour classes; chance is 33%
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert set(metrics[0]) == {"epoch", "loss", "ce", "val_top1", "val_top5", "seconds", "views_per_sec"}
    config = json.loads((run / "config.json").read_text())
    assert config["mode"] == "supervised" and config["recipe"]["size"] == 16 and config["student"]["num_classes"] == 3
    # kdpipe's own run checkpoint serves as weights, e.g. for a teacher
    from_checkpoint = build_model(ModelSpec("kdpipe:cnn", num_classes=3, weights=str(run / "checkpoint.pt")))
    student = torch.load(run / "student.pt", weights_only=True)
    final = student["model"]
    assert all(torch.equal(from_checkpoint.net.state_dict()[k], v) for k, v in final.items())
    # student.pt holds a plain state_dict that loads into the bare network, and what deploying it needs
    small_cnn(3).load_state_dict(final)
    assert student["classes"] == ["cat", "dog", "fox"] and student["outputs"] == "logits"
    assert student["spec"]["name"] == "kdpipe:cnn" and student["spec"]["num_classes"] == 3
    assert student["preprocessing"]["input_size"] == 16 and student["preprocessing"]["interpolation"] == "bilinear"
    assert_user_error(
        run_cli("train-student", "--data", data, "--student", "kdpipe:cnn", "--mode", "supervised", "--out", run,
                "--epochs", 1, "--workers", 0),
        "already holds a finished run",
    )


def test_kd_with_labels_and_sgd(tmp_path):
    data = write_image_folder(tmp_path / "data")
    _cache(tmp_path / "t.zarr", data=data)
    summary = _train(tmp_path / "run", "--cache", tmp_path / "t.zarr", "--alpha", 0.5, "--temperature", 2,
                     "--optimizer", "sgd", "--lr", 0.05, data=data)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"kd", "ce", "loss"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(0.5 * metrics["kd"] + 0.5 * metrics["ce"], rel=1e-5)
    assert summary["mode"] == "cached"


def test_mismatched_dataset_recipe_or_teacher_is_refused(tmp_path):
    """An archive is refused, by the field that differs, for other data, another recipe
    or another teacher, and no student is trained; its own teacher passes the check."""
    _cache(tmp_path / "t.zarr")
    base = ("train-student", "--student", "kdpipe:mlp", "--cache", tmp_path / "t.zarr", "--epochs", 1, "--workers", 0)
    assert_user_error(run_cli(*base, "--data", "synthetic:25:4:20", "--out", tmp_path / "r1"), "dataset.fingerprint")
    assert_user_error(run_cli(*base, "--data", DATA, "--seed", 3, "--out", tmp_path / "r2"), "recipe.seed")
    assert_user_error(run_cli(*base, "--data", DATA, "--size", 20, "--out", tmp_path / "r3"), "recipe.size")
    other = tmp_path / "other.pt"
    torch.save(toy_models.tiny_cnn(4).state_dict(), other)  # not the seed-0 init the archive was made with
    assert_user_error(
        run_cli(*base, "--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", "--weights", other, "--out", tmp_path / "r4"),
        "teacher.fingerprint",
    )
    assert not any((tmp_path / f"r{i}" / "student.pt").exists() for i in range(1, 5))
    # the archive's own teacher passes the same check
    cli_json(*base, "--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "r5")


def test_more_epochs_than_cached_needs_cycle_epochs(tmp_path):
    _cache(tmp_path / "t.zarr")
    assert_user_error(
        run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "t.zarr",
                "--out", tmp_path / "r", "--epochs", 5, "--workers", 0),
        "holds 3 epochs", "--cycle-epochs",
    )
    summary = _train(tmp_path / "r2", "--cache", tmp_path / "t.zarr", "--epochs", 5, "--cycle-epochs")
    assert summary["epochs"] == 5


def test_the_gpu_path_bf16_autocast_and_channels_last_trains_and_caches(tmp_path, monkeypatch):
    """The GPU path's code (bf16 autocast, channels-last weights and views), run on the
    CPU: caching, cached training with DKD and online training with CutMix all work,
    and end close to the float32 path but not equal to it (so the path really ran)."""
    def gpu_path(patch):
        for module in (models, train):
            patch.setattr(module, "accelerated", lambda device: True)

    teacher = Teacher(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4), size=16)
    views = torch.rand(6, 3, 16, 16)
    with monkeypatch.context() as patch:
        gpu_path(patch)
        fast_teacher = Teacher(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4), size=16)
        fast_logits = fast_teacher(views)
    assert fast_teacher.model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert fast_logits.dtype == torch.float32
    plain_logits = teacher(views)
    assert not torch.equal(fast_logits, plain_logits)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0, atol=0.02 * float(plain_logits.abs().max()))

    def cache_and_train(root):
        _cache(root / "t.zarr")
        cached = _train(root / "cached", "--student", "kdpipe:cnn", "--cache", root / "t.zarr", "--loss", "dkd",
                        "--alpha", 0.5, "--epochs", 2)
        online = _train(root / "online", "--student", "kdpipe:cnn", "--mode", "online", "--teacher",
                        "tests.toy_models:tiny_cnn", "--size", 16, "--mixup", "cutmix", "--epochs", 2)
        last_losses = [json.loads((Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
                       for run in (cached, online)]
        return last_losses, torch.from_numpy(ArchiveReader(str(root / "t.zarr")).read(0, 0, 24)[0])

    plain_losses, plain_cache = cache_and_train(tmp_path / "fp32")
    with monkeypatch.context() as patch:
        gpu_path(patch)
        fast_losses, fast_cache = cache_and_train(tmp_path / "bf16")
    assert not torch.equal(fast_cache, plain_cache)
    torch.testing.assert_close(fast_cache, plain_cache, rtol=0, atol=0.02 * float(plain_cache.abs().max()))
    assert all(math.isfinite(loss) for loss in fast_losses)
    assert fast_losses == pytest.approx(plain_losses, rel=0.1)


def test_unlabelled_folder_serves_as_the_transfer_set(tmp_path):
    """Caching and KD training need no labels: a folder of images alone is the transfer set."""
    pool = write_image_folder(tmp_path / "pool", labelled=False)
    val = write_image_folder(tmp_path / "val", per_class=3, seed=2)
    _cache(tmp_path / "t.zarr", "--num-classes", 3, data=pool)
    manifest = json.loads((tmp_path / "t.zarr" / "manifest.json").read_text())
    assert manifest["dataset"]["labelled"] is False and manifest["dataset"]["classes"] is None
    summary = _train(tmp_path / "run", "--cache", tmp_path / "t.zarr", "--val", val, data=pool)
    assert summary["mode"] == "cached" and summary["val_top1"] is not None
    assert_user_error(
        run_cli("train-student", "--data", pool, "--student", "kdpipe:mlp", "--out", tmp_path / "run2",
                "--cache", tmp_path / "t.zarr", "--alpha", 0.5, "--epochs", 1, "--workers", 0),
        "needs labels",
    )


@pytest.mark.slow
def test_compile_changes_how_the_student_runs_not_what_it_learns(tmp_path):
    """--compile (torch.compile; inductor, here on the CPU) ends within float tolerance of
    the eager student, with the same state_dict names, so student.pt loads into a plain model."""
    _cache(tmp_path / "t.zarr")
    _train(tmp_path / "eager", "--cache", tmp_path / "t.zarr")
    _train(tmp_path / "compiled", "--cache", tmp_path / "t.zarr", "--compile")
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    plain = build_model(ModelSpec("kdpipe:mlp", num_classes=4)).net
    assert not torch.allclose(plain.state_dict()["2.weight"], b["2.weight"])  # training moved the weights
    plain.load_state_dict(b)
