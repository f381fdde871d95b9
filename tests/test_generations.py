"""`--teacher RUN_DIR`: a finished train-student run teaches the next, so born-again
generations and teacher-assistant chains are a loop of cache-teacher and train-student.
The archive records the teacher as its student file (rebuilt by `verify --recompute`),
the view size defaults to the one that student learnt at, and what cannot teach (an
unfinished run, a SEED student asked for logits, a run with a weights option) is refused
in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import assert_user_error, cli_json, run_cli

DATA = "synthetic:24:4:20"
SIZE = 12  # not kdpipe:mlp's own 32: the generations must take it from the run
TRAIN = ["--data", DATA, "--student", "kdpipe:mlp", "--epochs", 1, "--batch-size", 8, "--workers", 0]
CACHE = ["--data", DATA, "--epochs", 1, "--views-per-sample", 2, "--batch-size", 8, "--workers", 0]


@pytest.fixture(scope="module")
def generation_1(tmp_path_factory) -> Path:
    """Generation 1: kdpipe:mlp trained on the labels for one epoch at 12 px."""
    run = tmp_path_factory.mktemp("generations") / "gen-1"
    cli_json("train-student", *TRAIN, "--mode", "supervised", "--size", SIZE, "--out", run)
    return run


def test_two_generations_are_a_loop_of_two_commands(generation_1, tmp_path):
    """Each generation's archive records the previous generation's student.pt as its
    teacher, on views of that student's size, and verify rebuilds it from that record."""
    teacher = generation_1
    for generation in (2, 3):
        archive = tmp_path / f"gen-{generation}.zarr"
        cli_json("cache-teacher", *CACHE, "--teacher", teacher, "--out", archive)
        run = tmp_path / f"gen-{generation}"
        named = ["--teacher", teacher] if generation == 3 else []  # in cached mode, checked against the archive
        cli_json("train-student", *TRAIN, "--cache", archive, *named, "--out", run)
        manifest = json.loads((archive / "manifest.json").read_text())
        recorded = manifest["teacher"]["spec"]
        assert recorded["name"] == "kdpipe:mlp" and recorded["num_classes"] == 4
        assert recorded["weights"] == str((teacher / "student.pt").resolve()) and recorded["pretrained"] is None
        assert manifest["recipe"]["size"] == SIZE
        teacher = run
    verify = run_cli("verify", tmp_path / "gen-3.zarr", "--recompute", 2)
    assert verify.exit_code == 0, verify.output
    assert_user_error(run_cli("train-student", *TRAIN, "--cache", tmp_path / "gen-3.zarr", "--teacher", generation_1,
                              "--out", tmp_path / "wrong"), "fingerprint")
    # the same student given as its weights file, model and normalisation is the same teacher
    student = torch.load(generation_1 / "student.pt", weights_only=True)
    normalisation = [",".join(map(str, student["preprocessing"][key])) for key in ("mean", "std")]
    same = cli_json("cache-teacher", *CACHE, "--teacher", "kdpipe:mlp", "--weights", generation_1 / "student.pt",
                    "--mean", normalisation[0], "--std", normalisation[1], "--size", SIZE, "--out", tmp_path / "same")
    assert same["views"] > 0
    fingerprints = [json.loads((tmp_path / name / "manifest.json").read_text())["teacher"]["fingerprint"]
                    for name in ("gen-2.zarr", "same")]
    assert fingerprints[0] == fingerprints[1]


def test_a_run_teaches_online_and_is_compared_with_in_eval(generation_1, tmp_path):
    run = tmp_path / "online"
    summary = cli_json("train-student", *TRAIN, "--teacher", generation_1 / "student.pt", "--out", run)
    config = json.loads((run / "config.json").read_text())
    assert config["mode"] == "online" and config["recipe"]["size"] == SIZE
    assert config["teacher"]["weights"] == str((generation_1 / "student.pt").resolve())
    assert summary["epochs"] == 1
    result = run_cli("eval", "--model", run, "--teacher", generation_1, "--data", DATA, "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["teacher"]["transform"]["size"] == SIZE and 0 <= report["agreement"] <= 100


def test_what_cannot_teach_is_refused_in_one_line(generation_1, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((generation_1 / "config.json").read_text())
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", unfinished, "--out", tmp_path / "a"),
                      "unfinished", "student.pt")
    seed = tmp_path / "seed_student.pt"
    torch.save(torch.load(generation_1 / "student.pt", weights_only=True) | {"outputs": "embeddings"}, seed)
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", seed, "--out", tmp_path / "b"),
                      "SEED", "teach class logits")
    assert_user_error(run_cli("train-student", *TRAIN, "--teacher", seed, "--out", tmp_path / "c"), "SEED")
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", generation_1, "--weights", "w.pt",
                              "--out", tmp_path / "d"), "--teacher", "kdpipe student", "drop --weights")
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", generation_1, "--pretrained", "default",
                              "--out", tmp_path / "e"), "drop --pretrained")
    assert_user_error(run_cli("train-student", *TRAIN, "--teacher", generation_1, "--teacher-pretrained", "default",
                              "--out", tmp_path / "f"), "drop --teacher-pretrained")
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", tmp_path / "nowhere", "--out", tmp_path / "g"),
                      "neither a run directory nor a student file")
