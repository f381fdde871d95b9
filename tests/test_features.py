"""Feature distillation online (train-student --feature): the terms join the loss and the
log, the connector trains with the student, resumes with it and stays out of student.pt;
bad module names, shapes and losses are refused in one line."""

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipeline.config import FeatureSpec, ModelSpec
from pipeline.errors import ModelError
from pipeline.features import FeatureDistillation, teacher_feature_shapes
from pipeline.models import Tap, Teacher, build_model, small_cnn

from .conftest import assert_user_error, cli_json, run_cli, train_until, weights

DATA = "synthetic:24:4:20"
TEACHER = "tests.toy_models:tiny_cnn"  # small_cnn of width 8: module 9 gives 16 channels at half the view's side
# a kdpipe:cnn student (width 32: 64 channels at module 9) at twice the teacher's side, so
# the hint's connector maps 64 channels to 16 and the map is resized from 16 x 16 to 8 x 8
ONLINE = ("--data", DATA, "--student", "kdpipe:cnn", "--mode", "online", "--teacher", TEACHER, "--size", 16,
          "--student-size", 32, "--batch-size", 8, "--epochs", 2, "--workers", 0, "--precise-bn", 0)
HINT = ("--feature", "hint:9@2")


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _initial_connectors() -> dict[str, torch.Tensor]:
    """The hint connector as the run initialises it (seed 0), before any step."""
    student = build_model(ModelSpec("kdpipe:cnn", num_classes=4))
    teacher = Teacher(ModelSpec(TEACHER, num_classes=4), 16, torch.device("cpu"), features=("9",))
    shapes = teacher_feature_shapes(teacher, 16)
    return FeatureDistillation.build((FeatureSpec.parse(HINT[1]),), student, 32, shapes, seed=0).state_dict()


def test_hint_trains_a_connector_with_the_student_and_leaves_it_out_of_student_pt(tmp_path):
    cli_json("train-student", *ONLINE, "--out", tmp_path / "hint", *HINT)
    cli_json("train-student", *ONLINE, "--out", tmp_path / "kd")
    # the term is logged by name, and the loss is KD plus twice it
    for line in _metrics(tmp_path / "hint"):
        assert line["loss"] == pytest.approx(line["kd"] + 2 * line["hint:9"], rel=1e-5)
    assert "hint:9" not in _metrics(tmp_path / "kd")[0]
    # the connector moved, and so did the student, away from where KD alone takes it
    connectors = torch.load(tmp_path / "hint" / "checkpoint.pt", weights_only=True)["connectors"]
    initial = _initial_connectors()
    assert connectors.keys() == initial.keys() == {"connectors.0.weight", "connectors.0.bias"}
    assert connectors["connectors.0.weight"].shape == (16, 64, 1, 1)
    assert not torch.equal(connectors["connectors.0.weight"], initial["connectors.0.weight"])
    hint, kd = weights(tmp_path / "hint"), weights(tmp_path / "kd")
    assert not torch.equal(hint["0.weight"], kd["0.weight"])
    # student.pt is the bare student: its keys are the network's, nothing of the connector
    assert hint.keys() == small_cnn(4).state_dict().keys()
    small_cnn(4).load_state_dict(hint)


