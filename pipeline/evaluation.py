"""Evaluating a classifier on labelled images, the way timm and torchvision report it.

Each image is seen through the model's standard evaluation view (`views.eval_view`:
shorter side to size / crop_pct with the model's interpolation, centre crop), so the
figures compare with published ones. `classification_metrics` turns logits into top-1,
top-5 and per-class accuracy, and, given a teacher's logits on the same images, the
student's top-1 agreement with the teacher and the mean KL(teacher || student) at
temperature 1 (big_vision's distillation evaluators). `evaluate_model` is `kdpipe eval`.
`detection_metrics` scores a detector's boxes the COCO way.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .config import INTERPOLATIONS, MAX_VIEW_SIZE, ModelSpec, check_number
from .data import Source, open_source
from .deploy import read_student
from .errors import ConfigError, DataError
from .models import build_model, output_classes, preprocessing, with_num_classes
from .probe import features, whole_images
from .progress import say
from .views import EVAL_RESIZES

TOP_K = 5


@dataclass(frozen=True)
class EvalTransform:
    """How an image becomes a model's evaluation view: `resize` "crop" (the standard
    protocol) or "squash" (the whole image to size x size); see `views.eval_view`."""

    size: int
    crop_pct: float
    interpolation: str
    resize: str = "crop"

    def __post_init__(self):
        check_number("--size", self.size, 1, MAX_VIEW_SIZE)
        check_number("--crop-pct", self.crop_pct, 0, above=True)
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize not in EVAL_RESIZES:
            raise ConfigError(f"--eval-resize must be one of {', '.join(EVAL_RESIZES)}, got {self.resize!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "crop_pct": self.crop_pct, "interpolation": self.interpolation, "resize": self.resize}


def model_transform(spec: ModelSpec, size: int | None = None, crop_pct: float | None = None,
                    interpolation: str | None = None, resize: str = "crop") -> EvalTransform:
    """The evaluation view of the model of `spec`: its own preprocessing (input size,
    crop_pct, interpolation, as timm's pretrained config or torchvision's weights say),
    each overridden when given. An interpolation the renderer lacks becomes bilinear."""
    own = preprocessing(spec)
    if interpolation is None:
        interpolation = own.interpolation
        if interpolation not in INTERPOLATIONS:
            say(f"warning: {spec.name} expects {interpolation} resizing, which kdpipe lacks; using bilinear")
            interpolation = "bilinear"
    return EvalTransform(size or own.input_size, crop_pct or own.crop_pct, interpolation, resize)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                           teacher_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracy figures in percent of `logits` (N, C) against `labels` (N): top-1,
    top-5 (top-k with k = min(5, C), recorded as `top5_k`) and per class (None for a
    class without images). With `teacher_logits` (N, C) on the same images: `agreement`,
    the % of images where the two top-1 classes agree, and `kl`, the mean over images of
    KL(teacher || student) of their softmaxes at temperature 1, in nats."""
    logits, labels = logits.float(), labels.long()
    k = min(TOP_K, logits.shape[1])
    top1 = logits.argmax(1) == labels
    topk = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    per_class = {name: _percent(top1[labels == label]) for label, name in enumerate(classes)}
    metrics = {"images": len(labels), "top1": _percent(top1), "top5": _percent(topk), "top5_k": k,
               "per_class": per_class}
    if teacher_logits is not None:
        teacher_logits = teacher_logits.float()
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                      reduction="batchmean")
        metrics |= {"agreement": _percent(logits.argmax(1) == teacher_logits.argmax(1)), "kl": float(kl)}
    return metrics


def _percent(hits: torch.Tensor) -> float | None:
    """The share of True in `hits` in percent (exact, from the counts), None when empty."""
    return 100.0 * int(hits.sum()) / len(hits) if len(hits) else None


