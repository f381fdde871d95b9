"""A trained student as a user deploys it: `kdpipe export` (TorchScript, ONNX) gives the
student's own logits, `kdpipe predict` its own probabilities on a plain folder of images,
`kdpipe eval --model RUN_DIR` its run's own val_top1; a run from before student files
recorded the model still loads; bad input gets one line and exit 2."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipeline.deploy import load_student, read_student
from pipeline.sources import decode_image
from pipeline.views import eval_view

from .conftest import assert_user_error, cli_json, run_cli, write_image_folder

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished one-epoch run of a tiny CNN at 16 px with --val and --ema, and its val folder."""
    root = tmp_path_factory.mktemp("deploy")
    data = write_image_folder(root / "data", per_class=3)
    val = write_image_folder(root / "val", per_class=2, seed=1)
    cli_json("train-student", "--data", data, "--val", val, "--student", "kdpipe:cnn", "--mode", "supervised",
             "--epochs", 1, "--size", 16, "--batch-size", 3, "--ema", 0.5, "--out", root / "run", "--workers", 0)
    return root / "run", val


def student_logits(run: Path, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at `paths` through the student's evaluation view, and its logits on them,
    computed here from its file."""
    model, student = load_student(run)
    view = student.preprocessing
    images = torch.stack([eval_view(decode_image(path.read_bytes(), str(path)), view.input_size, view.crop_pct,
                                    view.interpolation) for path in paths])
    with torch.no_grad():
        return images, model(images)


def images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # the user's loader
def test_exported_model_gives_the_students_logits_and_describes_itself(export_format, trained, tmp_path):
    run, val = trained
    out = tmp_path / f"student.{export_format}"
    report = cli_json("export", run, "--format", export_format, "--out", out)
    assert report["format"] == export_format and report["input_size"] == 16 and out.stat().st_size == report["bytes"]
    images, expected = student_logits(run, images_below(val))  # 6 images: the export traced 2, any batch runs
    if export_format == "torchscript":
        extra = {"kdpipe.json": ""}
        exported = torch.jit.load(str(out), _extra_files=extra)
        logits, metadata = exported(images), json.loads(extra["kdpipe.json"])
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"pixels": images.numpy()})[0])
        metadata = json.loads(session.get_modelmeta().custom_metadata_map["kdpipe.json"])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    student = read_student(run)
    assert metadata["format"] == "kdpipe.export/1" and metadata["model"] == "kdpipe:cnn"
    assert metadata["classes"] == CLASSES and metadata["outputs"] == "logits"
    assert metadata["preprocessing"] == json.loads(json.dumps(student.preprocessing.to_dict()))
    assert metadata["preprocessing"]["input_size"] == metadata["input"]["size"] == 16


def test_export_refuses_bad_input_in_one_line(trained, tmp_path, monkeypatch):
    run, _ = trained
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "config.json", unfinished)
    out = tmp_path / "student.pt2"
    assert_user_error(run_cli("export", unfinished, "--out", out), "holds no student", "unfinished",
                      "train-student", "--resume")
    assert_user_error(run_cli("export", run, "--format", "tflite", "--out", out), "--format", "torchscript, onnx")
    assert_user_error(run_cli("export", tmp_path / "nowhere", "--out", out), "neither a run directory nor")
    assert_user_error(run_cli("export", tmp_path, "--out", out), "not a train-student run directory")
    assert_user_error(run_cli("export", run / "config.json", "--out", out), "not a kdpipe student file")
    assert_user_error(run_cli("export", run, "--out", tmp_path), "is a folder")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as without the extra installed
    assert_user_error(run_cli("export", run, "--format", "onnx", "--out", out), "pip install 'kdpipe[onnx]'")
    assert not out.exists()


def test_predict_on_a_plain_folder_gives_the_students_probabilities(trained, tmp_path):
    run, _ = trained
    folder = write_image_folder(tmp_path / "photos", per_class=1, labelled=False)
    write_image_folder(folder / "more" / "deeper", per_class=1, labelled=False, seed=2)  # beside the images
    result = run_cli("predict", run, "--data", folder, "--top", 2, "--workers", 0)
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    paths = images_below(folder)
    assert sorted(Path(p["path"]) for p in predictions) == paths and len(paths) == 6
    _, logits = student_logits(run, [Path(p["path"]) for p in predictions])
    expected, indices = logits.softmax(1).topk(2, dim=1)
    for prediction, probabilities, classes in zip(predictions, expected, indices):
        assert set(prediction["classes"]) <= set(CLASSES) and len(prediction["classes"]) == 2
        assert prediction["probabilities"] == sorted(prediction["probabilities"], reverse=True)
        assert sum(prediction["probabilities"]) <= 1 + 1e-6
        assert prediction["classes"] == [CLASSES[c] for c in classes]
        torch.testing.assert_close(torch.tensor(prediction["probabilities"]), probabilities, rtol=1e-5, atol=1e-6)

    out = tmp_path / "predictions.csv"
    assert cli_json("predict", run, "--data", folder, "--top", 2, "--workers", 0, "--out", out)["images"] == 6
    rows = list(csv.DictReader(out.open()))
    assert [row["path"] for row in rows] == [p["path"] for p in predictions]
    assert [[row["class_1"], row["class_2"]] for row in rows] == [p["classes"] for p in predictions]
    assert [float(row["probability_1"]) for row in rows] == [p["probabilities"][0] for p in predictions]


def test_eval_of_a_run_is_its_own_final_val_top1(trained):
    run, val = trained
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    expected = {run: final["val_top1"], run / "student.pt": final["val_top1"],
                run / "student_best.pt": summary["best_val_top1"], run / "student_ema.pt": final["val_top1_ema"]}
    for model, top1 in expected.items():
        report = json.loads(run_cli("eval", "--model", model, "--data", val, "--workers", 0, "--json").stdout)
        assert report["top1"] == top1, model
        if model == run:
            assert report["per_class"] == summary["val_per_class"] and report["top5"] == final["val_top5"]
        assert report["transform"] == {"size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "resize": "crop"}


def test_students_that_cannot_be_scored_are_refused(trained, tmp_path):
    run, val = trained
    others = write_image_folder(tmp_path / "others", classes=("ant", "bee", "cow"), per_class=1)
    assert_user_error(run_cli("eval", "--model", run, "--data", others, "--workers", 0), "output 0 is class 'cat'",
                      "'ant'")
    assert_user_error(run_cli("eval", "--model", run, "--data", val, "--weights", "w.pt"), "drop --weights")
    seed = tmp_path / "seed_student.pt"
    torch.save(torch.load(run / "student.pt", weights_only=True) | {"outputs": "embeddings", "classes": None}, seed)
    assert_user_error(run_cli("predict", seed, "--data", val, "--workers", 0), "SEED", "embeddings")
    assert_user_error(run_cli("eval", "--model", seed, "--data", val, "--workers", 0), "SEED", "embeddings")
    assert_user_error(run_cli("predict", run, "--data", val, "--out", tmp_path / "p.txt"), ".jsonl or a .csv")


def test_a_run_from_before_student_files_loads_from_its_config(trained, tmp_path):
    """student.pt was the bare state_dict; config.json and summary.json say the rest."""
    run, _ = trained
    old = tmp_path / "old-run"
    old.mkdir()
    for name in ("config.json", "summary.json"):
        shutil.copy(run / name, old)
    torch.save(torch.load(run / "student.pt", weights_only=True)["model"], old / "student.pt")
    model, student = load_student(old)
    new_model, new = load_student(run)
    assert student.metadata() == new.metadata()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in new_model.state_dict().items())
    assert student.path == old / "student.pt" and student.spec.weights == str(old / "student.pt")
