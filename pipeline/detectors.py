"""Object detectors as teachers and students: torchvision's detection models by name,
kdpipe's small built-in ones (FCOS on a few conv stages and a feature pyramid, for the
CPU and the quickstart) and user factories, each wrapped in `Detector`. It feeds the
model kdpipe's views as they are (normalised and batched, never resized) and gives what
MTPD-style distillation needs: the neck's feature maps by level, the detection loss
terms of a training pass together with that same pass's neck maps, and detections.

Targets follow torchvision: per image a dict of `boxes` (N, 4), x0, y0, x1, y1 in view
pixels, and `labels` (N,) in 1..K, 0 being the background, so a detector of K
categories is built with num_classes = K + 1.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork

from .config import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Preprocessing
from .errors import ModelError
from .models import (BUILTIN_MODELS, _conv_block, _create_from_factory, _first_line, _pretrained_torchvision,
                     _say_reinitialised, _split_name, _weights_member, load_weights, model_fingerprint)

# torchvision.models.list_models(module=torchvision.models.detection) less the mask and
# keypoint models, whose targets need more than boxes
TORCHVISION_DETECTORS = (
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large", "ssd300_vgg16",
)

# The built-ins' pyramid levels are at strides 8, 16 and 32; FCOS gives each location one
# anchor box a stride wide, and a level the objects whose farthest side from a location is
# 4 to 8 anchors away (the first level everything nearer, the last everything farther),
# so 16-40 px objects on 96-128 px views fall on the first level.
_STRIDES = (8, 16, 32)
_SAMPLE_SIZE = 128  # FCOS needs a min/max size; unused, as `Detector` never resizes

NEEDS_DETECTOR = "detection needs a detector such as torchvision:fasterrcnn_mobilenet_v3_large_fpn or kdpipe:det-small"


class ConvPyramid(nn.Module):
    """A backbone for small images: a stem of two stride-2 conv-BN-ReLU blocks, then one
    stage per width (a stride-2 block and a block), and torchvision's feature pyramid on
    the stages: maps "0", "1", "2" at strides 8, 16, 32, `out_channels` each."""

    def __init__(self, widths: tuple[int, int, int], out_channels: int):
        super().__init__()
        stem = widths[0] // 2
        self.stem = nn.Sequential(*_conv_block(3, stem, stride=2), *_conv_block(stem, stem, stride=2))
        self.stages = nn.ModuleList(nn.Sequential(*_conv_block(cin, cout, stride=2), *_conv_block(cout, cout))
                                    for cin, cout in zip((stem, *widths[:-1]), widths))
        self.fpn = FeaturePyramidNetwork(list(widths), out_channels)
        self.out_channels = out_channels  # what torchvision's detectors read off a backbone

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        features = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = features[str(i)] = stage(x)
        return self.fpn(features)


def small_fcos(num_classes: int, widths: tuple[int, int, int] = (32, 64, 128), out_channels: int = 32,
               head_convs: int = 2) -> FCOS:
    """torchvision's FCOS (anchor-free, quick to train) on a `ConvPyramid`, keeping up to
    100 detections an image down to score 0.05, as COCO's mAP wants. A 32-channel pyramid
    and a two-conv head: on the digit scenes at 96 px, 64 channels or a four-conv head
    (FCOS's own) trained several times slower from scratch (docs/methods.md)."""
    anchors = AnchorGenerator(tuple((stride,) for stride in _STRIDES), ((1.0,),) * len(_STRIDES))
    head = FCOSHead(out_channels, 1, num_classes, num_convs=head_convs)
    return FCOS(ConvPyramid(widths, out_channels), num_classes, _SAMPLE_SIZE, _SAMPLE_SIZE, list(IMAGENET_MEAN),
                list(IMAGENET_STD), anchor_generator=anchors, head=head, score_thresh=0.05, detections_per_img=100)


def tiny_fcos(num_classes: int) -> FCOS:
    """`small_fcos` at half the backbone's width: the quickstart's student."""
    return small_fcos(num_classes, (16, 32, 64))


def wide_fcos(num_classes: int) -> FCOS:
    """`small_fcos` at twice the backbone's width: a teacher for the built-ins."""
    return small_fcos(num_classes, (64, 128, 256))


BUILTIN_DETECTORS = {"det-tiny": tiny_fcos, "det-small": small_fcos, "det-wide": wide_fcos}

DETECTORS = tuple(f"torchvision:{name}" for name in TORCHVISION_DETECTORS) + tuple(
    f"kdpipe:{name}" for name in BUILTIN_DETECTORS)


def is_detector_name(name: str) -> bool:
    """Whether `name` is a detector kdpipe knows by name (a factory's is known once built:
    `is_detection_model`)."""
    return name in DETECTORS


def is_detection_model(net: nn.Module) -> bool:
    """Whether `net` is one of torchvision's detection models, which `Detector` wraps."""
    return isinstance(net, (GeneralizedRCNN, RetinaNet, FCOS, SSD))


def refuse_detector(spec: ModelSpec, role: str) -> None:
    """Refuse a detector given where a classifier is needed (the classification commands)."""
    if is_detector_name(spec.name):
        raise ModelError(f"the {role} {spec.name} is a detector; detectors learn from COCO detection data "
                         "(--data coco:ANNOTATIONS.json), so give a classifier here")


class _ViewTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize: it normalises the views and
    batches them, zero-padded to a multiple of `size_divisible` (32, or 1 for SSD), so a
    view whose side is a multiple of 32 is seen as it is."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        return image, target


def _as_levels(features: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone's output as named levels: a single map is level "0", as torchvision's SSD names it."""
    return OrderedDict([("0", features)]) if isinstance(features, torch.Tensor) else features


class Detector(nn.Module):
    """A torchvision detection model `net` of `num_classes` classes (background included)
    seeing views of `preprocessing.input_size` pixels a side as they are: its transform
    normalises with `preprocessing`'s mean and std and never resizes. Views should be
    multiples of 32 a side; others are zero-padded up to one (after normalisation), as
    torchvision batches them. `levels` and `level_shapes` ((C, H, W) at that size) describe
    the neck's outputs, found by one dry pass in eval mode."""

    def __init__(self, net: nn.Module, preprocessing: Preprocessing, num_classes: int):
        super().__init__()
        size = preprocessing.input_size
        net.transform = _ViewTransform(size, size, list(preprocessing.mean), list(preprocessing.std),
                                       size_divisible=net.transform.size_divisible)
        self.net, self.preprocessing, self.num_classes = net, preprocessing, num_classes
        self.level_shapes = self._level_shapes(size)
        self.levels = tuple(self.level_shapes)

    @property
    def fingerprint(self) -> str:
        """`models.model_fingerprint` of the network's current weights and its preprocessing."""
        return model_fingerprint(self.net, self.preprocessing)

    def neck(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The neck's (backbone and feature pyramid's) maps by level for views (B, 3, S, S)
        in [0, 1], as the network's own forward pass computes them, in the current mode."""
        batch, _ = self.net.transform(list(images))
        return _as_levels(self.net.backbone(batch.tensors))

    def losses(self, images: torch.Tensor,
               targets: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One training forward pass: the loss terms torchvision returns, by its names
        (FCOS: classification, bbox_regression, bbox_ctrness), and the neck's maps of that
        same pass (gradients flow through both). An image may have no boxes (shape (0, 4))."""
        if not self.training:
            raise RuntimeError("Detector.losses runs a training pass: call .train() first")
        kept: dict[str, torch.Tensor] = {}
        hook = self.net.backbone.register_forward_hook(lambda module, inputs, output: kept.update(_as_levels(output)))
        try:
            losses = self.net(list(images), targets)
        finally:
            hook.remove()
        return losses, kept

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The detections (boxes x0, y0, x1, y1 in view pixels, scores, labels) per view, in
        eval mode and inference mode; the module's mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return self.net(list(images))
        finally:
            self.train(was_training)

    def _level_shapes(self, size: int) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of each neck level for a view of `size` pixels: one pass on a zero view
        in eval mode (no statistics updated), torch's generator left as it was."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                levels = self.neck(torch.zeros(1, 3, size, size, device=next(self.parameters()).device))
        except Exception as exc:  # noqa: BLE001 - a model failing on its input raises anything
            raise ModelError(f"the detector cannot take views of {size} x {size} pixels ({_first_line(exc)}); "
                             "choose another view size or another model") from None
        finally:
            self.train(was_training)
        return {name: tuple(level.shape[1:]) for name, level in levels.items()}


def build_detector(spec: ModelSpec, num_classes: int, size: int, seed: int = 0) -> Detector:
    """The detector of `spec` with `num_classes` classes (categories + 1, the background)
    for views of `size` pixels a side, initialised from `seed` (torch's own generator left
    as it was), then from `spec.pretrained` (a torchvision weights enum member, read from
    $TORCH_HOME/hub/checkpoints) or the state_dict in `spec.weights`. Its normalisation is
    `spec.mean` / `spec.std` when given, else the model's own."""
    if num_classes < 2:
        raise ModelError(f"a detector needs at least one category: num_classes is categories + 1 (the background), "
                         f"got {num_classes}")
    if spec.num_classes not in (None, num_classes):
        raise ModelError(f"model {spec.name} is given {spec.num_classes} classes and the data {num_classes} "
                         "(categories + 1, the background); drop --num-classes or pass the matching one")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _build_net(spec, num_classes)
        if spec.weights:
            load_weights(net, spec.weights, spec.name)
        own = net.transform
        preprocessing = Preprocessing(mean=tuple(float(v) for v in spec.mean or own.image_mean),
                                      std=tuple(float(v) for v in spec.std or own.image_std),
                                      interpolation="bilinear", crop_pct=1.0, input_size=size)
        return Detector(net, preprocessing, num_classes)


def _build_net(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The torchvision detection model of `spec`, refusing classifiers."""
    prefix, rest = _split_name(spec.name)
    if prefix == "torchvision":
        return _create_torchvision_detector(spec, rest, num_classes)
    if prefix == "timm" or prefix == "kdpipe" and rest in BUILTIN_MODELS:
        raise ModelError(f"{spec.name} is a classifier; {NEEDS_DETECTOR}")
    if spec.pretrained is not None:
        raise ModelError(f"{spec.name} has no published weights to load (--pretrained {spec.pretrained}: torchvision "
                         "detectors only); give a weights file instead")
    if prefix == "kdpipe":
        if rest not in BUILTIN_DETECTORS:
            raise ModelError(f"unknown built-in detector {rest!r}; choose one of {', '.join(BUILTIN_DETECTORS)}")
        return BUILTIN_DETECTORS[rest](num_classes)
    net = _create_from_factory(spec.name, num_classes)
    if not is_detection_model(net):
        raise ModelError(f"{spec.name} returned a {type(net).__name__}, a classifier, not a torchvision detection model "
                         f"(GeneralizedRCNN, RetinaNet, FCOS or SSD); {NEEDS_DETECTOR}")
    return net


def _create_torchvision_detector(spec: ModelSpec, name: str, num_classes: int) -> nn.Module:
    """torchvision's detector `name`: randomly initialised (its backbone too, never
    downloading ImageNet weights for it), or with `spec.pretrained`, the published weights
    (COCO's 91 classes), whose class-dependent layers are made afresh for another class
    count (`_refit_classes`)."""
    if name not in TORCHVISION_DETECTORS:
        if name in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(f"{spec.name} is a classifier; {NEEDS_DETECTOR}")
        raise ModelError(f"torchvision:{name} is not a detector kdpipe builds; choose one of "
                         f"{', '.join(TORCHVISION_DETECTORS)}")
    weights = _weights_member(name, spec.pretrained)
    if weights is None:
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
    net = _pretrained_torchvision(name, weights)
    classes = len(weights.meta["categories"])
    if classes != num_classes:
        _refit_classes(spec.name, name, net, classes, num_classes)
    return net


def _refit_classes(model: str, name: str, net: nn.Module, classes: int, num_classes: int) -> None:
    """Replace the layers of the pretrained detector `net` whose shapes depend on the class
    count (the classification logits; Faster R-CNN's per-class boxes too) by those of the
    same detector built for `num_classes` without weights, initialised as torchvision does
    (from torch's generator, which build_detector seeds). The backbone, the neck and the
    rest of the head keep their weights."""
    fresh = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
    own, new = net.state_dict(), fresh.state_dict()
    keys = [key for key in own if key in new and own[key].shape != new[key].shape]
    for layer in dict.fromkeys(key.rpartition(".")[0] for key in keys):
        parent, _, leaf = layer.rpartition(".")
        setattr(net.get_submodule(parent), leaf, fresh.get_submodule(layer))
    modules = dict(net.named_modules())
    for path, module in fresh.named_modules():  # the class count a head reshapes its logits by
        for attribute in ("num_classes", "num_columns"):  # RetinaNet's and FCOS's heads; SSD's
            if hasattr(module, attribute) and path in modules:
                setattr(modules[path], attribute, getattr(module, attribute))
    _say_reinitialised(model, keys, classes, num_classes)
