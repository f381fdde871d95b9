"""Detection distillation end to end: COCO data, box-aware views replayed with their
targets, a detector teacher's neck features cached per view, MTPD students (one teacher,
progressive), mAP, and the one-line errors of mixing up detection and classification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.coco import write_digit_scenes
from pipeline.config import MAIN_TEACHER, CacheSpec, ModelSpec, TrainSpec, ViewRecipe
from pipeline.data import RangeBatches, ViewDataset, open_source
from pipeline.detection import NECK, detection_recipe, train_detector
from pipeline.detectors import build_detector
from pipeline.distributed import Ranks
from pipeline.replay import ViewBatches
from tests.conftest import assert_user_error, run_cli, train_until

SIZE = 64


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, str]:
    """16 training and 8 validation digit scenes, as coco: data specs; a det-tiny teacher's weights."""
    root = tmp_path_factory.mktemp("scenes")
    files = write_digit_scenes(root, 16, 8, size=(48, 72))
    teacher = root / "teacher.pt"
    torch.save(build_detector(ModelSpec("kdpipe:det-tiny"), 11, SIZE, seed=5).net.state_dict(), teacher)
    return {"train": f"coco:{files['train']}", "val": f"coco:{files['val']}", "teacher": str(teacher),
            "root": str(root)}


def recipe(epochs: int = 2, views: int = 1) -> ViewRecipe:
    return detection_recipe({"size": SIZE, "views_per_sample": views}, epochs)


def cache(scenes: dict, out: Path, codec: str = "fp32", name: str = MAIN_TEACHER, epochs: int = 2,
          backend: str = "zarr") -> dict:
    from pipeline.cache import cache_teacher

    teacher = ModelSpec("kdpipe:det-tiny", weights=scenes["teacher"])
    return cache_teacher(CacheSpec(data=scenes["train"], teacher=teacher, out=str(out), recipe=recipe(epochs),
                                   batch_size=4, workers=0, teacher_name=name, features=(f"{NECK}={codec}",),
                                   format=backend))


def train(scenes: dict, out: Path, mode: str, epochs: int = 2, **options) -> dict:
    spec = TrainSpec(data=scenes["train"], student=ModelSpec("kdpipe:det-tiny"), out=str(out), mode=mode,
                     val=scenes["val"], epochs=epochs, batch_size=4, workers=0, lr=3e-3, **options)
    return train_detector(spec, {"size": SIZE} if mode != "cached" else {})


