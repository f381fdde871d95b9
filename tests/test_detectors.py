"""Detectors as teachers and students: the built-in FCOS detectors and torchvision's by
name, their neck levels, the loss terms and neck maps of one training pass, detections in
view pixels, views never resized, seeded builds, weights from files and from torchvision's
cache (real files, never downloaded), the refusals of classifiers and detectors in each
other's place, and COCO mAP on hand-made boxes."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torchvision

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from pipeline.detectors import (DETECTORS, TORCHVISION_DETECTORS, build_detector, is_detection_model,
                                is_detector_name, refuse_detector)
from pipeline.errors import ModelError
from pipeline.evaluation import detection_metrics

TINY = ModelSpec("kdpipe:det-tiny")
FCOS_TERMS = {"classification", "bbox_regression", "bbox_ctrness"}


def views(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def boxes(*rows: tuple[float, float, float, float], label: int = 1) -> dict[str, torch.Tensor]:
    """A target: `rows` as boxes x0, y0, x1, y1 (none: an image without objects), all of `label`."""
    return {"boxes": torch.tensor(rows, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.full((len(rows),), label, dtype=torch.int64)}


def test_torchvision_detectors_are_torchvisions_box_detectors():
    assert set(TORCHVISION_DETECTORS) <= set(torchvision.models.list_models(module=torchvision.models.detection))
    assert not any("mask" in name or "keypoint" in name for name in TORCHVISION_DETECTORS)
    assert all(is_detector_name(name) for name in DETECTORS)
    assert is_detector_name("kdpipe:det-small") and is_detector_name("torchvision:fcos_resnet50_fpn")
    assert not any(is_detector_name(name) for name in ("kdpipe:cnn", "torchvision:resnet18", "timm:resnet18",
                                                       "torchvision:maskrcnn_resnet50_fpn", "module:factory"))


@pytest.mark.parametrize("name, size, width", [("kdpipe:det-tiny", 64, 32), ("kdpipe:det-small", 96, 32),
                                               ("kdpipe:det-wide", 64, 32)])
def test_builtin_detectors_report_three_neck_levels_at_strides_8_16_32(name, size, width):
    detector = build_detector(ModelSpec(name), num_classes=3, size=size)
    assert detector.levels == ("0", "1", "2")
    assert detector.level_shapes == {level: (width, size // stride, size // stride)
                                     for level, stride in zip(detector.levels, (8, 16, 32))}
    assert detector.num_classes == 3 and is_detection_model(detector.net)
    assert detector.training  # the dry pass leaves the mode as it was
    assert (detector.preprocessing.mean, detector.preprocessing.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (detector.preprocessing.input_size, detector.preprocessing.crop_pct) == (size, 1.0)
    neck = detector.eval().neck(views(2, size))
    assert {level: tuple(neck[level].shape) for level in neck} == {
        level: (2, *shape) for level, shape in detector.level_shapes.items()}


def test_losses_give_finite_terms_and_the_neck_maps_of_the_same_pass_also_without_boxes():
    detector = build_detector(TINY, num_classes=3, size=64).train()
    images = views(3, 64)
    targets = [boxes((4, 8, 30, 40), (20, 20, 60, 50)), boxes(label=2), boxes((0, 0, 16, 16), label=2)]
    losses, neck = detector.losses(images, targets)
    assert set(losses) == FCOS_TERMS and all(torch.isfinite(term) for term in losses.values())
    assert tuple(neck) == detector.levels and all(neck[level].requires_grad for level in neck)
    # batch norm in training mode normalises by the batch: the same batch gives the same maps
    with torch.no_grad():
        again = detector.neck(images)
    assert all(torch.allclose(neck[level], again[level], atol=1e-5) for level in detector.levels)
    (sum(losses.values()) + neck["2"].square().mean()).backward()
    assert all(p.grad is not None for p in detector.net.backbone.parameters())

    losses, _ = detector.losses(images[:2], [boxes(), boxes()])  # no objects at all
    assert set(losses) == FCOS_TERMS and all(torch.isfinite(term) for term in losses.values())
    with pytest.raises(RuntimeError, match="call .train"):
        detector.eval().losses(images, targets)


def test_predict_gives_at_most_100_detections_in_view_pixels_and_keeps_the_mode():
    detector = build_detector(TINY, num_classes=3, size=64).train()
    detections = detector.predict(views(2, 64))
    assert detector.training and len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "scores", "labels"} and len(found["boxes"]) <= 100
        assert found["boxes"].shape[1:] == (4,) and (found["boxes"] >= 0).all() and (found["boxes"] <= 64).all()
        assert (found["boxes"][:, 2:] >= found["boxes"][:, :2]).all()
        # untrained, class 0 (the background, never a target) may score too, as torchvision's FCOS has it
        assert ((found["labels"] >= 0) & (found["labels"] < 3)).all() and (found["scores"] >= 0.05).all()


def test_the_neck_sees_the_normalised_view_as_it_is_padded_to_a_multiple_of_32():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    detector = build_detector(ModelSpec("kdpipe:det-tiny", mean=mean, std=std), num_classes=2, size=64).eval()
    assert (detector.preprocessing.mean, detector.preprocessing.std) == (mean, std)
    images = views(2, 64)
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, neck = detector.net.backbone(normalised), detector.neck(images)
    assert all(torch.allclose(neck[level], expected[level], atol=1e-6) for level in detector.levels)
    # a side that is no multiple of 32 is zero-padded up to one, never resized
    assert build_detector(TINY, num_classes=2, size=80).level_shapes == build_detector(
        TINY, num_classes=2, size=96).level_shapes


def test_a_build_is_seeded_and_leaves_torchs_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = (build_detector(TINY, num_classes=3, size=64, seed=5) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before)
    other = build_detector(TINY, num_classes=3, size=64, seed=6)
    assert all(torch.equal(value, second.state_dict()[key]) for key, value in first.state_dict().items())
    assert first.fingerprint == second.fingerprint != other.fingerprint


def test_a_torchvision_detector_builds_without_weights_and_trains_on_images_without_boxes():
    detector = build_detector(ModelSpec("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"), num_classes=4, size=128)
    assert detector.levels == ("0", "1", "pool")
    assert detector.level_shapes == {"0": (256, 4, 4), "1": (256, 4, 4), "pool": (256, 2, 2)}
    losses, neck = detector.train().losses(views(2, 128), [boxes((10, 10, 60, 70), label=3), boxes()])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(term) for term in losses.values()) and tuple(neck) == detector.levels


def test_a_pretrained_coco_detector_keeps_its_backbone_and_neck_and_gets_fresh_class_layers(tmp_path, monkeypatch,
                                                                                           capsys):
    weights = torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    torch.manual_seed(3)
    coco = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=91).state_dict()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(coco, folder / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = ModelSpec("torchvision:ssdlite320_mobilenet_v3_large", pretrained="DEFAULT")

    detector = build_detector(spec, num_classes=3, size=128)
    assert "re-initialised head.classification_head.module_list.0.1.weight" in capsys.readouterr().err
    state = detector.net.state_dict()
    fresh = [f"head.classification_head.module_list.{i}.1.weight" for i in range(6)]  # each level's 1x1 logits
    assert len(fresh) == 6 and all(state[key].shape[0] == coco[key].shape[0] // 91 * 3 for key in fresh)
    assert all(torch.equal(state[key], value) for key, value in coco.items()
               if key.startswith(("backbone.", "head.regression_head.")) and key in state)
    assert detector.preprocessing.mean == (0.5, 0.5, 0.5)  # SSDlite's own normalisation
    losses, _ = detector.train().losses(views(2, 128), [boxes((10, 10, 60, 70), label=2), boxes()])
    assert all(torch.isfinite(term) for term in losses.values())
    assert len(build_detector(spec, num_classes=91, size=128).predict(views(1, 128))) == 1  # COCO's own classes


def test_a_weights_file_round_trips(tmp_path):
    trained = build_detector(TINY, num_classes=3, size=64, seed=1)
    torch.save(trained.net.state_dict(), tmp_path / "detector.pt")
    loaded = build_detector(ModelSpec("kdpipe:det-tiny", weights=str(tmp_path / "detector.pt")), num_classes=3,
                            size=64, seed=0)
    assert loaded.fingerprint == trained.fingerprint
    images = views(2, 64)
    expected, got = trained.predict(images), loaded.predict(images)
    assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
               for a, b in zip(expected, got))
    with pytest.raises(ModelError, match="do not fit the model"):
        build_detector(ModelSpec("kdpipe:det-small", weights=str(tmp_path / "detector.pt")), num_classes=3, size=64)


def test_a_factory_returning_a_detector_is_built_and_one_returning_a_classifier_is_refused(tmp_path, monkeypatch):
    (tmp_path / "user_detectors.py").write_text(
        "from torch import nn\n"
        "from pipeline.detectors import tiny_fcos\n\n\n"
        "def detector(num_classes):\n    return tiny_fcos(num_classes)\n\n\n"
        "def classifier(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    detector = build_detector(ModelSpec("user_detectors:detector"), num_classes=2, size=64)
    assert detector.levels == ("0", "1", "2")
    with pytest.raises(ModelError, match="user_detectors:classifier returned a Sequential, a classifier, not a "
                                         "torchvision detection model .*kdpipe:det-small"):
        build_detector(ModelSpec("user_detectors:classifier"), num_classes=2, size=64)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "kdpipe:cnn", "timm:resnet18"])
def test_a_classifier_is_refused_where_a_detector_is_needed(name):
    with pytest.raises(ModelError, match=f"^{name} is a classifier; detection needs a detector such as "
                                         "torchvision:fasterrcnn_mobilenet_v3_large_fpn or kdpipe:det-small$"):
        build_detector(ModelSpec(name), num_classes=2, size=64)


@pytest.mark.parametrize("spec, message", [
    (ModelSpec("torchvision:maskrcnn_resnet50_fpn"), "torchvision:maskrcnn_resnet50_fpn is not a detector kdpipe "
                                                     "builds; choose one of retinanet_resnet50_fpn, "),
    (ModelSpec("torchvision:no_such_net"), "is not a detector kdpipe builds"),
    (ModelSpec("kdpipe:det-huge"), "unknown built-in detector 'det-huge'; choose one of det-tiny, det-small, det-wide"),
    (ModelSpec("kdpipe:det-tiny", pretrained="DEFAULT"), "kdpipe:det-tiny has no published weights"),
    (ModelSpec("torchvision:ssdlite320_mobilenet_v3_large", pretrained="VOC"), "has no weights 'VOC'; choose one of "
                                                                                "COCO_V1, DEFAULT"),
    (ModelSpec("kdpipe:det-tiny", num_classes=2), "given 2 classes and the data 3"),
])
def test_unknown_detectors_and_mismatches_are_refused(spec, message):
    with pytest.raises(ModelError, match=message):
        build_detector(spec, num_classes=3, size=64)


def test_a_detector_is_refused_where_a_classifier_is_needed():
    with pytest.raises(ModelError, match="^the teacher kdpipe:det-small is a detector; detectors learn from COCO "
                                         r"detection data \(--data coco:"):
        refuse_detector(ModelSpec("kdpipe:det-small"), "teacher")
    refuse_detector(ModelSpec("kdpipe:cnn"), "student")  # a classifier passes


def prediction(*rows: tuple[float, float, float, float], scores: tuple[float, ...], label: int = 1) -> dict:
    return boxes(*rows, label=label) | {"scores": torch.tensor(scores)}


def test_perfect_detections_score_100_and_none_score_0():
    targets = [boxes((10, 10, 30, 30), (40, 40, 90, 80)),
               {"boxes": np.array([[5.0, 5, 25, 45]]), "labels": np.array([2])}]  # numpy works as tensors do
    perfect = [prediction((40, 40, 90, 80), (10, 10, 30, 30), scores=(0.9, 0.8)),
               prediction((5, 5, 25, 45), scores=(0.7,), label=2)]
    assert detection_metrics(perfect, targets) == pytest.approx({"map": 100.0, "map_50": 100.0, "map_75": 100.0})
    empty = [prediction(scores=()), prediction(scores=())]
    assert detection_metrics(empty, targets) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}


def test_a_box_at_iou_two_thirds_counts_at_thresholds_up_to_065():
    # a 20 px square moved 4 px: overlap 16 x 20 = 320, union 2 * 400 - 320 = 480, IoU 2/3;
    # of the thresholds 0.50, 0.55, ..., 0.95 it passes 0.50-0.65: AP 1 at four of ten
    shifted = detection_metrics([prediction((14, 10, 34, 30), scores=(0.9,))], [boxes((10, 10, 30, 30))])
    assert shifted == pytest.approx({"map": 40.0, "map_50": 100.0, "map_75": 0.0})


def test_false_positives_on_an_image_without_objects_halve_the_precision_and_crowds_are_never_missed():
    # sorted by score: a false positive (on the empty image), then the hit: precision 1/2
    # at recall 1, so every interpolated precision is 1/2
    predictions = [prediction((10, 10, 30, 30), scores=(0.9,)), prediction((0, 0, 20, 20), scores=(0.95,))]
    assert detection_metrics(predictions, [boxes((10, 10, 30, 30)), boxes()]) == pytest.approx(
        {"map": 50.0, "map_50": 50.0, "map_75": 50.0})
    crowd = boxes((10, 10, 30, 30), (50, 50, 90, 90)) | {"crowd": np.array([False, True])}
    assert detection_metrics([prediction((10, 10, 30, 30), scores=(0.9,))], [crowd])["map"] == pytest.approx(100.0)
    assert all(math.isnan(value) for value in detection_metrics([prediction(scores=())], [boxes()]).values())
