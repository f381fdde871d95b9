"""Outputs a user can deploy: a trained student read back from its file, exported to
TorchScript or ONNX, and run on a folder of images (`kdpipe export`, `kdpipe predict`;
`kdpipe eval --model RUN_DIR` reads it here too).

A student file (student.pt, student_best.pt, student_ema.pt; `train.student_file`
writes them) holds the inner network's weights and what deploying it needs: the model
spec, the class names in output order, and the preprocessing of its evaluation view. A
run directory means its student.pt. Runs written before student.pt recorded these hold
a bare state_dict there; their config.json and summary.json say the same things.

Exported models take float32 RGB pixels in [0, 1], (N, 3, size, size), any N, and
normalise them inside, as kdpipe's own models do (`models.Normalized`). Each carries
`StudentFile.metadata` as JSON, so it describes itself: a TorchScript file as the
extra file kdpipe.json, an ONNX file as the metadata property kdpipe.json.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import distributed
from .config import MAX_VIEW_SIZE, ModelSpec, Preprocessing, check_number
from .data import Source, open_images
from .errors import ConfigError, KdpipeError, ModelError, first_line
from .models import Normalized, build_model, preprocessing, recipe_defaults
from .probe import outputs, whole_images
from .rundir import CONFIG, SUMMARY, WEIGHTS
from .store import write_local_atomic

STUDENT_FORMAT = "kdpipe.student/1"  # the "format" of a student file, which `train.student_file` writes
OUTPUTS = ("logits", "embeddings", "detections")  # what a student gives: class logits, a SEED student's embedding, or boxes
EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_FORMAT = "kdpipe.export/1"  # the "format" of an exported model's metadata
METADATA = "kdpipe.json"  # where an exported model carries its description
# ONNX opset 17 runs on onnxruntime 1.14 and newer, and on most other runtimes.
ONNX_OPSET = 17


@dataclass(frozen=True)
class StudentFile:
    """A trained student as its file describes it. `spec` builds it: the file is its
    weights, and the file's normalisation is its mean and std. `classes` names its
    outputs in order (None when nothing named them); `preprocessing` is its evaluation
    view (size, crop_pct, interpolation) and normalisation."""

    path: Path
    spec: ModelSpec
    outputs: str
    classes: list[str] | None
    preprocessing: Preprocessing

    def require_logits(self, task: str) -> None:
        """Refuse a SEED student, which outputs embeddings, or a detector for a task that needs class logits."""
        if self.outputs == "detections":
            raise ModelError(f"{self.path} holds a detector: it gives boxes, not class logits, so it cannot {task} "
                             "(kdpipe eval scores it on COCO data: --data coco:ANNOTATIONS.json)")
        if self.outputs != "logits":
            raise ModelError(f"{self.path} holds a SEED student: it outputs embeddings, not class logits, so it "
                             f"cannot {task} (train-student scored it with a linear probe; export still works)")

    def class_names(self) -> list[str]:
        """Its output names: the recorded classes, else the output indices as text."""
        return self.classes or [str(index) for index in range(self.spec.num_classes)]

    def metadata(self) -> dict[str, Any]:
        """What an exported model says of itself: the model, its outputs and their class
        names, and the preprocessing its inputs need (normalisation happens inside)."""
        return {"model": self.spec.name, "num_classes": self.spec.num_classes, "outputs": self.outputs,
                "classes": self.classes, "preprocessing": self.preprocessing.to_dict()}


def read_student(path: str | Path) -> StudentFile:
    """The student of `path`: a run directory (its student.pt) or a student file. A run
    with no student.pt is unfinished, and said to be; a file that is not a student (nor
    a bare state_dict in a run directory) is refused."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise ModelError(f"{path} is a folder but not a train-student run directory (it has no {CONFIG})")
        if not (path / WEIGHTS).is_file():
            raise ModelError(f"{path} holds no student: the run is unfinished (no {WEIGHTS}); finish it with "
                             f"`kdpipe train-student ... --out {path} --resume` (the options it was started with)")
        path = path / WEIGHTS
    elif not path.is_file():
        raise ModelError(f"{path} is neither a run directory nor a student file: it does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise ModelError(f"{path} is not a kdpipe student file: {first_line(exc)}") from None
    if _bare_state_dict(saved) and (path.parent / CONFIG).is_file():
        saved = _from_run_files(path.parent)
    if not isinstance(saved, dict) or saved.get("format") != STUDENT_FORMAT:
        found = f"format {saved['format']!r}" if isinstance(saved, dict) and "format" in saved else "no student format"
        raise ModelError(f"{path} is not a kdpipe student file ({found}; kdpipe reads {STUDENT_FORMAT}): pass a run "
                         "directory, its student.pt, student_best.pt or student_ema.pt")
    return _parse(path, saved)


def _bare_state_dict(saved: Any) -> bool:
    return isinstance(saved, dict) and bool(saved) and all(isinstance(v, torch.Tensor) for v in saved.values())


def _from_run_files(run: Path) -> dict[str, Any]:
    """A student file's description of the student of a run written before student.pt
    recorded it: the model spec and recipe of its config.json (the student's view size,
    crop_pct and normalisation, the recipe's interpolation, as train-student scored it)
    and the class names of its summary.json."""
    try:
        config = json.loads((run / CONFIG).read_text())
        summary = json.loads((run / SUMMARY).read_text()) if (run / SUMMARY).is_file() else {}
        spec = replace(ModelSpec.from_dict(config["student"]), weights=None, pretrained=None)
        recipe = config["recipe"]
        size = config.get("student_size") or recipe["size"]
        view = replace(preprocessing(spec), interpolation=recipe.get("interpolation", "bilinear"), input_size=size)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{run} holds an old student.pt (weights alone) and its {CONFIG} or {SUMMARY} cannot say "
                         f"what model it is: {first_line(exc)}") from None
    return {"format": STUDENT_FORMAT, "spec": spec.to_dict(), "classes": summary.get("classes"),
            "outputs": "embeddings" if config.get("loss") == "seed" else "logits", "preprocessing": view.to_dict()}