def cli_document(*args) -> dict:
    """Run a command that must succeed and prints one JSON document (--json)."""
    result = run_cli(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_detector_student_from_a_float32_cache_equals_the_online_one_bit_for_bit(scenes, tmp_path):
    """MTPD from the cache is MTPD online: the same views, targets and teacher maps give the
    same student, adapters and logged terms, to the bit."""
    cached_archive = cache(scenes, tmp_path / "arch")
    assert cached_archive["computed_views"] == 32
    teacher = ModelSpec("kdpipe:det-tiny", weights=scenes["teacher"])
    online = train(scenes, tmp_path / "online", "online", teacher=teacher)
    cached = train(scenes, tmp_path / "cached", "cached", cache=str(tmp_path / "arch"))
    alone = train(scenes, tmp_path / "alone", "supervised")
    weights = {name: torch.load(tmp_path / name / "student.pt", weights_only=True)["model"]
               for name in ("online", "cached", "alone")}
    assert all(torch.equal(weights["online"][key], weights["cached"][key]) for key in weights["online"])
    assert not all(torch.equal(weights["online"][key], weights["alone"][key]) for key in weights["online"])
    checkpoints = {name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["adapters"]
                   for name in ("online", "cached")}
    assert set(checkpoints["cached"]) == {f"{MAIN_TEACHER}.{level}.{part}" for level in "012" for part in ("weight", "bias")}
    assert all(torch.equal(checkpoints["online"][key.replace(MAIN_TEACHER, "online", 1)], value)
               for key, value in checkpoints["cached"].items())
    logged = {name: metrics(tmp_path / name) for name in ("online", "cached")}
    for online_epoch, cached_epoch in zip(logged["online"], logged["cached"]):
        assert online_epoch["neck"] > 0
        for key in ("loss", "neck", "classification", "bbox_regression", "val_map", "val_map50"):
            assert online_epoch[key] == cached_epoch[key], key
    assert "neck" not in metrics(tmp_path / "alone")[0]
    assert cached["val_map"] == online["val_map"] and {"val_map", "val_map50", "val_map75"} <= set(alone)


def test_progressive_distillation_takes_the_teachers_in_turn(scenes, tmp_path):
    """--schedule: the assistant teaches the first epoch and the main teacher the next two,
    each through adapters of its own; order-teachers proposes an order on neck features."""
    archive = tmp_path / "arch"
    cache(scenes, archive, codec="fp16", epochs=3)
    cache(scenes, archive, codec="pool:2+int8", name="assistant.v1", epochs=3)  # a "." in a name is allowed
    run = tmp_path / "progressive"
    train(scenes, run, "cached", epochs=3, cache=str(archive), teachers=("assistant.v1", MAIN_TEACHER),
          schedule=(("assistant.v1", 1), (MAIN_TEACHER, 2)))
    assert [epoch["teacher"] for epoch in metrics(run)] == ["assistant.v1", MAIN_TEACHER, MAIN_TEACHER]
    adapters = torch.load(run / "checkpoint.pt", weights_only=False)["adapters"]
    assert {key.split(".")[0] for key in adapters} == {"assistant:v1", MAIN_TEACHER}
    report = cli_document("order-teachers", "--data", scenes["train"], "--cache", archive, "--student",
                          "kdpipe:det-tiny", "--samples", 16, "--json")
    assert report["order"][-1] == MAIN_TEACHER and set(report["table"]) >= {"student", "assistant.v1", MAIN_TEACHER}


def test_detection_batches_do_not_depend_on_workers_batch_size_or_ranks(scenes):
    """A view's pixels and the boxes it shows are the same whatever loads it: one process
    or two workers, batches of 3 or 5, one rank or two."""
    source = open_source(scenes["train"])
    views = ViewDataset(source, recipe(epochs=1, views=2))

    def items(batch_size: int, workers: int = 0, world: int = 1) -> dict[int, tuple]:
        found = {}
        for rank in range(world):
            loader = DataLoader(ViewBatches(views), batch_size=None, num_workers=workers,
                                sampler=RangeBatches([(0, 0, len(source))], len(source), batch_size, Ranks(rank, world)))
            for batch in loader:
                for k, index in enumerate(batch["index"].tolist()):
                    found[index] = (batch["views"][k], batch["targets"][2 * k: 2 * k + 2])
        return found

    reference = items(3)
    assert sorted(reference) == list(range(len(source)))
    assert sum(len(target["boxes"]) for _, targets in reference.values() for target in targets) > 0
    for other in (items(5), items(4, workers=2), items(4, world=2)):
        for index, (pixels, targets) in reference.items():
            assert torch.equal(pixels, other[index][0])
            for mine, theirs in zip(targets, other[index][1]):
                assert torch.equal(mine["boxes"], theirs["boxes"]) and torch.equal(mine["labels"], theirs["labels"])


def test_a_view_shows_the_boxes_its_parameters_say(scenes):
    """The targets of a batch are the sample's annotations moved into each view by its
    recorded parameters: inside the view, labels from the categories, crowd boxes left out."""
    source = open_source(scenes["train"])
    batch = ViewBatches(ViewDataset(source, recipe(epochs=1)))[list(range(8))]
    for k, target in enumerate(batch["targets"]):
        boxes = target["boxes"].numpy()
        assert boxes.dtype == np.float32 and ((boxes >= 0) & (boxes <= SIZE)).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        truth = source.targets(int(batch["index"][k]))
        assert set(target["labels"].tolist()) <= set(truth["labels"].tolist())


def test_eval_scores_a_detector_student_with_coco_map(scenes, tmp_path):
    run = tmp_path / "run"
    summary = train(scenes, run, "supervised", epochs=1)
    report = cli_document("eval", "--model", run, "--data", scenes["val"], "--json")
    assert report["map"] == pytest.approx(summary["val_map"]) and report["images"] == 8
    assert_user_error(run_cli("eval", "--model", run, "--data", scenes["root"]), "holds a detector")
    for command in (("predict", run, "--data", scenes["root"]), ("export", run, "--out", tmp_path / "d.pt")):
        assert_user_error(run_cli(*command), "holds a detector")


def test_a_resumed_detection_run_ends_as_an_uninterrupted_one(scenes, tmp_path, monkeypatch):
    """Killed after its first epoch and resumed, a cached MTPD run ends with the weights and
    adapters of the run that was never stopped."""
    archive = tmp_path / "arch"
    cache(scenes, archive)
    train(scenes, tmp_path / "whole", "cached", cache=str(archive))
    args = ("--data", scenes["train"], "--val", scenes["val"], "--student", "kdpipe:det-tiny",
            "--cache", archive, "--epochs", 2, "--batch-size", 4, "--workers", 0, "--lr", 3e-3,
            "--out", tmp_path / "resumed")
    train_until(monkeypatch, 1, *args)
    assert run_cli("train-student", *args, "--resume").exit_code == 0
    for name, key in (("student.pt", "model"), ("checkpoint.pt", "adapters")):
        whole, resumed = (torch.load(tmp_path / run / name, weights_only=False)[key] for run in ("whole", "resumed"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert metrics(tmp_path / "whole") == [{**m, "seconds": w["seconds"], "views_per_sec": w["views_per_sec"]}
                                           for m, w in zip(metrics(tmp_path / "resumed"), metrics(tmp_path / "whole"))]


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_a_detection_archive_verifies_and_inspects(scenes, tmp_path, backend):
    cache(scenes, tmp_path / "arch", codec="fp16", epochs=1, backend=backend)
    report = cli_document("verify", tmp_path / "arch", "--recompute", 3, "--json")
    assert report["problems"] == [] and report["recomputed"]["compared"] == "neck features"
    assert set(report["recomputed"]["features_max_rel_error"]) == {f"{NECK}.{level}" for level in "012"}
    inspected = cli_document("inspect", tmp_path / "arch", "--json")
    assert inspected["codec"] == {"name": "none"} and len(inspected["features"]) == 3


def write_coco(root: Path, change) -> str:
    """A valid one-image COCO file, changed by `change(data)`; the spec naming it."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 40}],
            "categories": [{"id": 3, "name": "dog"}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0}]}
    change(data)
    (root / "ann.json").write_text(json.dumps(data))
    return f"coco:{root / 'ann.json'}"


@pytest.mark.parametrize("change, fragments", [
    (lambda d: d["images"][0].update(file_name="gone.jpg"), ("gone.jpg", "id 1")),
    (lambda d: d["annotations"][0].update(bbox=[45, 5, 10, 10]), ("annotation 9", "outside")),
    (lambda d: d["annotations"][0].update(bbox=[5, 5, -3, 10]), ("annotation 9",)),
    (lambda d: d["annotations"][0].update(category_id=4), ("annotation 9", "category")),
], ids=["missing-image", "box-outside", "negative-size", "unknown-category"])
def test_bad_annotations_are_one_line_errors(tmp_path, change, fragments):
    data = write_coco(tmp_path / "bad", change)
    for command in (("train-student", "--data", data, "--student", "kdpipe:det-tiny", "--out", tmp_path / "run"),
                    ("cache-teacher", "--data", data, "--teacher", "kdpipe:det-tiny", "--out", tmp_path / "arch")):
        assert_user_error(run_cli(*command), *fragments)
    assert not (tmp_path / "run").exists() and not (tmp_path / "arch").exists()


def test_classifiers_and_detectors_are_not_mixed_up(scenes, image_folder, tmp_path):
    """A classifier where a detector is needed, a detector where a classifier is, and an
    archive of a detector's neck given to a classifier student: one line each, exit 2."""
    assert_user_error(run_cli("cache-teacher", "--data", scenes["train"], "--teacher", "kdpipe:cnn",
                              "--out", tmp_path / "a"), "kdpipe:cnn is a classifier")
    assert_user_error(run_cli("train-student", "--data", scenes["train"], "--student", "torchvision:resnet18",
                              "--out", tmp_path / "b"), "is a classifier")
    assert_user_error(run_cli("train-student", "--data", image_folder, "--student", "kdpipe:det-tiny",
                              "--out", tmp_path / "c"), "is a detector")
    assert_user_error(run_cli("cache-teacher", "--data", image_folder, "--teacher", "kdpipe:det-small",
                              "--out", tmp_path / "d"), "is a detector")
    cache(scenes, tmp_path / "arch", epochs=1)
    assert_user_error(run_cli("train-student", "--data", image_folder, "--student", "kdpipe:cnn", "--cache",
                              tmp_path / "arch", "--out", tmp_path / "e"), "neck features")
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_the_detection_quickstart_runs_end_to_end(tmp_path, monkeypatch):
    """`kdpipe quickstart --task detection` as README gives it, on fewer and smaller images
    and fewer epochs (the real one takes minutes): every row of its table, and the cached
    student equal to the online one."""
    from pipeline import quickstart

    monkeypatch.setattr(quickstart, "DETECTION_IMAGES", {"train": 16, "val": 8})
    monkeypatch.setattr(quickstart, "DETECTION_RECIPE", {"size": SIZE})
    monkeypatch.setattr(quickstart, "DETECTION_EPOCHS", {"teacher": 2, "assistant": 1, "student": 2})
    result = run_cli("quickstart", "--task", "detection", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["cached"]["val_map"] == summary["online"]["val_map"]
    for row in quickstart.DETECTION_ROWS:
        assert row in result.stdout and summary[row]["val_map"] is not None
    assert summary["cache"]["teacher"]["views"] == 32


def test_options_of_the_other_task_are_refused_in_one_line(scenes, image_folder, tmp_path):
    """An option that one task would silently ignore is refused, naming it: nothing runs
    on settings the user believes are in force."""
    detector = ("train-student", "--data", scenes["train"], "--student", "kdpipe:det-tiny", "--out", tmp_path / "a")
    for extra, named in ((("--alpha", 0.5), "--alpha"), (("--ema", 0.9), "--ema"), (("--ratio", "1,1"), "--ratio"),
                         (("--precise-bn", 0), "--precise-bn"), (("--feature", "hint:neck"), "--feature")):
        assert_user_error(run_cli(*detector, *extra), named)
    assert_user_error(run_cli("cache-teacher", "--data", scenes["train"], "--teacher", "kdpipe:det-tiny",
                              "--codec", "topk:5", "--out", tmp_path / "b"), "--codec")
    classifier = ("train-student", "--data", image_folder, "--student", "kdpipe:cnn", "--out", tmp_path / "c")
    assert_user_error(run_cli(*classifier, "--neck-weight", 0.5), "--neck-weight")
    assert_user_error(run_cli(*classifier, "--val", scenes["val"]), "--val", "detection data")
    assert_user_error(run_cli("eval", "--model", "kdpipe:det-tiny", "--data", scenes["val"], "--crop-pct", 0.9),
                      "--crop-pct")
    assert_user_error(run_cli("eval", "--model", "kdpipe:det-small", "--data", image_folder, "--num-classes", 3),
                      "det-small")
    assert_user_error(run_cli("eval", "--model", "torchvision:fcos_resnet50_fpn", "--data", image_folder),
                      "is a detector")
    cache(scenes, tmp_path / "arch", epochs=1)
    cache(scenes, tmp_path / "arch", epochs=1, name="second")
    assert_user_error(run_cli("order-teachers", "--data", image_folder, "--cache", tmp_path / "arch", "--student",
                              "kdpipe:det-tiny"), "dataset")
    assert not any((tmp_path / name).exists() for name in "abc")
