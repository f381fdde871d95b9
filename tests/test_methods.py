"""Methods from the literature, trained from the cache as well as online: consistent
mixup and CutMix (function matching), students at another resolution than their
teacher, and the distillation losses chosen with --loss."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.config import ModelSpec, ViewRecipe
from pipeline.data import RangeBatches, ViewDataset, open_source
from pipeline.errors import ConfigError
from pipeline.losses import SeedLoss
from pipeline.models import build_model
from pipeline.store import read_manifest
from pipeline.objective import Objective
from pipeline.views import MIX_PARAM_FIELDS, VIEW_PARAM_FIELDS, partners, render, sample_view

from .conftest import assert_user_error, cli_json, run_cli, weights, write_image_folder

DATA = "synthetic:24:4:20"


def _mixing(mode: str, alpha: float = 0.0, **recipe) -> ViewRecipe:
    return ViewRecipe(size=12, views_per_sample=2, epochs=2, seed=3, mixup={"mode": mode, "alpha": alpha}, **recipe)


def _items(source, recipe, batch_size, workers):
    n = len(source)
    loader = DataLoader(ViewDataset(source, recipe), num_workers=workers,
                        batch_sampler=RangeBatches([(e, 0, n) for e in range(recipe.epochs)], n, batch_size))
    return {(int(e), int(i)): p.numpy().tobytes() for b in loader for e, i, p in zip(b["epoch"], b["index"], b["params"])}


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_is_a_pure_function_of_the_view_and_is_recorded(mode):
    """Partner, lam and box do not depend on batch size or workers; the partner is the
    epoch's seeded pairing; lam is in [0, 1]; for CutMix lam = 1 - the box's area."""
    source = open_source(DATA)
    recipe = _mixing(mode)
    reference = _items(source, recipe, batch_size=1, workers=0)
    assert _items(source, recipe, batch_size=7, workers=2) == reference
    fields = VIEW_PARAM_FIELDS + MIX_PARAM_FIELDS
    lams = []
    for (epoch, index), raw in reference.items():
        rows = np.frombuffer(raw, dtype=np.float32).reshape(2, len(fields))
        row = dict(zip(fields, rows.T))
        assert (row["partner"] == partners(recipe, epoch, 24)[index]).all()
        assert ((row["lam"] >= 0) & (row["lam"] <= 1)).all()
        if mode == "cutmix":
            assert np.allclose(row["lam"], 1 - row["box_height"] * row["box_width"], atol=1e-6)
            assert ((row["box_top"] + row["box_height"] <= 1 + 1e-6) & (row["box_height"] > 0)).all()
        else:
            assert (row["box_height"] == 0).all()
        lams.extend(row["lam"])
    if mode == "mixup":
        assert 0.3 < np.mean(lams) < 0.7 and np.std(lams) > 0.2  # lam ~ U(0, 1)
    else:  # a box clipped at the view's edge pastes less: lam is raised to the share left
        assert 0.5 < np.mean(lams) < 0.85 and np.std(lams) > 0.1
    assert len({p for p in partners(recipe, 0, 24)}) == 24 and (partners(recipe, 0, 24) != partners(recipe, 1, 24)).any()
    beta = _items(source, _mixing(mode, alpha=0.2), batch_size=5, workers=0)
    assert beta != reference  # Beta(0.2, 0.2) draws other lams


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixed_views_are_the_two_renders_mixed(mode):
    """An item's pixels are its own view and its partner's same-index view, mixed by lam
    (mixup) or pasted in the box (CutMix); the item carries the partner's label and lam."""
    source = open_source(DATA)
    recipe = _mixing(mode)
    dataset = ViewDataset(source, recipe)
    item = dataset[30]  # epoch 1
    epoch, index = item["epoch"], item["index"]
    partner = int(partners(recipe, epoch, 24)[index])
    own, other = source.load(index), source.load(partner)
    for view in range(2):
        a = render(own, sample_view(recipe, epoch, index, view, own.shape[1:]), 12)
        b = render(other, sample_view(recipe, epoch, partner, view, other.shape[1:]), 12)
        lam = float(item["lam"][view])
        if mode == "mixup":
            assert torch.allclose(item["views"][view], lam * a + (1 - lam) * b, atol=1e-6)
        else:
            inside = (item["views"][view] == b).all(0) & (a != b).any(0)
            outside = (item["views"][view] == a).all(0)
            assert (inside | outside).all() and abs(1 - inside.float().mean() - lam) < 0.2
    assert item["partner_label"] == int(source.labels[partner])


