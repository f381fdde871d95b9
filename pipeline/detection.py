"""The detection stage: train a detector student on COCO-style data, alone or distilled
from detector teachers' neck features as in MTPD (Cao et al., ICML 2023), the teachers'
features read from their archives (cached) or computed live (online).

The views are the seeded, box-aware views of a detection recipe (`views.sample_view`
with `recipe.detection`): the same pure function of (seed, epoch, sample, view) that
cache-teacher rendered, the boxes each view shows derived from its parameters
(`replay.view_targets`). A step is the student's own detection loss on those boxes plus,
while a teacher teaches, `--neck-weight` times the sum over the neck's levels of the
mean squared error between the teacher's map and the student's, carried to the teacher's
channels by a 1 x 1 convolution per level (an adapter, trained with the student and
checkpointed, never exported). With `--schedule` the teachers take turns, one after the
other (MTPD's progressive distillation); `order-teachers` proposes the order. After each
epoch the student is scored on --val: COCO mAP, AP50 and AP75 of its detections on the
whole images (`evaluation.detection_metrics`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed
from .config import DETECTION_DEFAULTS, MAIN_TEACHER, ModelSpec, TrainSpec, ViewRecipe, absolute_path
from .data import RangeBatches, Source, ViewDataset, is_detection, open_source
from .deploy import STUDENT_FORMAT, read_student
from .detectors import Detector, build_detector
from .errors import ArchiveMismatchError, ConfigError, DataError, ModelError, TrainingError
from .evaluation import detection_metrics
from .features import align
from .host import keep_freed_memory, quiet_worker
from .models import accelerated
from .objective import scheduled_teacher
from .optim import make_optimizer, make_scheduler
from .progress import say, views_progress
from .replay import ReplayBatches, ViewBatches, open_archives
from .rundir import RunDir
from .store import ArchiveReader, check_archive_matches, teacher_archive
from .train import KEPT_VAL_BYTES, resolve_epochs, step_seed, update_of
from .views import detection_eval_view, render

BACKGROUND = "__background__"  # a detector's class 0: no object
NECK = "neck"  # a detector teacher's feature outputs are its neck's levels, named neck.LEVEL


def neck_module(level: str) -> str:
    """The feature-output name of the neck level `level` (torchvision's name: "0", "pool", "p6")."""
    return f"{NECK}.{level}"


def is_detection_data(data: str) -> bool:
    """Whether the data spec `data` names detection data (before opening it: `coco:...`)."""
    return data.startswith("coco:")


def detection_classes(source: Source) -> int:
    """A detector's class count for `source`: its categories and the background (class 0)."""
    return len(source.classes) + 1


class NeckTeacher:
    """A detector run for its neck features only: eval mode, inference mode; on a GPU,
    bf16 autocast. `with_features` gives the neck's maps by feature-output name
    (neck.LEVEL), the same interface a classifier `models.Teacher` gives cache-teacher,
    with no logits (an archive of a detector's features alone, codec `none`)."""

    outputs = "features"

    def __init__(self, spec: ModelSpec, num_classes: int, size: int, device: torch.device | None = None):
        self.spec, self.num_classes = spec, num_classes
        self.device = device or distributed.device()
        self.detector = build_detector(spec, num_classes, size).eval().to(self.device)
        self.preprocessing = self.detector.preprocessing
        self.fingerprint = self.detector.fingerprint
        self.feature_modules = {neck_module(level): neck_module(level) for level in self.detector.levels}
        self.shapes = {neck_module(level): shape for level, shape in self.detector.level_shapes.items()}

    def fingerprint_for(self, recorded) -> str:
        """This teacher's fingerprint as an archive records it (`models.Teacher.fingerprint_for`)."""
        return self.fingerprint

    def describe(self) -> dict:
        return {"spec": self.spec.to_dict(), "fingerprint": self.fingerprint, "num_classes": self.num_classes,
                "preprocessing": self.preprocessing.to_dict(), "outputs": self.outputs}

    def with_features(self, views: torch.Tensor,
                      batch_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """No logits ((views, 0)) and the float32 neck maps of a batch of [0, 1] views, by
        name; `batch_size` views per forward pass when given."""
        chunks = views.split(batch_size) if batch_size else (views,)
        maps: dict[str, list[torch.Tensor]] = {name: [] for name in self.feature_modules}
        with torch.inference_mode():
            for chunk in chunks:
                chunk = chunk.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=accelerated(self.device)):
                    neck = self.detector.neck(chunk)
                for level, value in neck.items():
                    maps[neck_module(level)].append(value.float())
        return views.new_zeros((len(views), 0)), {name: torch.cat(values) for name, values in maps.items()}


DETECTION_SIZE = 128  # default side of a detection view (the built-in detectors' input)


def detection_recipe(options: dict, epochs: int | None) -> ViewRecipe:
    """The detection recipe of `epochs` epochs of views that the command-line `options`
    give (`detection_options`), else DETECTION_SIZE pixels, flipped half the time."""
    return ViewRecipe.from_dict({"epochs": epochs, "size": DETECTION_SIZE, "flip_prob": 0.5} | detection_options(options))


def detection_options(options: dict, detection: dict | None = None) -> dict:
    """View-recipe options of the command line for a detection recipe: --scale is the zoom
    range of the views (`ViewRecipe.detection`, by default DETECTION_DEFAULTS or the
    `detection` given); --ratio, a classification crop's, is refused."""
    options = dict(options)
    if "ratio" in options:
        raise ConfigError("--ratio shapes a classification crop; a detection view is a square window (--scale: its zoom)")
    detection = dict(detection or DETECTION_DEFAULTS)
    if "scale" in options:
        detection["scale"] = tuple(options.pop("scale"))
    return options | {"detection": detection}


@dataclass(frozen=True)
class DetectionRun:
    """Everything a detection run needs, resolved and checked before the first step: the
    resolved spec (recipe and class count filled in), the data, each cached teacher's
    archive by name (cached) or the live teacher (online), and the neck maps each teacher
    gives, (C, H, W) by feature-output name."""

    spec: TrainSpec
    source: Source
    val_source: Source | None
    archives: dict[str, str]
    teacher: NeckTeacher | None
    teacher_maps: dict[str, dict[str, tuple[int, ...]]]
    inputs: dict

    def teacher_at(self, epoch: int) -> str | None:
        """The teacher that teaches in `epoch`: the schedule's, or the only one; None alone."""
        if self.spec.mode == "supervised":
            return None
        return scheduled_teacher(self.spec.schedule, epoch) if self.spec.schedule else next(iter(self.teacher_maps))


def resolve_detection(spec: TrainSpec, recipe_options: dict) -> DetectionRun:
    """Open the data and the archives, decide the recipe, the teachers and the classes,
    and refuse anything that does not fit, before anything is written."""
    source = open_source(spec.data)
    if not is_detection(source):
        raise DataError(f"{spec.data} is classification data; a detector student trains on COCO detection data "
                        "(--data coco:ANNOTATIONS.json)")
    val_source = open_source(spec.val) if spec.val else None
    if val_source is not None and (not is_detection(val_source) or val_source.classes != source.classes):
        raise DataError(f"validation data {spec.val} must be COCO detection data with the categories of {spec.data}")
    _refuse_classifier_options(spec)
    archives, readers = open_archives(spec)
    if len(readers) > 1 and not spec.schedule:
        raise ConfigError("a detector student learns from one teacher at a time: give --schedule NAME:EPOCHS,...")
    spec = replace(spec, epochs=resolve_epochs(spec, readers))
    classes = detection_classes(source)
    recipe, teacher, maps = _recipe_and_teachers(spec, recipe_options, source, readers, classes)
    student = spec.student if spec.student.num_classes is not None else replace(spec.student, num_classes=classes)
    if student.num_classes != classes:
        raise ConfigError(f"the student has {student.num_classes} classes; a detector for the {classes - 1} "
                          f"categories of {spec.data} has {classes} (the background is class 0): drop --num-classes")
    spec = replace(spec, student=student, recipe=recipe, data=source.describe()["location"], out=absolute_path(spec.out),
                   cache=absolute_path(spec.cache), val=val_source.describe()["location"] if val_source else None)
    inputs = {"dataset": source.describe()["fingerprint"],
              "archives": {name: reader.manifest.manifest_fingerprint for name, reader in readers.items()}}
    return DetectionRun(spec, source, val_source, archives, teacher, maps, inputs)


NECK_WEIGHT = 1.0  # --neck-weight when not given


def _refuse_classifier_options(spec: TrainSpec) -> None:
    """Refuse, in one line, the options of a classifier's run that a detector's would
    silently ignore (each compared with its default)."""
    defaults = TrainSpec(data=spec.data, student=spec.student, out=spec.out, mode="supervised")
    given = [option for option, name in CLASSIFIER_OPTIONS.items() if getattr(spec, name) != getattr(defaults, name)]
    if spec.teacher is not None and spec.mode == "cached":
        given.append("--teacher (with --cache: the archive records its teachers)")
    if given:
        raise ConfigError(f"{given[0]} is an option of a classifier student; a detector student (COCO --data) learns "
                          "from its boxes and its teachers' necks (--neck-weight): drop it")


# train-student's options that only a classifier student uses, by flag: TrainSpec field
CLASSIFIER_OPTIONS = {"--feature": "features", "--loss": "loss", "--loss-option": "loss_options", "--alpha": "alpha",
                      "--temperature": "temperature", "--student-size": "student_size", "--combine": "combine",
                      "--label-smoothing": "label_smoothing", "--ema": "ema", "--compile": "compile",
                      "--probe-data": "probe_data", "--teacher-batch-size": "teacher_batch_size",
                      "--precise-bn": "precise_bn"}


def _recipe_and_teachers(spec: TrainSpec, recipe_options: dict, source: Source, readers: dict[str, ArchiveReader],
                         classes: int) -> tuple[ViewRecipe, NeckTeacher | None, dict[str, dict[str, tuple]]]:
    """The view recipe (the archive's in cached mode, where options given must agree), the
    live teacher (online) and each teacher's neck maps by feature-output name."""
    if not readers:
        recipe = detection_recipe(recipe_options, spec.epochs)
        if spec.mode == "supervised":
            return recipe, None, {}
        teacher = NeckTeacher(spec.teacher, classes, recipe.size)
        return recipe, teacher, {"online": teacher.shapes}
    fingerprint = source.describe()["fingerprint"]
    recipe = next(iter(readers.values())).manifest.recipe
    # options given must agree with the archive's recipe (read through ViewRecipe, so a default reads as its JSON)
    given = ViewRecipe.from_dict(recipe.to_dict() | detection_options(recipe_options, recipe.detection)).to_dict()
    for name, reader in readers.items():
        where, manifest = teacher_archive(spec.cache, name), reader.manifest
        if manifest.teacher.outputs != "features" or manifest.recipe.detection is None:
            raise ArchiveMismatchError(f"archive {where} holds a classifier's outputs; a detector student learns "
                                       "from an archive of a detector teacher's neck features")
        check_archive_matches(manifest, where, dataset__fingerprint=fingerprint, recipe=given)
    if spec.epochs > recipe.epochs and not spec.cycle_epochs:
        raise ArchiveMismatchError(f"archive {spec.cache} holds {recipe.epochs} epochs of views but --epochs is "
                                   f"{spec.epochs}; cache more epochs, or pass --cycle-epochs to replay them in a cycle")
    maps = {name: {feature.module: feature.decoded_shape for feature in reader.manifest.features
                   if feature.module.startswith(NECK + ".")} for name, reader in readers.items()}
    empty = [name for name, held in maps.items() if not held]
    if empty:
        raise ArchiveMismatchError(f"archive {teacher_archive(spec.cache, empty[0])} holds no neck features; "
                                   "cache them with cache-teacher on the detection data")
    return recipe, None, maps


@dataclass
class DetectionLearner:
    """The student detector, the adapters that carry its neck maps to each teacher's
    channels (by teacher name, then feature-output name), and what updates them."""

    student: Detector
    adapters: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    pairs: dict[str, dict[str, str]]  # by teacher: the teacher's map -> the student's level it is matched with


def make_detection_learner(run: DetectionRun, device: torch.device) -> DetectionLearner:
    """The student and, for each teacher, a 1 x 1 adapter per neck level: the student's
    levels are matched with the teacher's in order (MTPD's FPN to FPN), so both necks
    must have as many levels."""
    spec = run.spec
    student = build_detector(spec.student, spec.student.num_classes, spec.recipe.size, seed=spec.seed).to(device)
    adapters, pairs = nn.ModuleDict(), {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for name, maps in run.teacher_maps.items():
            if len(maps) != len(student.levels):
                raise ConfigError(f"teacher {name}'s neck has {len(maps)} levels ({', '.join(maps)}) and the student's "
                                  f"{len(student.levels)} ({', '.join(student.levels)}); MTPD matches necks level for "
                                  "level: choose a student with as many")
            pairs[name] = dict(zip(maps, student.levels))
            adapters[adapter_key(name)] = nn.ModuleDict({
                adapter_key(level): nn.Conv2d(student.level_shapes[level][0], maps[module][0], kernel_size=1)
                for module, level in pairs[name].items()})
    adapters.to(device)
    optimizer = make_optimizer(spec, nn.ModuleList([student, adapters]))
    scheduler = make_scheduler(spec, optimizer, len(run.source))
    return DetectionLearner(student, adapters, optimizer, scheduler, device, pairs)


def adapter_key(name: str) -> str:
    """A teacher's or a level's name as a key of the adapters' ModuleDict, which refuses
    "." (a teacher may be called fcos.r50): ":", which no such name holds, in its place."""
    return name.replace(".", ":")


def neck_matching(student_maps: dict[str, torch.Tensor], teacher_maps: dict[str, torch.Tensor],
                  adapters: nn.ModuleDict, pairs: dict[str, str]) -> torch.Tensor:
    """MTPD's feature term: the sum over the neck's levels of the mean squared error
    between the teacher's map and the student's carried to its channels by the level's
    1 x 1 adapter (and to its spatial size by `features.align` where they differ)."""
    total = 0.0
    for module, level in pairs.items():
        adapted = adapters[adapter_key(level)](student_maps[level].float())
        target = teacher_maps[module]
        total = total + nn.functional.mse_loss(align(adapted, target.shape[-2:]), target)
    return total


def detection_step(run: DetectionRun, learner: DetectionLearner, batch: dict, epoch: int, step: int,
                   weight: float, update: bool = True) -> dict[str, torch.Tensor]:
    """One batch: the student's detection loss on the boxes its views show, plus the neck
    term of the epoch's teacher; then with `update` the optimizer step. Returns the named
    terms (torchvision's loss names, `neck`, and their weighted sum `loss`)."""
    spec, device = run.spec, learner.device
    torch.manual_seed(step_seed(spec.seed, epoch, step, 0))  # as train_step: a pure function of the step
    images = batch["views"].flatten(0, 1).to(device, non_blocking=True)
    targets = [{key: value.to(device) for key, value in target.items()} for target in batch["targets"]]
    learner.student.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device)):
        losses, student_maps = learner.student.losses(images, targets)
    terms = dict(losses)
    loss = sum(losses.values())
    teacher = run.teacher_at(epoch)
    neck_weight = NECK_WEIGHT if spec.neck_weight is None else spec.neck_weight
    if teacher is not None and neck_weight > 0:
        if spec.mode == "cached":
            maps = {module: slab.flatten(0, 1).to(device, non_blocking=True)
                    for module, slab in batch["teacher_features"][teacher].items()}
        else:
            maps = {module: value.clone() for module, value in run.teacher.with_features(images)[1].items()}
        terms["neck"] = neck_matching(student_maps, maps, learner.adapters[adapter_key(teacher)], learner.pairs[teacher])
        loss = loss + neck_weight * terms["neck"]
    terms["loss"] = loss
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                            "lower --lr or check the data and teacher")
    (loss * weight).backward()
    if update:
        parameters = [*learner.student.parameters(), *learner.adapters.parameters()]
        if spec.clip_norm:
            torch.nn.utils.clip_grad_norm_(parameters, spec.clip_norm)
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scheduler.step()
    return {name: value.detach() for name, value in terms.items()}


