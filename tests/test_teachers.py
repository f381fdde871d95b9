"""Several teachers in one archive: added on the same views, combined as an ensemble,
taken one at a time (progressive), over different label sets, and ordered for a student
by Backward Greedy Selection."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelSpec
from pipeline.models import build_model
from pipeline.order import adaptation_cost, backward_greedy_order, cost_table
from pipeline.objective import Objective, ensemble_logits, make_loss, scheduled_teacher

from .conftest import archive_files, assert_user_error, cli_json, run_cli, weights

DATA = "synthetic:24:4:20"
CACHE = ["--data", DATA, "--size", 16, "--epochs", 2, "--views-per-sample", 2, "--batch-size", 6, "--workers", 0,
         "--codec", "dense-fp32"]
TRAIN = ["--data", DATA, "--student", "kdpipe:mlp", "--epochs", 2, "--batch-size", 6, "--workers", 0]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def two_teachers(tmp_path):
    """An archive made with tiny_cnn (main) with a second teacher, kdpipe:cnn, added as 'big'."""
    archive = tmp_path / "archive"
    cli_json("cache-teacher", *CACHE, "--teacher", "tests.toy_models:tiny_cnn", "--out", archive)
    before = archive_files(archive)
    cli_json("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--out", archive, "--teacher-name", "big")
    after = archive_files(archive)
    assert {k: v for k, v in after.items() if not k.startswith("teachers/")} == before  # the archive is untouched
    return archive


def test_an_added_teacher_is_an_archive_on_the_same_views(two_teachers, tmp_path):
    added = json.loads((two_teachers / "teachers" / "big" / "manifest.json").read_text())
    main = json.loads((two_teachers / "manifest.json").read_text())
    assert added["teacher"]["name"] == "big" and main["teacher"]["name"] == "main"
    assert added["recipe"] == main["recipe"] and added["dataset"]["fingerprint"] == main["dataset"]["fingerprint"]
    assert added["teacher"]["fingerprint"] != main["teacher"]["fingerprint"]
    assert added["teacher"]["classes"] == main["teacher"]["classes"] == [f"class_{c:04d}" for c in range(4)]
    result = run_cli("inspect", two_teachers, "--json", "--no-stats")
    assert json.loads(result.stdout)["added_teachers"] == ["big"]
    assert run_cli("verify", two_teachers / "teachers" / "big").exit_code == 0
    # a teacher is added only on the archive's own views, and only to a finished archive
    assert_user_error(run_cli("cache-teacher", *CACHE, "--seed", 9, "--teacher", "kdpipe:cnn", "--out", two_teachers,
                              "--teacher-name", "other"), "recipe.seed")
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--out", tmp_path / "none",
                              "--teacher-name", "other"), "does not exist")
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--out", two_teachers,
                              "--teacher-name", "../x"), "teacher name")


def test_a_schedule_of_one_teacher_trains_exactly_as_that_teacher_alone(two_teachers, tmp_path):
    cli_json("train-student", *TRAIN, "--cache", two_teachers, "--out", tmp_path / "main")
    cli_json("train-student", *TRAIN, "--cache", two_teachers / "teachers" / "big", "--out", tmp_path / "big")
    cli_json("train-student", *TRAIN, "--cache", two_teachers, "--teachers", "main,big", "--schedule", "main:2",
             "--out", tmp_path / "s-main")
    cli_json("train-student", *TRAIN, "--cache", two_teachers, "--teachers", "main,big", "--schedule", "big:2",
             "--out", tmp_path / "s-big")
    assert _same(weights(tmp_path / "s-main"), weights(tmp_path / "main"))
    assert _same(weights(tmp_path / "s-big"), weights(tmp_path / "big"))
    assert not _same(weights(tmp_path / "main"), weights(tmp_path / "big"))
    progressive = cli_json("train-student", *TRAIN, "--cache", two_teachers, "--teachers", "main,big",
                           "--schedule", "big:1,main:1", "--out", tmp_path / "p")
    ensemble = cli_json("train-student", *TRAIN, "--cache", two_teachers, "--teachers", "main,big",
                        "--out", tmp_path / "e")
    assert progressive["epochs"] == ensemble["epochs"] == 2
    assert len({json.dumps({k: v.tolist() for k, v in weights(tmp_path / r).items()}) for r in "pe"}) == 2
    assert_user_error(run_cli("train-student", *TRAIN, "--cache", two_teachers, "--teachers", "main,big",
                              "--schedule", "big:1", "--out", tmp_path / "x"), "--schedule")
    assert_user_error(run_cli("train-student", *TRAIN, "--cache", two_teachers, "--teachers", "main,nope",
                              "--out", tmp_path / "y"), "teachers/nope")


def test_ensemble_is_the_mean_of_probabilities_and_schedules_take_turns():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    for t in (1.0, 3.0):
        merged = ensemble_logits([a, b], t)
        assert torch.allclose(F.softmax(merged / t, -1), (F.softmax(a / t, -1) + F.softmax(b / t, -1)) / 2, atol=1e-6)
    schedule = (("x", 2), ("y", 1), ("z", 3))
    assert [scheduled_teacher(schedule, e) for e in range(6)] == ["x", "x", "y", "z", "z", "z"]
    objective = Objective(make_loss("kd", {}, temperature=2.0), temperature=2.0)
    student = torch.randn(5, 4)
    got = objective.distillation(student, {"x": a, "y": b}, torch.zeros(5, dtype=torch.long))
    mean_p = (F.softmax(a / 2, -1) + F.softmax(b / 2, -1)) / 2
    by_hand = 4 * (mean_p * (mean_p.log() - F.log_softmax(student / 2, -1))).sum(-1).mean()
    assert float(got) == pytest.approx(float(by_hand), rel=1e-5)
    # teachers of different classes each teach their own columns
    columns = {"x": [0, 1], "y": [2, 3]}
    objective = Objective(make_loss("kd", {}, temperature=2.0), temperature=2.0, columns=columns)
    got = objective.distillation(student, {"x": a[:, :2], "y": b[:, 2:]}, torch.zeros(5, dtype=torch.long))
    def kd(s, t):
        p = F.softmax(t / 2, -1)
        return 4 * (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean()
    assert float(got) == pytest.approx(float((kd(student[:, :2], a[:, :2]) + kd(student[:, 2:], b[:, 2:])) / 2), rel=1e-5)


def test_teachers_of_different_classes_teach_a_student_of_their_union(tmp_path):
    """One teacher knows classes 0-1, the other 2-3: the student has 4 outputs and the
    run records each teacher's classes."""
    archive = tmp_path / "archive"
    cli_json("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--num-classes", 2,
             "--teacher-classes", "class_0000,class_0001", "--out", archive)
    cli_json("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--num-classes", 2,
             "--teacher-classes", "class_0002,class_0003", "--out", archive, "--teacher-name", "upper")
    summary = cli_json("train-student", *TRAIN, "--cache", archive, "--teachers", "main,upper", "--out", tmp_path / "u")
    assert summary["epochs"] == 2
    assert weights(tmp_path / "u")["4.weight"].shape[0] == 4  # the MLP's last layer: the union's 4 classes
    assert_user_error(run_cli("train-student", *TRAIN, "--cache", archive, "--teachers", "main,upper", "--loss", "dkd",
                              "--out", tmp_path / "d"), "--loss dkd")
    assert_user_error(run_cli("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--num-classes", 2,
                              "--teacher-classes", "class_0000,zebra", "--out", tmp_path / "z"), "'zebra'")