def test_mixed_cross_entropy_weights_both_labels_by_lam():
    logits, labels, partner_labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    lam = torch.tensor([1.0, 0.25, 0.5, 0.0])
    got = Objective(distill=None).terms(logits, None, labels, (partner_labels, lam))["ce"]
    by_hand = sum(float(l) * float(F.cross_entropy(logits[i], labels[i])) + (1 - float(l)) *
                  float(F.cross_entropy(logits[i], partner_labels[i])) for i, l in enumerate(lam)) / 4
    assert float(got) == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixed_student_from_the_cache_equals_the_online_one(mode, tmp_path):
    """The teacher computed its logits on the mixed pixels; the cached student (at 12 px,
    its teacher at 16 px, with labels weighted in) ends bit for bit where the online one does."""
    recipe = ["--views-per-sample", 2, "--size", 16, "--mixup", mode]
    cli_json("cache-teacher", "--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "a",
             "--epochs", 2, "--batch-size", 6, "--codec", "dense-fp32", "--workers", 0, *recipe)
    assert read_manifest(tmp_path / "a").layout.view_param_fields == VIEW_PARAM_FIELDS + MIX_PARAM_FIELDS
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4)).net.state_dict(), tmp_path / "t.pt")
    common = ["--data", DATA, "--student", "kdpipe:mlp", "--epochs", 2, "--batch-size", 6, "--student-size", 12,
              "--alpha", 0.3]
    cli_json("train-student", *common, "--out", tmp_path / "cached", "--cache", tmp_path / "a", "--workers", 2)
    cli_json("train-student", *common, "--out", tmp_path / "online", "--teacher", "tests.toy_models:tiny_cnn",
             "--weights", tmp_path / "t.pt", "--workers", 0, *recipe)
    cached, online = weights(tmp_path / "cached"), weights(tmp_path / "online")
    assert all(torch.equal(cached[name], online[name]) for name in cached)
    config = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config["student_size"] == 12 and config["recipe"]["size"] == 16
    # the mixed recipe is the archive's: asking for another one is refused
    assert_user_error(run_cli("train-student", *common, "--out", tmp_path / "x", "--cache", tmp_path / "a",
                              "--mixup", "mixup" if mode == "cutmix" else "cutmix"), "recipe.mixup")


def test_student_at_another_resolution_sees_the_same_crops(tmp_path):
    """Teacher views at 24 px, student views at 12 px, from the same parameters: the
    student's pixels are the same crop rendered smaller (not a resize of the teacher's)."""
    source = open_source(DATA)
    recipe = ViewRecipe(size=24, views_per_sample=2, epochs=1, seed=1)
    item = ViewDataset(source, recipe, {"views": 12, "teacher_views": 24})[5]
    image = source.load(item["index"])
    params = sample_view(recipe, 0, item["index"], 1, image.shape[1:])
    assert torch.equal(item["teacher_views"][1], render(image, params, 24))
    assert torch.equal(item["views"][1], render(image, params, 12))


@pytest.mark.parametrize("loss", ["kd", "dkd", "dist", "ls", "mse", "alpha"])
def test_every_loss_trains_from_the_cache(loss, tmp_path):
    cli_json("cache-teacher", "--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "a",
             "--size", 16, "--epochs", 2, "--workers", 0)
    options = ["--loss-option", "beta=2"] if loss in ("dkd", "dist") else []
    summary = cli_json("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "a",
                       "--out", tmp_path / "run", "--epochs", 2, "--workers", 0, "--loss", loss, *options)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs"] == 2 and all(np.isfinite(m[loss]) for m in metrics)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["loss"] == loss and config["loss_options"] == ({"beta": 2.0} if options else {})


def test_bad_loss_choices_are_one_line(tmp_path):
    pool = write_image_folder(tmp_path / "pool", labelled=False)
    base = ["train-student", "--student", "kdpipe:mlp", "--teacher", "kdpipe:cnn", "--num-classes", 3, "--size", 16,
            "--epochs", 1, "--workers", 0]
    assert_user_error(run_cli(*base, "--data", pool, "--out", tmp_path / "a", "--loss", "dkd"), "--loss dkd needs labels")
    assert_user_error(run_cli(*base, "--data", DATA, "--out", tmp_path / "b", "--loss", "kl"), "unknown loss 'kl'")
    assert_user_error(run_cli(*base, "--data", DATA, "--out", tmp_path / "c", "--loss", "kd", "--loss-option", "beta=1"),
                      "the kd loss has no option 'beta'")
    assert_user_error(run_cli(*base, "--data", DATA, "--out", tmp_path / "d", "--mix-alpha", 0.2), "add --mixup")
    with pytest.raises(ConfigError, match="mixing must be one of"):
        ViewRecipe(mixup={"mode": "blend", "alpha": 0})
    assert not any((tmp_path / name).exists() for name in "abcd")


# --- SEED: self-supervised distillation of embeddings --------------------------------------