def _parse(path: Path, saved: dict[str, Any]) -> StudentFile:
    """The StudentFile of a student file's dict, checked field by field."""
    try:
        prep = Preprocessing.from_dict(saved["preprocessing"])
        spec = ModelSpec.from_dict(saved["spec"])
        classes, output_kind = saved["classes"], saved["outputs"]
    except (KeyError, TypeError, AttributeError, KdpipeError) as exc:
        raise ModelError(f"{path} is a damaged student file: {first_line(exc)}") from None
    if output_kind not in OUTPUTS or not isinstance(spec.num_classes, int):
        raise ModelError(f"{path} is a damaged student file: outputs {output_kind!r}, {spec.num_classes!r} classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != spec.num_classes):
        raise ModelError(f"{path} is a damaged student file: its class names do not fit its {spec.num_classes} outputs")
    spec = replace(spec, weights=str(path), pretrained=None, mean=prep.mean, std=prep.std)
    return StudentFile(path, spec, output_kind, classes, prep)


def student_teacher(path: str | Path, outputs: str = "logits") -> ModelSpec:
    """The student of `path` (a run directory or a student file) as a teacher: its model
    spec, class count and normalisation, with the student file, made absolute, as its
    weights. A manifest or run config records it as it records any teacher with a weights
    file, so `verify --recompute` rebuilds it from that record alone, and the file's view
    size and interpolation are the recipe's defaults (`view_defaults`). Born-again
    generations and teacher-assistant chains are this: a finished run teaching the next.
    A SEED student, which gives embeddings, cannot teach `outputs` "logits"."""
    student = read_student(path)
    if outputs == "logits":
        student.require_logits("teach class logits")
    elif outputs == "features" and student.outputs != "detections":
        raise ModelError(f"{student.path} holds a classifier; a detector teaches detection data (neck features)")
    return replace(student.spec, weights=str(student.path.resolve()))


def view_defaults(spec: ModelSpec) -> dict[str, Any]:
    """The view-recipe fields the model of `spec` decides unless given: its own
    (`models.recipe_defaults`), or for a model whose weights are a kdpipe student file
    (`--teacher RUN_DIR`, `--weights RUN/student.pt`) the view size and interpolation
    that file records, the ones it learnt at. Another kind of weights file is left to
    the model's loader, which reads or refuses it."""
    weights = spec.weights
    if weights and not weights.endswith(".safetensors") and Path(weights).is_file():
        try:
            view = read_student(weights).preprocessing
        except ModelError:  # not a student file
            return recipe_defaults(spec)
        return {"size": view.input_size, "interpolation": view.interpolation}
    return recipe_defaults(spec)


def load_student(path: str | Path) -> tuple[Normalized, StudentFile]:
    """The student of `path` (see `read_student`) built with its weights, in eval mode
    on the CPU, normalised as its file says, and its description."""
    student = read_student(path)
    if student.outputs == "detections":
        raise ModelError(f"{student.path} holds a detector: export and predict take classifiers for now "
                         "(kdpipe eval scores a detector on COCO data)")
    model = Normalized(build_model(student.spec).net, student.preprocessing)
    return model.eval(), student


# --- export --------------------------------------------------------------------------


def export_student(path: str, export_format: str, out: str, size: int | None = None) -> dict[str, Any]:
    """Write the student of `path` to the file `out` as a TorchScript or ONNX model of
    [0, 1] pixels (N, 3, size, size) at `size` (by default its view size), any N, to its
    outputs (N, C), normalisation inside, described by its metadata; returns a report."""
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    onnx = _import_onnx() if export_format == "onnx" else None  # missing: said before any work is done
    target = Path(out)
    if target.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the name of the file to write")
    if size is not None:
        check_number("--size", size, 1, MAX_VIEW_SIZE)
    model, student = load_student(path)
    size = size or student.preprocessing.input_size
    example = torch.zeros(2, 3, size, size)  # two images: nothing may take the batch to be one image
    metadata = {"format": EXPORT_FORMAT} | student.metadata() | {
        "input": {"layout": "NCHW", "channels": "RGB", "range": [0, 1], "size": size}}
    try:
        if onnx is None:
            data = _torchscript(model, example, metadata)
        else:
            data = _onnx(onnx, model, example, student.outputs, metadata)
    except Exception as exc:  # noqa: BLE001 - tracing and exporting a user's model raise anything
        raise ModelError(f"cannot export {student.spec.name} to {export_format}: {first_line(exc)}") from None
    write_local_atomic(target, data)
    return {"student": str(student.path), "model": student.spec.name, "format": export_format, "out": str(target),
            "bytes": len(data), "input_size": size, "outputs": student.outputs, "classes": student.classes}


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("--format onnx needs the onnx package: pip install 'kdpipe[onnx]'") from None
    return onnx


def _torchscript(model: Normalized, example: torch.Tensor, metadata: dict) -> bytes:
    """The traced model as a TorchScript file, with the metadata as its extra file kdpipe.json."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # recent torch deprecates TorchScript for torch.export; its files still load in
        # Python and C++ (libtorch), which is what a user asking for it wants
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, example), buffer, _extra_files={METADATA: json.dumps(metadata)})
    return buffer.getvalue()


def _onnx(onnx: Any, model: Normalized, example: torch.Tensor, output: str, metadata: dict) -> bytes:
    """The model as an ONNX file with a dynamic batch dimension, the metadata as its
    property kdpipe.json. It uses torch's TorchScript-based exporter (dynamo=False): it
    needs only the onnx package and takes a fraction of a second, where the torch.export
    one needs onnxscript too and takes seconds for the same graph."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch warns that this exporter is not its default
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET, input_names=["pixels"],
                          output_names=[output], dynamic_axes={"pixels": {0: "batch"}, output: {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {METADATA: json.dumps(metadata)})
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# --- predict -------------------------------------------------------------------------


def predict_images(path: str, data: str, out: str | None = None, top: int = 5, batch_size: int = 64,
                   workers: int = 0) -> dict[str, Any]:
    """Run the student of `path` on every image of `data` (see `data.open_images`),
    seen through its evaluation view, and write per image its path and the `top` most
    probable classes with their softmax probabilities, most probable first: to the file
    `out` (written whole at the end), a .jsonl or .csv, or else to stdout as JSON Lines,
    image by image. Returns a report: the student, the images, where they went."""
    if out is not None and Path(out).suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"--out {out} must be a .jsonl or a .csv file")
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give the name of the file to write")
    check_number("--top", top, 1)
    check_number("--batch-size", batch_size, 1)
    check_number("--workers", workers, 0)
    model, student = load_student(path)
    student.require_logits("predict classes")
    source = open_images(data)
    lines = _lines(predictions(model, student, source, top, batch_size, workers), out)
    if out is None:
        for line in lines:
            sys.stdout.write(line)
    else:
        write_local_atomic(Path(out), "".join(lines).encode())
    return {"student": str(student.path), "images": len(source), "top": top, "out": out}


def predictions(model: Normalized, student: StudentFile, source: Source, top: int, batch_size: int,
                workers: int) -> Iterator[dict[str, Any]]:
    """Per image of `source`, in index order: its path (`Source.name`), the `top` most
    probable classes of the student and their probabilities, most probable first."""
    names, view, device = student.class_names(), student.preprocessing, distributed.device()
    images = whole_images(source, view.input_size, workers, view.interpolation, view.crop_pct, "crop", batch_size)
    index = 0
    for logits, _ in outputs(model.to(device), images, device):
        probabilities, indices = logits.softmax(1).topk(min(top, len(names)), dim=1)
        for row, classes in zip(probabilities.tolist(), indices.tolist()):
            yield {"path": source.name(index), "classes": [names[c] for c in classes], "probabilities": row}
            index += 1


def _lines(rows: Iterable[dict[str, Any]], out: str | None) -> Iterator[str]:
    """The predictions as lines: CSV (path, class_1, probability_1, ...) for a .csv
    `out`, else JSON Lines (one object per image)."""
    if out is None or Path(out).suffix.lower() != ".csv":
        yield from (json.dumps(prediction) + "\n" for prediction in rows)
        return
    for number, prediction in enumerate(rows):
        pairs = list(zip(prediction["classes"], prediction["probabilities"]))
        if number == 0:
            yield _csv_line(["path"] + [f"{what}_{k}" for k in range(1, len(pairs) + 1)
                                        for what in ("class", "probability")])
        yield _csv_line([prediction["path"]] + [value for pair in pairs for value in pair])


def _csv_line(values: list) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()