@dataclass(frozen=True)
class EvalSpec:
    """A `kdpipe eval` run: `model` (and optionally `teacher`) on the labelled images of
    `data`. `model` and `teacher` are each a model to build, or the path of a kdpipe
    student (a run directory or a student file), which brings its weights, classes and
    evaluation view. `size`, `crop_pct` and `interpolation` override the model's own
    evaluation view (None keeps it); the teacher sees its own, at `teacher_size` when
    given, resized the same way ("crop" or "squash")."""

    model: ModelSpec | str
    data: str
    teacher: ModelSpec | str | None = None
    size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    resize: str = "crop"
    teacher_size: int | None = None
    batch_size: int = 64
    workers: int = 0


def predict(spec: ModelSpec, transform: EvalTransform, source: Source, batch_size: int = 64, workers: int = 0,
            role: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 logits (N, C) of the model of `spec` on every image of `source` seen
    through `transform`, and the labels (N), in index order. The weights must fit the
    class count: a head of another size is refused, never re-initialised."""
    device = distributed.device()
    model = build_model(spec, teaching=True).to(device)
    outputs = output_classes(model, transform.size, role)
    if outputs != spec.num_classes:
        raise DataError(f"the {role} {spec.name} gives {outputs} outputs but the data has {spec.num_classes} classes")
    images = whole_images(source, transform.size, workers, transform.interpolation, transform.crop_pct,
                          transform.resize, batch_size)
    return features(model, images, device)


def evaluate_model(spec: EvalSpec) -> dict[str, Any]:
    """Evaluate `spec.model` (and `spec.teacher`) on `spec.data`; returns the report:
    what was evaluated and how, the metrics of `classification_metrics`, and with a
    teacher its own metrics under "teacher"."""
    check_number("--batch-size", spec.batch_size, 1)
    check_number("--workers", spec.workers, 0)
    source = open_source(spec.data)
    if source.classes is None:
        raise DataError(f"{spec.data} is unlabelled: evaluation needs labelled images (one folder per class)")
    model, transform = _model_and_view(spec.model, source, spec.size, spec.crop_pct, spec.interpolation, spec.resize)
    logits, labels = predict(model, transform, source, spec.batch_size, spec.workers)
    report = {"model": model.name, "weights": model.weights or model.pretrained,
              "data": source.describe()["location"], "classes": len(source.classes), "transform": transform.to_dict()}
    if spec.teacher is None:
        return report | classification_metrics(logits, labels, source.classes)
    teacher, teacher_transform = _model_and_view(spec.teacher, source, spec.teacher_size, None, None, spec.resize,
                                                 "teacher")
    teacher_logits, _ = predict(teacher, teacher_transform, source, spec.batch_size, spec.workers, "teacher")
    teacher_report = {"model": teacher.name, "weights": teacher.weights or teacher.pretrained,
                      "transform": teacher_transform.to_dict()}
    teacher_report |= classification_metrics(teacher_logits, labels, source.classes)
    return report | classification_metrics(logits, labels, source.classes, teacher_logits) | {"teacher": teacher_report}


def _model_and_view(given: ModelSpec | str, source: Source, size: int | None, crop_pct: float | None,
                    interpolation: str | None, resize: str, role: str = "model") -> tuple[ModelSpec, EvalTransform]:
    """The model (or teacher: `role`) to evaluate on `source`, with its class count, and
    its evaluation view, the options given overriding it: a model's own (its
    preprocessing), or a kdpipe student's as its file records it, the view train-student
    scored it on. A student must give class logits, and its classes be the data's, in order."""
    classes = source.classes
    if isinstance(given, ModelSpec):
        model = with_num_classes(given, classes, role)
        return model, model_transform(model, size, crop_pct, interpolation, resize)
    student = read_student(given)
    student.require_logits("be scored on class labels")
    model = with_num_classes(student.spec, classes, role)
    if student.classes is not None and student.classes != classes:
        i = next(i for i, (ours, theirs) in enumerate(zip(student.classes, classes)) if ours != theirs)
        raise DataError(f"the {role}'s output {i} is class {student.classes[i]!r}, but class folder {i} of "
                        f"{source.describe()['location']} is {classes[i]!r}: evaluate it on data of its classes")
    view = student.preprocessing
    return model, EvalTransform(size or view.input_size, crop_pct or view.crop_pct,
                                interpolation or view.interpolation, resize)