def train_detector(spec: TrainSpec, recipe_options: dict | None = None, resume: bool = False,
                   options: dict | None = None) -> dict:
    """Train a detector student as `spec` says, writing into `spec.out` what a classifier's
    run writes (student.pt, metrics.jsonl, summary.json, config.json, checkpoint.pt,
    options.yaml); the summary and metrics give val_map, val_map50 and val_map75."""
    started = time.perf_counter()
    keep_freed_memory()
    if distributed.ranks().world > 1:
        raise ConfigError("detection training runs in one process for now: run it without torchrun")
    run = resolve_detection(spec, recipe_options or {})
    device = distributed.device()
    learner = make_detection_learner(run, device)
    rundir, config = RunDir(run.spec.out), run.spec.to_dict() | {"inputs": run.inputs}
    checkpoint = rundir.prepare(config, resume)
    if options is not None:
        rundir.save_options(options)
    try:
        start_epoch, last = _restore(learner, checkpoint, run.spec.out)
        rundir.keep_metrics_until(start_epoch)
        train_seconds, last = _train_epochs(run, learner, rundir, config, start_epoch, last)
        views = (run.spec.epochs - start_epoch) * len(run.source) * run.spec.recipe.views_per_sample
        summary = {"task": "detection", "mode": run.spec.mode, "epochs": run.spec.epochs,
                   "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
                   "views_per_sec": views / train_seconds if train_seconds else None,
                   "student": run.spec.student.name, "classes": run.source.classes, "run_dir": str(run.spec.out),
                   "ranks": 1} | last
        rundir.finish(detector_file(run, learner.student), summary)
        return summary
    finally:
        rundir.release()