def test_adaptation_cost_is_zero_for_a_linear_image_and_one_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    assert adaptation_cost(x, x @ rng.normal(size=(6, 3)) + 2.0, 300) < 1e-4
    assert adaptation_cost(x, rng.normal(size=(400, 3)), 300) > 0.9


def test_the_chain_is_built_backward_from_the_target_through_stepping_stones():
    """The target depends on a nonlinear feature h of the student's outputs x. A stepping
    stone that carries h (and x) adapts to it at no cost, the student cannot; noise is
    no stepping stone. The chain: stone, then target; the noise is left out."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 4))
    h = np.tanh(3 * x[:, :2]) * x[:, 2:]
    outputs = {"target": h @ rng.normal(size=(2, 5)), "stone": np.hstack([x, h]), "noise": rng.normal(size=(600, 5))}
    order = backward_greedy_order(cost_table(outputs, x, 450), "target")
    assert [name for name, _ in order] == ["stone", "target"]
    costs = dict(order)
    assert costs["target"] < 1e-3 < costs["stone"]  # stone -> target is free; student -> stone is not
    assert [name for name, _ in backward_greedy_order(cost_table(outputs, np.hstack([x, h]), 450), "target")] == ["target"]


def test_order_teachers_on_an_archive(tmp_path):
    """A twin of the student (its own network and weights) is no stepping stone towards
    the CNN teacher: the student adapts to the CNN as cheaply as its twin does."""
    archive = tmp_path / "archive"
    cli_json("cache-teacher", *CACHE, "--teacher", "kdpipe:cnn", "--out", archive)
    student = tmp_path / "student.pt"
    torch.save(build_model(ModelSpec("kdpipe:mlp", num_classes=4)).net.state_dict(), student)
    cli_json("cache-teacher", *CACHE, "--teacher", "kdpipe:mlp", "--weights", student, "--out", archive,
             "--teacher-name", "twin")
    result = run_cli("order-teachers", "--data", DATA, "--cache", archive, "--student", "kdpipe:mlp",
                     "--student-weights", student, "--epochs", 10, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["order"] == ["main"] and report["skipped"] == ["twin"] and report["schedule"] == "main:10"
    assert report["table"]["student"]["twin"] < 1e-3  # the twin is the student
    assert report["table"]["twin"]["main"] == pytest.approx(report["table"]["student"]["main"], abs=1e-6)
    # with the twin as the target, the chain is the twin alone, reached from the student at no cost
    twin = json.loads(run_cli("order-teachers", "--data", DATA, "--cache", archive, "--student", "kdpipe:mlp",
                              "--student-weights", student, "--target", "twin", "--json").stdout)
    assert twin["order"] == ["twin"] and twin["costs"]["twin"] < 1e-3
    text = run_cli("order-teachers", "--data", DATA, "--cache", archive, "--student", "kdpipe:mlp",
                   "--student-weights", student)
    assert "1. main" in text.stdout and "not used" in text.stdout and math.isfinite(report["table"]["student"]["main"])