def format_eval(report: dict[str, Any]) -> str:
    """The report of `evaluate_model` as a few lines of text."""
    view = report["transform"]
    how = (f"shorter side to {view['size']} / {view['crop_pct']:g}, centre crop" if view["resize"] == "crop"
           else "squashed whole")
    lines = [f"{report['model']} on {report['images']} images of {report['classes']} classes ({report['data']})",
             f"  view: {view['size']} px, {how}, {view['interpolation']}",
             f"  top-1 {report['top1']:.2f}%   top-{report['top5_k']} {report['top5']:.2f}%"]
    if "teacher" in report:
        teacher = report["teacher"]
        lines += [f"  teacher {teacher['model']}: top-1 {teacher['top1']:.2f}%   top-{teacher['top5_k']} "
                  f"{teacher['top5']:.2f}%",
                  f"  agreement with the teacher {report['agreement']:.2f}%   KL(teacher || model) {report['kl']:.4f}"]
    lines.append("  per class: " + ", ".join(f"{name} {'-' if value is None else f'{value:.1f}%'}"
                                             for name, value in report["per_class"].items()))
    return "\n".join(lines)


def detection_metrics(predictions: list[dict[str, Any]], targets: list[dict[str, Any]]) -> dict[str, float]:
    """COCO's box mAP in percent, by pycocotools: "map" (averaged over IoU 0.50:0.95),
    "map_50" and "map_75", of per-image `predictions` (boxes x0, y0, x1, y1, scores,
    labels) against `targets` (boxes, labels, optionally `crowd`: True for a crowd box,
    which may be matched but is never missed), numpy arrays or tensors, one entry per
    image in both. As COCO does, a category counts only where the targets have it, and an
    image's 100 best-scoring detections only. Without any target box (crowds aside) the
    figures are undefined: nan."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} images have predictions but {len(targets)} have targets")

    def array(value: Any) -> np.ndarray:
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    def annotations(entries: list[dict[str, Any]], detected: bool) -> list[dict[str, Any]]:
        found = []  # ids from 1: pycocotools takes id 0 for "unmatched"
        for image, entry in enumerate(entries, start=1):
            labels = array(entry["labels"]).reshape(-1)
            crowd = array(entry.get("crowd", np.zeros(len(labels), dtype=bool))).reshape(-1)
            scores = array(entry["scores"]).reshape(-1) if detected else None
            for i, (x0, y0, x1, y1) in enumerate(array(entry["boxes"]).reshape(-1, 4).tolist()):
                width, height = x1 - x0, y1 - y0
                found.append({"id": len(found) + 1, "image_id": image, "category_id": int(labels[i]),
                              "bbox": [x0, y0, width, height], "area": width * height, "iscrowd": int(crowd[i])})
                if detected:
                    found[-1]["score"] = float(scores[i])
        return found

    truth, detections = annotations(targets, detected=False), annotations(predictions, detected=True)
    nan = {"map": float("nan"), "map_50": float("nan"), "map_75": float("nan")}
    if not truth:
        return nan
    images = [{"id": image} for image in range(1, len(targets) + 1)]
    categories = [{"id": c} for c in sorted({a["category_id"] for a in truth + detections})]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_truth, coco_detections = COCO(), COCO()
        coco_truth.dataset = {"images": images, "annotations": truth, "categories": categories}
        coco_detections.dataset = {"images": images, "annotations": detections, "categories": categories}
        coco_truth.createIndex()
        coco_detections.createIndex()
        scoring = COCOeval(coco_truth, coco_detections, "bbox")
        scoring.evaluate()
        scoring.accumulate()
        scoring.summarize()
    # stats: AP at IoU 0.50:0.95, 0.50, 0.75 over all areas, 100 detections; -1 where no box counts
    return {key: float(100.0 * stat) if stat >= 0 else value
            for (key, value), stat in zip(nan.items(), scoring.stats[:3])}