def test_seed_loss_by_hand_and_its_fifo_queue():
    """First batch: an empty queue, each distribution has one entry, the loss is 0. Then
    the queue holds the first batch's teacher embeddings, newest replacing oldest."""
    seed = SeedLoss(queue=3, teacher_temperature=0.5, student_temperature=1.0)
    t1, s1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert float(seed(s1, t1)) == pytest.approx(0.0, abs=1e-7)
    assert seed.filled == 2 and torch.equal(seed.queue[:2], t1)
    t2, s2 = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 2.0]])
    s = [0.0, 1.0]  # s2 normalised
    bank = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]  # the queue, then t2 itself
    teacher = [math.exp((0.6 * b[0] + 0.8 * b[1]) / 0.5) for b in bank]
    student = [math.exp(s[0] * b[0] + s[1] * b[1]) for b in bank]
    by_hand = -sum(t / sum(teacher) * math.log(p / sum(student)) for t, p in zip(teacher, student))
    assert float(seed(s2, t2)) == pytest.approx(by_hand, rel=1e-5)
    seed(torch.randn(2, 2), torch.tensor([[3.0, 4.0], [1.0, 0.0]]))  # 5 enqueued in all: the first two are gone
    assert seed.filled == 3 and torch.allclose(seed.queue, torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.6, 0.8]]))


def test_seed_student_from_cached_embeddings_equals_the_online_one(tmp_path):
    """The teacher's penultimate features, L2-normalised, cached; the SEED student from the
    cache ends bit for bit where the online one does, and is scored by a linear probe."""
    common = ["--data", DATA, "--student", "kdpipe:mlp", "--epochs", 2, "--batch-size", 6, "--loss", "seed",
              "--loss-option", "queue=32", "--val", DATA, "--workers", 0]
    cli_json("cache-teacher", "--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "e",
             "--epochs", 2, "--views-per-sample", 2, "--size", 16, "--batch-size", 6, "--codec", "dense-fp32",
             "--outputs", "embeddings", "--workers", 0)
    manifest = read_manifest(tmp_path / "e")
    assert manifest.teacher.outputs == "embeddings" and manifest.teacher.embedding_layer == ""
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4)).net.state_dict(), tmp_path / "t.pt")
    cached = cli_json("train-student", *common, "--cache", tmp_path / "e", "--out", tmp_path / "cached")
    online = cli_json("train-student", *common, "--teacher", "tests.toy_models:tiny_cnn", "--weights", tmp_path / "t.pt",
                      "--views-per-sample", 2, "--size", 16, "--out", tmp_path / "online")
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "online")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert cached["val_top1"] == online["val_top1"] and 25 < cached["val_top1"] <= 100  # four classes: chance 25%
    width = manifest.layout.num_classes
    assert a["4.weight"].shape[0] == width  # the student's outputs: the teacher's embedding width
    state = torch.load(tmp_path / "cached" / "checkpoint.pt", weights_only=False)["loss_state"]
    assert state["filled"] == 32 and state["queue"].shape == (32, width)


def test_embedding_mistakes_are_one_line(tmp_path):
    cache = ["cache-teacher", "--data", DATA, "--teacher", "kdpipe:cnn", "--size", 16, "--workers", 0]
    cli_json(*cache, "--out", tmp_path / "e", "--outputs", "embeddings")
    cli_json(*cache, "--out", tmp_path / "l")
    train = ["train-student", "--data", DATA, "--student", "kdpipe:mlp", "--epochs", 1, "--workers", 0]
    assert_user_error(run_cli(*train, "--cache", tmp_path / "e", "--out", tmp_path / "a"), "holds teacher embeddings")
    assert_user_error(run_cli(*train, "--cache", tmp_path / "l", "--out", tmp_path / "b", "--loss", "seed"),
                      "--embedding-layer")
    assert_user_error(run_cli(*train, "--cache", tmp_path / "e", "--out", tmp_path / "c", "--loss", "seed",
                              "--alpha", 0.5), "--alpha 0")
    assert_user_error(run_cli(*cache, "--out", tmp_path / "x", "--outputs", "embeddings", "--codec", "topk:5"), "dense")
    assert_user_error(run_cli(*cache, "--out", tmp_path / "y", "--embedding-layer", "3"), "--outputs embeddings")
    assert_user_error(run_cli(*cache, "--out", tmp_path / "z", "--outputs", "embeddings", "--embedding-layer", "nope"),
                      "no layer 'nope'")
    assert not any((tmp_path / name).exists() for name in "abcxyz")


def test_embeddings_next_to_logits_in_one_archive(tmp_path):
    """Embeddings cached as a further teacher of a logits archive: the same views, and a
    SEED student trains on them by name."""
    common = ["--data", DATA, "--teacher", "kdpipe:cnn", "--size", 16, "--epochs", 2, "--workers", 0]
    cli_json("cache-teacher", *common, "--out", tmp_path / "a")
    cli_json("cache-teacher", *common, "--out", tmp_path / "a", "--teacher-name", "feats", "--outputs", "embeddings")
    added = read_manifest(tmp_path / "a" / "teachers" / "feats")
    assert added.teacher.outputs == "embeddings" and added.teacher.classes is None
    summary = cli_json("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "a",
                       "--teachers", "feats", "--loss", "seed", "--out", tmp_path / "s", "--epochs", 2, "--workers", 0)
    assert summary["epochs"] == 2 and weights(tmp_path / "s")["4.weight"].shape[0] == added.layout.num_classes
    assert_user_error(run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", tmp_path / "a",
                              "--teachers", "main,feats", "--out", tmp_path / "x", "--epochs", 2, "--workers", 0),
                      "holds teacher embeddings")