def _train_epochs(run: DetectionRun, learner: DetectionLearner, rundir: RunDir, config: dict, start_epoch: int,
                  last: dict) -> tuple[float, dict]:
    """The epochs left to train, each followed by its scores, metrics line and checkpoint;
    returns the seconds spent training and the last scores."""
    spec, num_samples = run.spec, len(run.source)
    views, steps = spec.recipe.views_per_sample, math.ceil(num_samples / spec.batch_size)
    score = _scorer(run, learner.device)
    batches = iter(_loader(run, start_epoch))
    train_seconds = 0.0
    with views_progress() as progress:
        for epoch in range(start_epoch, spec.epochs):
            epoch_started, sums = time.perf_counter(), {}
            task = progress.add_task(f"epoch {epoch + 1}/{spec.epochs}", total=num_samples * views)
            for step in range(steps):
                batch = next(batches)
                count = len(batch["index"])
                update_count, last = update_of(step, spec, num_samples)
                terms = detection_step(run, learner, batch, epoch, step, count / update_count, update=last)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.item() * count
                progress.advance(task, count * views)
            progress.remove_task(task)
            seconds = time.perf_counter() - epoch_started
            train_seconds += seconds
            last = score(learner.student) if score is not None else {}
            teacher = run.teacher_at(epoch)
            record = {"epoch": epoch + 1} | {name: value / num_samples for name, value in sorted(sums.items())}
            if teacher is not None:
                record["teacher"] = teacher
            rundir.append_metrics(record | last | {"seconds": seconds, "views_per_sec": num_samples * views / seconds})
            rundir.save_checkpoint({"model": learner.student.net.state_dict(), "adapters": learner.adapters.state_dict(),
                                    "optimizer": learner.optimizer.state_dict(),
                                    "scheduler": learner.scheduler.state_dict(), "epoch": epoch, "last": last,
                                    "config": config})
            shown = "".join(f"  {key} {last[key]:.2f}" for key in ("val_map", "val_map50") if key in last)
            say(f"[{spec.mode}{'' if teacher in (None, 'online', MAIN_TEACHER) else ' ' + teacher}] epoch "
                f"{epoch + 1}/{spec.epochs}  loss {record['loss']:.4f}{shown}  {num_samples * views / seconds:,.0f} views/s")
    return train_seconds, last


