"""`kdpipe eval` against the libraries' own reference evaluation: torchvision's
`weights.transforms()` and timm's `create_transform(**resolve_data_config(model=m))`,
applied with PIL to the same files through `torchvision.datasets.ImageFolder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline import evaluation
from pipeline.data import open_source
from pipeline.evaluation import EvalTransform, classification_metrics, predict
from pipeline.views import eval_view

from .conftest import assert_user_error, run_cli, write_image_folder

CLASSES = tuple(f"class{c}" for c in range(8))  # more than 5, so top-5 can miss


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """16 JPEGs of 8 classes, 30 to 400 px a side: both enlarged and shrunk to the views."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i in range(2):
            height, width = (int(v) for v in rng.integers(30, 400, size=2))
            pattern = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((width, height), Image.BICUBIC)
            pixels = np.clip(np.asarray(pattern, float) + rng.normal(0, 20, (height, width, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.jpg", quality=90)
    return root


def _torchvision(name: str) -> tuple[nn.Module, Callable]:
    """A seeded, randomly initialised torchvision model and its weights' eval preset."""
    return torchvision.models.get_model(name, num_classes=len(CLASSES)), \
        torchvision.models.get_model_weights(name).DEFAULT.transforms()


def _timm(name: str) -> tuple[nn.Module, Callable]:
    """A seeded, randomly initialised timm model and timm's eval transform for it."""
    net = timm.create_model(name, pretrained=False, num_classes=len(CLASSES))
    return net, timm.data.create_transform(**timm.data.resolve_data_config(model=net))


CASES = {
    "torchvision:squeezenet1_1": lambda: _torchvision("squeezenet1_1"),  # bilinear, 256 -> 224
    "timm:test_resnet": lambda: _timm("test_resnet"),  # bilinear, crop_pct 0.95 at 160 (168, by timm's floor)
    "timm:test_vit": lambda: _timm("test_vit"),  # bicubic
}


def reference(net: nn.Module, transform: Callable, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's own evaluation: its transform on PIL images, in ImageFolder's order."""
    dataset = torchvision.datasets.ImageFolder(str(folder), transform)
    images, labels = zip(*dataset)
    net.eval()
    with torch.inference_mode():
        return net(torch.stack(images)), torch.tensor(labels)


@pytest.mark.parametrize("model", CASES)
def test_eval_equals_the_reference_evaluation(model, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    net, transform = CASES[model]()
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    expected, labels = reference(net, transform, photos)

    computed = []  # the logits kdpipe eval computes, kept on their way to the metrics
    monkeypatch.setattr(evaluation, "predict", lambda *args: computed.append(predict(*args)) or computed[-1])

    result = run_cli("eval", "--model", model, "--weights", weights, "--data", photos, "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    # the same figures: top-1, top-5 and per class, computed here from the reference logits
    top1 = expected.argmax(1) == labels
    top5 = (expected.topk(5, dim=1).indices == labels[:, None]).any(1)
    assert report["images"] == len(labels) == 16
    assert report["top1"] == pytest.approx(100.0 * top1.float().mean().item())
    assert report["top5"] == pytest.approx(100.0 * top5.float().mean().item())
    assert report["top5_k"] == 5
    assert report["per_class"] == {name: pytest.approx(100.0 * top1[labels == c].float().mean().item())
                                   for c, name in enumerate(CLASSES)}
    assert 0 < report["top5"] < 100 or 0 < report["top1"] < 100  # the figures can tell a difference

    # and the same logits, up to resizing's rounding (PIL's resize against torch's on uint8)
    [(logits, kdpipe_labels)] = computed
    assert torch.equal(kdpipe_labels, labels)
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert torch.allclose(logits, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())), \
        f"max difference {float((logits - expected).abs().max()):.3g} of logits up to {float(expected.abs().max()):.3g}"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_view_matches_timms_pixels_within_a_grey_level(interpolation, photos):
    """The view itself, before normalisation: timm's PIL resize and centre crop."""
    reference_view = timm.data.create_transform(160, interpolation=interpolation, crop_pct=0.95, normalize=False)
    source = open_source(str(photos))
    for index in range(len(source)):
        ours = eval_view(source.load(index), 160, 0.95, interpolation)
        theirs = reference_view(Image.open(source.paths[index]).convert("RGB")).float() / 255  # uint8 unnormalised
        assert ours.shape == theirs.shape == (3, 160, 160)
        assert (ours - theirs).abs().max() <= 1 / 255 + 1e-6


def test_eval_view_squash_is_the_whole_image(photos):
    image = open_source(str(photos)).load(0)
    squashed = eval_view(image, 32, 0.5, "bilinear", resize="squash")
    expected = torchvision.transforms.v2.functional.resize(image, [32, 32], antialias=True)
    assert torch.allclose(squashed, expected.float() / 255, atol=1e-6)


def test_metrics_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 2, 2, 0])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    metrics = classification_metrics(logits, labels, ["a", "b", "c"], teacher)
    assert metrics["top1"] == 50.0  # images 0 and 2
    assert metrics["top5"] == 100.0 and metrics["top5_k"] == 3
    assert metrics["per_class"] == {"a": 50.0, "b": None, "c": 50.0}
    assert metrics["agreement"] == 50.0  # images 0 and 2
    p_teacher, p_student = teacher.softmax(1), logits.softmax(1)
    kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(1).mean()
    assert metrics["kl"] == pytest.approx(float(kl))


def test_eval_against_a_teacher(photos, tmp_path):
    """The model against itself (the same seeded weights) agrees everywhere, at zero KL;
    the teacher's own figures are reported too."""
    out = tmp_path / "report.json"
    result = run_cli("eval", "--model", "kdpipe:cnn", "--data", photos, "--teacher", "kdpipe:cnn", "--workers", 0,
                     "--out", out)
    assert result.exit_code == 0, result.output
    assert "agreement with the teacher 100.00%" in result.stdout
    report = json.loads(out.read_text())
    assert report["agreement"] == 100.0 and report["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["teacher"]["top1"] == report["top1"]
    assert report["transform"] == {"size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "resize": "crop"}


def test_eval_refuses_what_it_cannot_score(tmp_path):
    labelled = write_image_folder(tmp_path / "labelled", per_class=1)
    unlabelled = write_image_folder(tmp_path / "unlabelled", per_class=1, labelled=False)
    base = ("eval", "--model", "kdpipe:cnn", "--workers", 0)
    assert_user_error(run_cli(*base, "--data", unlabelled), "unlabelled")
    assert_user_error(run_cli(*base, "--data", labelled, "--num-classes", 5), "5 classes", "3 class folders")
    assert_user_error(run_cli(*base, "--data", labelled, "--eval-resize", "stretch"), "--eval-resize", "crop, squash")
    assert_user_error(run_cli(*base, "--data", labelled, "--teacher-weights", "t.pt"), "add --teacher")


def test_eval_transform_is_checked():
    with pytest.raises(Exception, match="--interpolation"):
        EvalTransform(32, 1.0, "lanczos")