def test_a_run_with_a_connector_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Killed after epoch 1 and resumed: the student and the connector end as those of the
    run that was never stopped (a connector re-initialised on resume would not)."""
    cli_json("train-student", *ONLINE, "--out", tmp_path / "whole", *HINT)
    train_until(monkeypatch, 1, *ONLINE, "--out", tmp_path / "stopped", *HINT)
    assert not (tmp_path / "stopped" / "student.pt").exists()
    cli_json("train-student", *ONLINE, "--out", tmp_path / "stopped", *HINT, "--resume")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "stopped")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    connectors = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["connectors"]
                  for run in ("whole", "stopped")]
    assert all(torch.equal(connectors[0][name], connectors[1][name]) for name in connectors[0])
    assert [line["hint:9"] for line in _metrics(tmp_path / "whole")] == \
        [line["hint:9"] for line in _metrics(tmp_path / "stopped")]


def test_every_feature_loss_trains_an_mlp_student_in_one_run(tmp_path):
    """at and sp between maps of different sizes and channels, rkd between a flattened
    map and a hidden layer; each term is logged and the loss is their weighted sum."""
    features = ("--feature", "at:9:0@500", "--feature", "sp:9:3@3000", "--feature", "rkd:18:3,angle_weight=0")
    cli_json("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--mode", "online", "--teacher", TEACHER,
             "--size", 16, "--batch-size", 8, "--epochs", 1, "--workers", 0, "--alpha", 1, "--out", tmp_path / "run",
             *features)
    line = _metrics(tmp_path / "run")[0]
    assert line["loss"] == pytest.approx(line["ce"] + 500 * line["at:9:0"] + 3000 * line["sp:9:3"] + line["rkd:18:3"],
                                         rel=1e-5)
    assert all(line[name] > 0 for name in ("at:9:0", "sp:9:3", "rkd:18:3"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["features"][2] == {"loss": "rkd", "teacher_module": "18", "student_module": "3", "weight": 1.0,
                                     "options": {"angle_weight": 0.0}}


BASE = ("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--teacher", TEACHER, "--size", 16,
        "--epochs", 1, "--workers", 0)


@pytest.mark.parametrize("feature, message", [
    ("hint:9:2", "hint compares feature maps (batch, channels, height, width), but the student's module '2' "
                 "gives shape (1, 128)"),
    ("at:19:0", "the teacher's module '19' gives shape (1, 4)"),
    ("hint:conv9", "the teacher has no layer 'conv9'"),
    ("sp:9:hidden", "the student has no layer 'hidden'"),
    ("fitnet:9", "unknown feature loss 'fitnet'; choose one of hint, at, sp, rkd"),
    ("at:9,q=2", "the at feature loss has no option 'q' (its options: p)"),
    ("hint:9:0@x", "--feature 'hint:9:0@x': 'x' is not a number"),
])
def test_bad_features_are_refused_in_one_line_before_anything_is_written(tmp_path, feature, message):
    assert_user_error(run_cli(*BASE, "--out", tmp_path / "run", "--feature", feature), message)
    assert not (tmp_path / "run").exists()


def test_feature_needs_a_teacher_live_or_cached(tmp_path):
    assert_user_error(run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--mode", "supervised",
                              "--size", 16, "--out", tmp_path / "run", "--feature", "sp:9"),
                      "use it with --mode online and --teacher", "cache-teacher --outputs")
    assert_user_error(run_cli(*BASE, "--out", tmp_path / "run", "--feature", "sp:9", "--feature", "sp:9@2"),
                      "--feature sp:9 is given twice")


def test_an_unknown_module_is_answered_with_the_nearest_names():
    net = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3), layer1=nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1)),
                                    layer2=nn.ReLU(), head=nn.Linear(4, 2)))
    with pytest.raises(ModelError, match=r"the student has no layer 'layer3'; the nearest: layer2, layer1, layer1\.1, layer1\.0"):
        Tap(net, "layer3", "student")
    with pytest.raises(ModelError, match="its last layers are: stem, layer1, layer1.0, layer1.1, layer2, head"):
        Tap(net, "zzz", "student")


# --- from the cache: feature outputs stored by cache-teacher --outputs ---------------------------

CACHE = ("cache-teacher", "--data", DATA, "--teacher", TEACHER, "--size", 16, "--epochs", 2, "--views-per-sample", 2,
         "--batch-size", 8, "--workers", 0, "--codec", "dense-fp32")
CACHED = ("train-student", "--data", DATA, "--student", "kdpipe:cnn", "--batch-size", 8, "--epochs", 2, "--workers", 0,
          "--precise-bn", 0)
TERMS = ("--feature", "hint:9@2", "--feature", "at:16:12@50")


def _online_equivalent(tmp_path) -> tuple:
    """The online options that give a cached run's views, with the archive's teacher (seed 0) as weights."""
    teacher_weights = tmp_path / "teacher.pt"
    torch.save(build_model(ModelSpec(TEACHER, num_classes=4)).net.state_dict(), teacher_weights)
    return ("--mode", "online", "--teacher", TEACHER, "--weights", teacher_weights, "--size", 16,
            "--views-per-sample", 2)


def test_feature_terms_from_a_float32_cache_equal_the_online_ones_bit_for_bit(tmp_path):
    """The central invariant, for feature distillation: a student (and its hint connector)
    trained on feature maps stored as float32 ends exactly where the same student ends with
    the teacher running live; through int8 the terms are close, not equal."""
    cli_json(*CACHE, "--outputs", "logits,9=fp32,16=fp32", "--out", tmp_path / "fp32.zarr")
    cli_json(*CACHED, "--cache", tmp_path / "fp32.zarr", *TERMS, "--out", tmp_path / "cached")
    cli_json(*CACHED, *_online_equivalent(tmp_path), *TERMS, "--out", tmp_path / "online")
    cached, online = weights(tmp_path / "cached"), weights(tmp_path / "online")
    assert all(torch.equal(cached[name], online[name]) for name in cached)
    connectors = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["connectors"]
                  for run in ("cached", "online")]
    assert all(torch.equal(connectors[0][name], connectors[1][name]) for name in connectors[0])
    terms = ("loss", "kd", "hint:9", "at:16:12")
    assert [[line[term] for term in terms] for line in _metrics(tmp_path / "cached")] == \
        [[line[term] for term in terms] for line in _metrics(tmp_path / "online")]
    assert all(line["hint:9"] > 0 and line["at:16:12"] > 0 for line in _metrics(tmp_path / "cached"))
    # the same features stored as int8, one scale per view and channel: the first step's terms are close
    cli_json(*CACHE, "--outputs", "logits,9=int8,16=int8", "--out", tmp_path / "int8.zarr")
    cli_json(*CACHED, "--cache", tmp_path / "int8.zarr", *TERMS, "--epochs", 1, "--out", tmp_path / "int8")
    first, exact = _metrics(tmp_path / "int8")[0], _metrics(tmp_path / "cached")[0]
    assert first["hint:9"] == pytest.approx(exact["hint:9"], rel=0.02) and first["hint:9"] != exact["hint:9"]


def test_feature_outputs_are_refused_in_one_line_where_they_do_not_fit(tmp_path):
    """A feature loss without the cached feature it names, a codec that does not apply to
    the output, a module the teacher lacks (with the nearest names), and a map that no
    connector can take: each one line, exit 2, nothing written."""
    cli_json(*CACHE, "--outputs", "logits,9=pool:2+pca:4+int8", "--out", tmp_path / "a.zarr")
    assert_user_error(run_cli(*CACHED, "--cache", tmp_path / "a.zarr", "--feature", "at:16", "--out", tmp_path / "r"),
                      "holds no feature output of the teacher's module '16' (it holds 9)",
                      "cache-teacher --outputs logits,16")
    assert_user_error(run_cli(*CACHED, "--cache", tmp_path / "a.zarr", "--feature", "hint:9:18", "--out", tmp_path / "r"),
                      "hint compares feature maps", "the student's module '18' gives shape (1, 128)")
    assert not (tmp_path / "r").exists()
    for outputs, message in [
        ("logits,9=topk:10", "topk:10 is a codec of logits; a feature map is stored with a chain of pool:HxW"),
        ("logits,18=pool:2", "pooling applies to feature maps (channels, height, width), but '18' gives 32 per view"),
        ("logits,9=pool:16", "'9' gives maps of 8 x 8, smaller than pool:16x16"),
        ("logits,9=pca:99", "'9' has 16 channels, fewer than pca:99"),
        ("logits,9=int4", "cannot read 'int4'"),
        ("logits,layer9", "the teacher has no layer 'layer9'"),
        ("logits,9,9=int8", "names a module twice"),
        ("logits,embeddings", "names logits and embeddings"),
    ]:
        assert_user_error(run_cli(*CACHE, "--outputs", outputs, "--out", tmp_path / "b.zarr"), message)
        assert not (tmp_path / "b.zarr").exists()


def test_verify_recomputes_the_feature_outputs_as_stored_and_inspect_lists_them(tmp_path):
    """verify --recompute compares each feature output as the archive stores it (pooled and
    projected with the archive's own projection): a sound archive passes with errors within
    its number type's; a stored value moved by a few steps is a problem named by module."""
    from pipeline.audit import _feature_error
    from pipeline.store import ArchiveReader

    cli_json(*CACHE, "--outputs", "logits,9=pool:2+pca:4+int8,16=fp16", "--out", tmp_path / "a.zarr")
    report = json.loads(run_cli("verify", tmp_path / "a.zarr", "--recompute", 6, "--json").stdout)
    assert report["problems"] == [] and set(report["recomputed"]["features_max_rel_error"]) == {"9", "16"}
    assert 0 < report["recomputed"]["features_max_rel_error"]["9"] < 1 / 127
    assert 0 <= report["recomputed"]["features_max_rel_error"]["16"] < 1e-3
    described = json.loads(run_cli("inspect", tmp_path / "a.zarr", "--json", "--no-stats").stdout)["features"]
    assert described[0] == {"module": "9", "shape": [16, 8, 8], "codec": "pool:2x2+pca:4+int8", "stored_shape": [4, 2, 2]}
    reader = ArchiveReader(tmp_path / "a.zarr")
    fields = reader.read_fields(0, 0, 1)
    teacher = Teacher(ModelSpec(TEACHER, num_classes=4), 16, torch.device("cpu"), features=("9",))
    from pipeline.data import ViewDataset, open_source

    views = ViewDataset(open_source(DATA), reader.manifest.recipe)[0]["views"]
    fresh = teacher.with_features(views)[1]["9"].numpy()[None]
    assert _feature_error(reader, "9", fresh, fields) < 1 / 127
    fields["feature.9"] = fields["feature.9"] // 2  # what damage (or another teacher) would have stored
    assert _feature_error(reader, "9", fresh, fields) > 0.1


def test_a_timm_teachers_feature_info_index_names_its_stage(tmp_path):
    """--outputs takes a timm model's feature_info index for a stage: the archive records the
    module it means (test_resnet's stage 3 is layer3), and an index past the last stage is
    refused in one line listing the stages."""
    timm_cache = ("cache-teacher", "--data", DATA, "--teacher", "timm:test_resnet", "--size", 32, "--workers", 0)
    cli_json(*timm_cache, "--outputs", "logits,3=pool:1+int8", "--out", tmp_path / "a.zarr")
    manifest = json.loads((tmp_path / "a.zarr" / "manifest.json").read_text())
    assert [(f["module"], f["shape"]) for f in manifest["features"]] == [("layer3", [192, 2, 2])]
    assert_user_error(run_cli(*timm_cache, "--outputs", "logits,7", "--out", tmp_path / "b.zarr"),
                      "the teacher has 5 feature_info stages (0-4), not 7", "act1, layer1, layer2, layer3, layer4")


def test_a_larger_student_map_is_pooled_as_the_archive_pools_the_teachers():
    """Shrinking, the student's map is average-pooled with the bins `pool:` uses for the
    teacher's (bilinear resizing would sample only the middle of each 4 x 4 bin of an 8 x 8
    map brought to 2 x 2); enlarging stays bilinear."""
    from pipeline.features import align
    from pipeline.store.feature_codecs import adaptive_average_pool

    student = torch.randn(2, 3, 8, 8)
    assert torch.allclose(align(student, (2, 2)), torch.from_numpy(adaptive_average_pool(student.numpy(), (2, 2))),
                          atol=1e-6)
    assert not torch.allclose(align(student, (2, 2)), nn.functional.interpolate(student, size=(2, 2), mode="bilinear"))
    assert torch.equal(align(student, (16, 16)), nn.functional.interpolate(student, size=(16, 16), mode="bilinear"))


def test_feature_outputs_that_cannot_be_stored_are_refused_in_one_line(tmp_path):
    """A teacher whose tapped module gives NaN, or a tuple, is refused naming the module (with
    pca the projection is never fitted on it); a further teacher with feature outputs too;
    a timm feature_info index given to cached --feature names the module the archive holds."""
    for index, (module, codec, message) in enumerate([
            ("1", "fp32", "the teacher's module '1' gave NaN or Inf for sample"),
            ("1", "pca:2+fp16", "the teacher's module '1' gave NaN or Inf for sample"),
            ("2", "fp16", "the teacher's module '2' gives a tuple, not a tensor")]):
        out = tmp_path / f"nan-{index}.zarr"
        result = run_cli("cache-teacher", "--data", DATA, "--teacher", "tests.toy_models:nan_inside", "--size", 16,
                         "--workers", 0, "--outputs", f"logits,{module}={codec}", "--out", out)
        assert_user_error(result, message)
        assert not (out / "manifest.json").exists()
    cli_json(*CACHE, "--out", tmp_path / "a.zarr")
    assert_user_error(run_cli(*CACHE, "--out", tmp_path / "a.zarr", "--teacher-name", "other", "--outputs", "logits,9"),
                      "--outputs stores feature outputs of the archive's main teacher only")
    timm_cache = ("cache-teacher", "--data", DATA, "--teacher", "timm:test_resnet", "--size", 32, "--workers", 0)
    cli_json(*timm_cache, "--outputs", "logits,2=pool:2+fp16", "--out", tmp_path / "t.zarr")
    assert_user_error(run_cli("train-student", "--data", DATA, "--student", "timm:test_resnet", "--cache",
                              tmp_path / "t.zarr", "--feature", "at:2", "--workers", 0, "--out", tmp_path / "r"),
                      "(it holds layer2); name the module as the archive records it")