def _restore(learner: DetectionLearner, checkpoint: dict | None, out: str) -> tuple[int, dict]:
    """Load a resumed run's state; returns the first epoch to train and the last scores."""
    if checkpoint is None:
        return 0, {}
    learner.student.net.load_state_dict(checkpoint["model"])
    learner.adapters.load_state_dict(checkpoint["adapters"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    learner.scheduler.load_state_dict(checkpoint["scheduler"])
    say(f"resuming {out} after epoch {checkpoint['epoch'] + 1}")
    return checkpoint["epoch"] + 1, checkpoint["last"]


def _loader(run: DetectionRun, start_epoch: int) -> DataLoader:
    """Batches of the epochs still to train, in training order, with their targets (and
    in cached mode each scheduled teacher's neck maps)."""
    spec, recipe, num_samples = run.spec, run.spec.recipe, len(run.source)
    ranges = [(epoch % recipe.epochs, 0, num_samples) for epoch in range(start_epoch, spec.epochs)]
    views = ViewDataset(run.source, recipe)
    if spec.mode == "cached":
        dataset = ReplayBatches(views, run.archives, spec.storage_options, spec.local_cache,
                                {name: tuple(maps) for name, maps in run.teacher_maps.items()})
    else:
        dataset = ViewBatches(views)
    return DataLoader(dataset, sampler=RangeBatches(ranges, num_samples, spec.batch_size), batch_size=None,
                      num_workers=spec.workers, worker_init_fn=quiet_worker)


def eval_batches(source: Source, size: int, interpolation: str = "bilinear",
                 batch_size: int = 64) -> Iterator[tuple[torch.Tensor, list[float], range]]:
    """The images of `source` in order, `batch_size` at a time, as their detection
    evaluation views (`views.detection_eval_view`: the whole image, its longer side
    filling `size`, padded below and to the right), with the factor from view pixels
    back to each image's, and the batch's sample indices."""
    for start in range(0, len(source), batch_size):
        indices = range(start, min(start + batch_size, len(source)))
        images, factors = [], []
        for index in indices:
            image = source.load(index)
            params = detection_eval_view((image.shape[1], image.shape[2]))
            images.append(render(image, params, size, interpolation))
            factors.append(params.width / size)
        yield torch.stack(images), factors, indices


def score_detector(detector: Detector, source: Source, batches: Iterable, device: torch.device) -> dict[str, float]:
    """COCO mAP, AP50 and AP75 (%) of `detector` on the images of `batches` (`eval_batches`
    of `source`), its boxes taken back to image pixels and scored against the annotations
    (crowd boxes as crowd)."""
    detector.eval()
    predictions, targets = [], []
    for images, factors, indices in batches:
        for prediction, factor in zip(detector.predict(images.to(device)), factors):
            prediction = {key: value.cpu() for key, value in prediction.items()}
            predictions.append(prediction | {"boxes": prediction["boxes"] * factor})
        targets.extend(source.targets(index) for index in indices)
    metrics = detection_metrics(predictions, targets)
    return {"val_map": metrics["map"], "val_map50": metrics["map_50"], "val_map75": metrics["map_75"]}


def _scorer(run: DetectionRun, device: torch.device):
    """How the student is scored after each epoch; None without --val. The validation
    views are rendered once and kept when they fit in KEPT_VAL_BYTES, else each time."""
    if run.val_source is None:
        return None
    size, interpolation = run.spec.recipe.size, run.spec.recipe.interpolation
    batches = lambda: eval_batches(run.val_source, size, interpolation)  # noqa: E731 - rendered afresh each epoch
    if len(run.val_source) * 3 * size * size * 4 <= KEPT_VAL_BYTES:
        kept = list(batches())
        batches = lambda: kept  # noqa: E731
    return lambda detector: score_detector(detector, run.val_source, batches(), device)


def detector_file(run: DetectionRun, detector: Detector) -> dict:
    """What a detector student's student.pt holds: its network's state_dict under "model",
    the model spec (its class count), its class names (the background, then the categories) and
    the preprocessing (`kdpipe eval` renders the evaluation views at its input size)."""
    spec = run.spec
    prep = replace(detector.preprocessing, interpolation=spec.recipe.interpolation, input_size=spec.recipe.size)
    return {"format": STUDENT_FORMAT, "model": detector.net.state_dict(),
            "spec": replace(spec.student, weights=None, pretrained=None).to_dict(), "outputs": "detections",
            "classes": [BACKGROUND, *run.source.classes], "preprocessing": prep.to_dict()}


def evaluate_detector(model: ModelSpec | str, data: str, size: int | None = None, batch_size: int = 64,
                      interpolation: str | None = None) -> dict:
    """`kdpipe eval` of a detector on COCO data: a kdpipe detector student (a run
    directory or student file, which brings its weights, categories and view size) or a
    detector by name with its weights; COCO mAP, AP50 and AP75 (%) on the whole images."""
    source = open_source(data)
    if not is_detection(source):
        raise DataError(f"{data} is not detection data; a detector is scored on COCO data (coco:ANNOTATIONS.json)")
    classes = detection_classes(source)
    if isinstance(model, str):
        student = read_student(model)
        if student.outputs != "detections":
            raise ModelError(f"{student.path} holds a classifier; evaluate it on class folders, not on COCO data")
        if student.classes is not None and student.classes != [BACKGROUND, *source.classes]:
            raise DataError(f"{student.path} detects the categories {', '.join(student.classes[1:])}, and {data} has "
                            f"{', '.join(source.classes)}: evaluate it on data of its categories")
        spec, size = student.spec, size or student.preprocessing.input_size
        interpolation = interpolation or student.preprocessing.interpolation  # the views it was scored on
    else:
        spec, size = model, size or DETECTION_SIZE
    if spec.num_classes not in (None, classes):
        raise ConfigError(f"the model has {spec.num_classes} classes; a detector for the {classes - 1} categories of "
                          f"{data} has {classes} (the background is class 0)")
    detector = build_detector(replace(spec, num_classes=classes), classes, size)
    batches = eval_batches(source, size, interpolation or "bilinear", batch_size)
    scores = score_detector(detector, source, batches, torch.device("cpu"))
    return {"model": spec.name, "weights": spec.weights or spec.pretrained, "data": source.describe()["location"],
            "images": len(source), "categories": len(source.classes), "size": size,
            "interpolation": interpolation or "bilinear",
            "map": scores["val_map"], "map_50": scores["val_map50"], "map_75": scores["val_map75"]}


def format_detection_eval(report: dict) -> str:
    """The report of `evaluate_detector` as two lines of text."""
    return (f"{report['model']} on {report['images']} images of {report['categories']} categories ({report['data']})\n"
            f"  view: whole image, longer side {report['size']} px ({report['interpolation']})   mAP {report['map']:.2f}   "
            f"AP50 {report['map_50']:.2f}   AP75 {report['map_75']:.2f}")
