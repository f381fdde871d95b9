"""The train-student stage: one loop, three modes.

- cached:     the teacher's logits come from an archive, read as contiguous slabs in
              training order, while the student renders the very views they were
              computed on (checked view by view against the stored parameters; `replay`);
- online:     the teacher runs live on the same views (same recipe, seed and order);
- supervised: cross-entropy on labels only, the baseline.

Everything a run needs is resolved and checked once, up front, into a `Run`
(`resolve_run`); `train_step` takes one batch and returns the named loss terms
(`objective`, with the feature terms of --feature from `features`); `train_student` is
the loop: steps, then per epoch the evaluation, the metrics line and the checkpoint (`rundir`). AdamW with cosine decay and gradient-norm
clipping at 1.0 as in Beyer et al. (2022) by default; warmup, SGD, an EMA of the weights
and gradient accumulation on request (`optim`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed
from .config import DEFAULT_EPOCHS, MAIN_TEACHER, ModelSpec, TrainSpec, absolute_path
from .data import RangeBatches, Source, ViewDataset, is_detection, open_source
from .errors import ConfigError, DataError, KdpipeError, ModelError, TrainingError
from .deploy import STUDENT_FORMAT
from .detectors import refuse_detector
from .evaluation import classification_metrics
from .host import keep_freed_memory, quiet_worker
from .features import FeatureDistillation, teacher_feature_shapes
from .losses import check_loss_options, get_feature_loss
from .models import Normalized, Teacher, accelerated, build_model, output_classes, preprocessing, with_num_classes
from .objective import Objective, make_loss
from .optim import WeightAverage, make_optimizer, make_scheduler
from .precise_bn import batch_norms, recompute_batch_norm, sample_views
from .probe import features, linear_probe, whole_images
from .progress import say, views_progress
from .replay import ReplayBatches, ViewBatches, cached_feature_shapes, check_archives, open_archives, resolve_recipe
from .rundir import BEST, RunDir
from .store import ArchiveReader, TeacherInfo


@dataclass(frozen=True)
class Run:
    """Everything a train-student run needs, resolved and checked before the first step.

    `spec` is the resolved one (the student's class count and the view recipe filled in;
    it is what config.json records). In cached mode `archives` names each teacher's
    archive; in online mode `teacher` is the live teacher. `embeddings` is SEED's case:
    the student learns the teacher's embedding and is scored by a linear probe fitted on
    `probe_source`. `classes` names the student's outputs in order (None when nothing
    names them); `inputs` pins what the run trains on (the dataset's fingerprint and each
    archive's manifest fingerprint), so a resumed run refuses anything else.
    `archived_teachers` names, in cached mode, each teacher of all the student's classes
    with its model spec and what its archive records of it (for agreement on --val)."""

    spec: TrainSpec
    source: Source
    val_source: Source | None
    probe_source: Source | None
    archives: dict[str, str]
    teacher: Teacher | None
    objective: Objective
    embeddings: bool
    classes: list[str] | None
    inputs: dict
    archived_teachers: dict[str, tuple[ModelSpec, TeacherInfo]] = field(default_factory=dict)
    feature_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # cached mode: the archive's, by module

    @property
    def student_size(self) -> int:
        return self.spec.student_size or self.spec.recipe.size


def resolve_run(spec: TrainSpec, recipe_options: dict) -> Run:
    """Open the data and the archives, decide the recipe, the teacher, the classes and
    the loss, and refuse anything that does not fit together, before anything is written."""
    check_loss_options(spec.loss, spec.loss_options)
    for feature in spec.features:
        get_feature_loss(feature.loss, feature.options)
    for role, model in (("student", spec.student), ("teacher", spec.teacher)):
        if model is not None:
            refuse_detector(model, role)
    source = open_source(spec.data)
    if is_detection(source):
        raise DataError(f"{spec.data} is detection data, which a classifier cannot learn: train a detector on it "
                        "(train-student --data coco:... --student kdpipe:det-small, or torchvision:NAME of a detector)")
    if spec.neck_weight is not None:
        raise ConfigError("--neck-weight weighs a detector student's neck term: drop it for a classifier")
    val_source = open_source(spec.val) if spec.val else None
    for option, other in (("--val", val_source), ("--probe-data", open_source(spec.probe_data) if spec.probe_data else None)):
        if other is not None and is_detection(other):
            raise DataError(f"{option} {other.describe()['location']} is detection data; a classifier is scored on "
                            "class folders")
    archives, readers = open_archives(spec)
    spec = replace(spec, epochs=resolve_epochs(spec, readers))
    recipe = resolve_recipe(spec, recipe_options, next(iter(readers.values()), None))
    teacher, columns, classes = None, {}, source.classes
    if spec.mode == "cached":
        num_classes, columns, classes = check_archives(spec, source, recipe, readers)
    elif spec.mode == "online":  # SEED online distils the penultimate features
        teacher = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), recipe.size,
                          embedding="" if spec.loss == "seed" else None,
                          features=tuple(dict.fromkeys(feature.teacher_module for feature in spec.features)))
        num_classes = teacher.num_classes
    elif source.classes is None:
        raise DataError(f"supervised training needs labelled data, but {spec.data} has no class folders")
    else:
        num_classes = len(source.classes)
    if spec.mode != "supervised" and source.classes is None and (spec.alpha > 0 or spec.loss == "dkd"):
        needs = f"--alpha {spec.alpha}" if spec.alpha > 0 else "--loss dkd"
        raise DataError(f"{needs} needs labels, but {spec.data} has no class folders; use --alpha 0 and another --loss")
    embeddings = spec.loss == "seed"
    student = _student_spec(spec.student, source, num_classes, embeddings)
    probe_source = None
    if embeddings:
        probe_source = open_source(spec.probe_data) if spec.probe_data else source
        if val_source is not None and probe_source.classes is None:
            raise DataError(f"a SEED student is scored by a linear probe fitted on labelled images, but {spec.data} "
                            "has no class folders: pass --probe-data")
    if val_source is not None and val_source.classes is None:
        raise DataError(f"validation data {spec.val} has no class folders, so it cannot be scored")
    if val_source is not None and source.classes is not None and val_source.classes != source.classes:
        raise DataError(f"the class folders of {spec.val} differ from those of {spec.data}")
    if val_source is not None and not embeddings and classes is not None and val_source.classes != classes:
        raise DataError(f"the class folders of {spec.val} ({', '.join(val_source.classes)}) are not the student's "
                        f"classes in order ({', '.join(classes)})")
    distill = None if spec.mode == "supervised" else make_loss(spec.loss, spec.loss_options, spec.temperature)
    if spec.label_smoothing and spec.mode != "supervised" and spec.alpha == 0:
        raise ConfigError("--label-smoothing smooths the cross-entropy on labels, which --alpha 0 leaves out; "
                          "give --alpha above 0, or drop --label-smoothing")
    objective = Objective(distill, spec.loss, spec.alpha, spec.temperature, spec.schedule, columns,
                          spec.label_smoothing, {feature.name: feature.weight for feature in spec.features})
    spec = replace(spec, student=student, recipe=recipe)
    spec = replace(spec, **_resolved_paths(spec, source, val_source, probe_source))
    inputs = {"dataset": source.describe()["fingerprint"],
              "archives": {name: reader.manifest.manifest_fingerprint for name, reader in readers.items()}}
    archived = {name: (spec.teacher or ModelSpec.from_dict(reader.manifest.teacher.spec), reader.manifest.teacher)
                for name, reader in readers.items() if columns.get(name) is None and not embeddings}
    return Run(spec, source, val_source, probe_source, archives, teacher, objective, embeddings,
               None if embeddings else classes, inputs, archived, cached_feature_shapes(spec, readers))


def resolve_epochs(spec: TrainSpec, readers: dict[str, ArchiveReader]) -> int:
    """The epochs to train: --epochs, else the schedule's sum, else the archive's epochs
    of views (every cached view once), else DEFAULT_EPOCHS."""
    if spec.epochs is not None:
        return spec.epochs
    if spec.schedule:
        return sum(epochs for _, epochs in spec.schedule)
    if readers:
        return min(reader.manifest.recipe.epochs for reader in readers.values())
    return DEFAULT_EPOCHS


def _resolved_paths(spec: TrainSpec, source: Source, val_source: Source | None, probe_source: Source | None) -> dict:
    """The run's places as absolute paths (URLs unchanged), so that config.json says where
    the inputs were whatever the working folder, and a run resumed from another folder,
    or with a path written another way, compares equal."""
    paths = {"data": source.describe()["location"], "out": absolute_path(spec.out), "cache": absolute_path(spec.cache),
             "val": val_source.describe()["location"] if val_source else None}
    if spec.probe_data:
        paths["probe_data"] = probe_source.describe()["location"]
    for role in ("student", "teacher"):
        model = getattr(spec, role)
        if model is not None and model.weights:
            paths[role] = replace(model, weights=absolute_path(model.weights))
    return paths


def _student_spec(student: ModelSpec, source: Source, num_classes: int, embeddings: bool) -> ModelSpec:
    """The student with its class count: the teacher's (or the labels') by default. A SEED
    student's outputs are an embedding of the teacher's width."""
    if student.num_classes is None:
        student = replace(student, num_classes=num_classes)
    if embeddings:
        if student.num_classes != num_classes:
            raise ConfigError(f"the student gives {student.num_classes} outputs but the teacher's embeddings "
                              f"have {num_classes}; drop --num-classes")
        return student
    student = with_num_classes(student, source.classes, "student")
    if student.num_classes != num_classes:
        raise ConfigError(f"the student has {student.num_classes} classes but the teacher has {num_classes}")
    return student


@dataclass
class Learner:
    """The student and what updates it. `student` holds the weights that are saved;
    `model` is what a step runs (DDP over ranks, compiled on request); `ema` is the
    moving average of the student's weights with --ema; `features` taps the student for
    --feature and holds the connectors that train with it (checkpointed, never exported)."""

    student: Normalized
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    rank: int
    ema: WeightAverage | None = None
    features: FeatureDistillation | None = None

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the student's parameters, then the connectors'."""
        connectors = [] if self.features is None else list(self.features.parameters())
        return [*self.student.parameters(), *connectors]


def make_learner(run: Run, device: torch.device, ranks: distributed.Ranks) -> Learner:
    spec = run.spec
    student = build_model(spec.student, seed=spec.seed).to(device)
    outputs = output_classes(student, run.student_size, "student")
    if outputs != spec.student.num_classes:
        raise ModelError(f"the student {spec.student.name} gives {outputs} outputs, not {spec.student.num_classes}")
    if accelerated(device):
        student = student.to(memory_format=torch.channels_last)
    features = None
    if spec.features:
        shapes = run.feature_shapes or teacher_feature_shapes(run.teacher, spec.recipe.size)
        features = FeatureDistillation.build(spec.features, student, run.student_size, shapes, spec.seed)
        if ranks.world > 1 and features.connectors:
            raise ConfigError("--feature hint trains a connector, which kdpipe keeps on one process only for now: "
                              "run it without torchrun, or use at, sp or rkd")
    optimizer = make_optimizer(spec, student if features is None else nn.ModuleList([student, features]))
    scheduler = make_scheduler(spec, optimizer, len(run.source))
    ema = WeightAverage(student, spec.ema) if spec.ema else None
    model = student
    if ranks.world > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if spec.compile:
        model = torch.compile(model)
    return Learner(student, model, optimizer, scheduler, device, ranks.rank, ema, features)


def train_step(run: Run, learner: Learner, batch: dict, epoch: int, step: int, weight: float,
               update: bool = True) -> dict[str, torch.Tensor]:
    """Forward and backward passes on one batch, then with `update` the optimizer step
    (with --accumulate, the gradients of several batches are summed first); returns the
    named loss terms. `weight` scales this rank's mean loss so that the gradients summed
    over the batches of one update and averaged over ranks by DDP are those of the mean
    over all their samples."""
    device, views = learner.device, run.spec.recipe.views_per_sample
    # every random layer (dropout, stochastic depth) draws from a generator seeded by the
    # step itself, so a resumed run, an online run and a cached run draw alike
    torch.manual_seed(step_seed(run.spec.seed, epoch, step, learner.rank))
    images = _to_device(batch["views"].flatten(0, 1), device)
    labels = batch["label"].repeat_interleave(views).to(device)
    mixing = None
    if run.spec.recipe.mixup:
        mixing = (batch["partner_label"].repeat_interleave(views).to(device), batch["lam"].flatten().to(device))
    teacher_logits, teacher_features = None, {}
    if run.spec.mode == "cached":
        teacher_logits = {name: slab.flatten(0, 1).to(device, non_blocking=True)
                          for name, slab in batch["teacher_logits"].items()}
        teacher_features = {module: slab.flatten(0, 1).to(device, non_blocking=True)
                            for module, slab in batch["teacher_features"].get(MAIN_TEACHER, {}).items()}
    elif run.spec.mode == "online":
        teacher_views = _to_device(batch["teacher_views"].flatten(0, 1), device) if "teacher_views" in batch else images
        logits, teacher_features = run.teacher.with_features(teacher_views, run.spec.teacher_batch_size)
        teacher_logits = {"online": logits.clone()}  # leave inference mode
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device)):
        student_logits = learner.model(images)
    features = None if learner.features is None else learner.features(learner.features.student_features(),
                                                                       teacher_features)
    terms = run.objective.terms(student_logits, teacher_logits, labels, mixing, epoch, features)
    if not torch.isfinite(terms["loss"]):
        raise TrainingError(f"the loss became {terms['loss'].item()} at epoch {epoch + 1}, step {step + 1}; "
                            "lower --lr or check the data and teacher")
    with learner.model.no_sync() if not update and hasattr(learner.model, "no_sync") else contextlib.nullcontext():
        (terms["loss"] * weight).backward()  # DDP averages the gradients over ranks once per update
    if update:
        if run.spec.clip_norm:
            torch.nn.utils.clip_grad_norm_(learner.parameters(), run.spec.clip_norm)
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scheduler.step()
        if learner.ema is not None:
            learner.ema.update(learner.student)
    return terms


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of torch's generators for one step of one rank: a pure function of those
    integers (as views are), never of what ran before."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Standing:
    """The run's scores so far, carried in its checkpoint: the last evaluation's
    figures, and the best val_top1 and its epoch (whose weights are student_best.pt)."""

    last: dict = field(default_factory=dict)
    best_val_top1: float | None = None
    best_epoch: int | None = None

    def improved_by(self, scores: dict, epoch: int) -> bool:
        """Take an epoch's scores; True when its val_top1 is the best so far."""
        self.last = scores
        top1 = scores.get("val_top1")
        if top1 is None or (self.best_val_top1 is not None and top1 <= self.best_val_top1):
            return False
        self.best_val_top1, self.best_epoch = top1, epoch + 1
        return True


def train_student(spec: TrainSpec, recipe_options: dict | None = None, resume: bool = False,
                  options: dict | None = None) -> dict:
    """Train a student as `spec` says, writing student.pt (with --val student_best.pt,
    with --ema student_ema.pt), metrics.jsonl, summary.json, config.json and an epoch
    checkpoint into `spec.out`; `options`, the command's options as given, are saved as
    options.yaml (a --config that runs it again). Returns the summary."""
    started = time.perf_counter()
    keep_freed_memory()
    run = resolve_run(spec, recipe_options or {})
    ranks, device = distributed.ranks(), distributed.device()
    distributed.check_batches(run.spec.batch_size, len(run.source), ranks.world)
    learner = make_learner(run, device, ranks)
    # Rank 0 owns the run directory; the other ranks get its checkpoint from it (their
    # machines may not see the folder).
    rundir, config = RunDir(run.spec.out), run.spec.to_dict() | {"inputs": run.inputs}
    checkpoint = distributed.broadcast(rundir.prepare(config, resume) if ranks.main else None)
    if ranks.main and options is not None:
        rundir.save_options(options)
    try:
        start_epoch, standing = _restore(learner, run.objective, checkpoint, run.spec.out)
        if ranks.main:
            rundir.keep_metrics_until(start_epoch)
        train_seconds = _train_epochs(run, learner, rundir, config, start_epoch, standing)
        # save the weights, then the summary that marks the run finished
        train_views = (run.spec.epochs - start_epoch) * len(run.source) * run.spec.recipe.views_per_sample
        last = dict(standing.last)
        summary = {
            "mode": run.spec.mode, "val_top1": last.pop("val_top1", None), "epochs": run.spec.epochs,
            "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
            "views_per_sec": train_views / train_seconds if train_seconds else None,
            "student": run.spec.student.name, "classes": run.classes, "run_dir": str(run.spec.out),
            "ranks": ranks.world,
        } | last | {"best_val_top1": standing.best_val_top1, "best_epoch": standing.best_epoch}
        if ranks.main:
            ema = None if learner.ema is None else student_file(run, learner.ema.model.net.state_dict())
            rundir.finish(student_file(run, learner.student.net.state_dict()), summary, ema)
        distributed.barrier()  # no rank reports success before the weights are saved
        return summary
    finally:
        rundir.release()


def _train_epochs(run: Run, learner: Learner, rundir: RunDir, config: dict, start_epoch: int,
                  standing: Standing) -> float:
    """The loop over the epochs left to train; returns the seconds spent training."""
    ranks, device = distributed.ranks(), learner.device
    num_samples, views, epochs = len(run.source), run.spec.recipe.views_per_sample, run.spec.epochs
    batch_size, steps_per_epoch = run.spec.batch_size, math.ceil(num_samples / run.spec.batch_size)
    score = _scorer(run, device) if ranks.main else None
    batches = iter(_loader(run, start_epoch, ranks, device))
    train_seconds = 0.0
    try:
        with views_progress() as progress:
            for epoch in range(start_epoch, epochs):
                # train one epoch, summing each term over the samples of this rank
                learner.student.train()
                epoch_started, sums = time.perf_counter(), {}
                task = progress.add_task(f"epoch {epoch + 1}/{epochs}", total=num_samples * views)
                for step in range(steps_per_epoch):
                    batch = next(batches)
                    count = len(batch["index"])
                    update_count, last = update_of(step, run.spec, num_samples)
                    terms = train_step(run, learner, batch, epoch, step, weight=count * ranks.world / update_count,
                                       update=last)
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value.item() * count
                    progress.advance(task, min(batch_size, num_samples - step * batch_size) * views)
                progress.remove_task(task)
                sums = distributed.sum_across(sums, device)
                seconds = time.perf_counter() - epoch_started
                train_seconds += seconds
                if ranks.main:
                    record = {"epoch": epoch + 1} | {k: v / num_samples for k, v in sorted(sums.items())}
                    _end_epoch(run, learner, rundir, config, epoch, standing, score,
                               record | {"seconds": seconds, "views_per_sec": num_samples * views / seconds})
    except BaseException:
        del batches  # the traceback keeps this frame: let the DataLoader workers go now
        raise
    return train_seconds


def update_of(step: int, spec: TrainSpec, num_samples: int) -> tuple[int, bool]:
    """The optimizer update that batch `step` (within the epoch) belongs to, of
    `spec.accumulate` batches each, the epoch's last update maybe fewer: how many samples
    it holds, and whether this batch is its last (the one that steps the optimizer)."""
    steps_per_epoch = math.ceil(num_samples / spec.batch_size)
    first = step - step % spec.accumulate
    last = min(first + spec.accumulate, steps_per_epoch) - 1
    return min(num_samples, (last + 1) * spec.batch_size) - first * spec.batch_size, step == last


def _end_epoch(run: Run, learner: Learner, rundir: RunDir, config: dict, epoch: int, standing: Standing,
               score: Callable[[nn.Module], dict] | None, record: dict) -> None:
    """After an epoch, on rank 0: recompute BatchNorm's statistics (of what is scored and
    saved), evaluate the student (and its EMA), log the epoch, keep the best epoch's
    student and checkpoint the run."""
    _precise_bn(run, learner.student, learner, epoch)
    if learner.ema is not None:
        _precise_bn(run, learner.ema.model, learner, epoch)
    scores = dict(standing.last)
    if score is not None:
        scores = score(learner.student)
        if learner.ema is not None:
            scores |= {f"{key}_ema": value for key, value in score(learner.ema.model).items()
                       if key in ("val_top1", "val_top5", "val_per_class")}
    if standing.improved_by(scores, epoch):
        rundir.save_student(BEST, student_file(run, learner.student.net.state_dict()))
    per_class = ("val_per_class", "val_per_class_ema")  # in summary.json only: a line per epoch stays short
    rundir.append_metrics(record | {key: value for key, value in scores.items() if key not in per_class})
    rundir.save_checkpoint(_checkpoint(learner, run.objective, epoch, standing, config))
    shown = "".join(f"  {key} {scores[key]:.2f}{unit}" for key, unit in
                    (("val_top1", "%"), ("val_top1_ema", "%"), ("val_agreement", "%"), ("val_kl", ""))
                    if scores.get(key) is not None)
    say(f"[{run.spec.mode}] epoch {epoch + 1}/{run.spec.epochs}  loss {record['loss']:.4f}{shown}  "
        f"{record['views_per_sec']:,.0f} views/s")


def _loader(run: Run, start_epoch: int, ranks: distributed.Ranks, device: torch.device) -> DataLoader:
    """Batches of the epochs still to train, in training order: this rank's part of each
    global batch. Training epoch e replays recipe epoch e % (the recipe's epochs)."""
    spec, recipe, num_samples = run.spec, run.spec.recipe, len(run.source)
    ranges = [(epoch % recipe.epochs, 0, num_samples) for epoch in range(start_epoch, spec.epochs)]
    sizes = {"views": run.student_size}
    if spec.mode == "online" and run.student_size != recipe.size:
        sizes["teacher_views"] = recipe.size  # the teacher sees the same views at its own size
    views = ViewDataset(run.source, recipe, sizes)
    features = {MAIN_TEACHER: tuple(dict.fromkeys(feature.teacher_module for feature in spec.features))}
    dataset = ReplayBatches(views, run.archives, spec.storage_options, spec.local_cache, features) \
        if spec.mode == "cached" else ViewBatches(views)
    return DataLoader(dataset, sampler=RangeBatches(ranges, num_samples, spec.batch_size, ranks), batch_size=None,
                      num_workers=spec.workers, pin_memory=device.type == "cuda", worker_init_fn=quiet_worker)


def _precise_bn(run: Run, model: nn.Module, learner: Learner, epoch: int) -> None:
    """Recompute `model`'s BatchNorm running statistics (the student's, or its EMA's) on
    the first --precise-bn views of this epoch (`precise_bn`); nothing without BatchNorm
    or with --precise-bn 0. The statistics are a function of the weights and the epoch
    alone, so a resumed run saves the ones an uninterrupted run saves; the global
    generators are left as they were (dropout draws from a seed of its own, as in a step
    after the epoch's last)."""
    spec, device = run.spec, learner.device
    if not spec.precise_bn or not batch_norms(model):
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(step_seed(spec.seed, epoch, math.ceil(len(run.source) / spec.batch_size), learner.rank))
        views = sample_views(run.source, spec.recipe, run.student_size, epoch % spec.recipe.epochs, spec.precise_bn,
                             spec.batch_size, spec.workers)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device)):
            recompute_batch_norm(model, (_to_device(images, device) for images in views))


def _scorer(run: Run, device: torch.device) -> Callable[[nn.Module], dict] | None:
    """How the student is scored after each epoch on the standard evaluation views of the
    validation images (`views.eval_view`: shorter side to size / the student's crop_pct,
    centre crop, the training views' interpolation): val_top1, val_top5 and
    val_per_class of its class scores, and with a teacher at hand its top-1 agreement
    with the teacher and the mean KL(teacher || student) (`_teacher_logits`); for a SEED
    student val_top1 of a linear probe. None without --val."""
    if run.val_source is None:
        return None
    resize, crop_pct = run.spec.recipe.interpolation, preprocessing(run.spec.student).crop_pct
    val = _kept(whole_images(run.val_source, run.student_size, run.spec.workers, resize, crop_pct, "crop"))
    if run.embeddings:
        probe = whole_images(run.probe_source, run.student_size, run.spec.workers, resize, crop_pct, "crop")
        return lambda model: {"val_top1": linear_probe(model, probe, val, device)}
    classes, teachers = run.val_source.classes, _teacher_logits(run, device)

    def score(model: nn.Module) -> dict:
        logits, labels = features(model, val, device)
        metrics = classification_metrics(logits, labels, classes)
        scores = {"val_top1": metrics["top1"], "val_top5": metrics["top5"], "val_per_class": metrics["per_class"]}
        for name, teacher_logits in teachers.items():
            suffix = "" if len(teachers) == 1 else f"_{name}"
            versus = classification_metrics(logits, labels, classes, teacher_logits)
            scores |= {f"val_agreement{suffix}": versus["agreement"], f"val_kl{suffix}": versus["kl"]}
        return scores

    return score


KEPT_VAL_BYTES = 256 * 2**20  # evaluation views up to this size are rendered once and kept for every epoch


def _kept(loader: DataLoader) -> DataLoader | list:
    """The loader's batches rendered once and kept in memory when they fit in
    KEPT_VAL_BYTES (a small val set is then decoded once per run, not once per epoch),
    else the loader itself. Either way an iterable of (images, labels) batches."""
    dataset = loader.dataset
    first, _ = dataset[0]
    if len(dataset) * first.numel() * first.element_size() > KEPT_VAL_BYTES:
        return loader
    return list(loader)


def _teacher_logits(run: Run, device: torch.device) -> dict[str, torch.Tensor]:
    """Each teacher's logits on the validation images (its own evaluation view at the
    recipe's size), computed once, for the student's agreement with it: the live teacher
    online; in cached mode the teachers the archives record (or --teacher), built from
    their weights when these are at hand and checked against the archive's fingerprint,
    else left out with a note. Teachers of a subset of the classes are left out."""
    if run.teacher is not None:
        teachers = {"online": run.teacher}
    else:
        teachers = {}
        for name, (spec, recorded) in run.archived_teachers.items():
            try:
                teacher = Teacher(with_num_classes(spec, run.source.classes, "teacher"), run.spec.recipe.size, device)
            except KdpipeError as exc:
                say(f"note: no agreement with teacher {name} on --val: {exc}")
                continue
            if teacher.fingerprint_for(recorded) != recorded.fingerprint:
                say(f"note: no agreement with teacher {name} on --val: {spec.name}'s weights are not the archive's")
                continue
            teachers[name] = teacher
    logits = {}
    for name, teacher in teachers.items():
        crop_pct = teacher.preprocessing.crop_pct
        images = whole_images(run.val_source, run.spec.recipe.size, run.spec.workers, run.spec.recipe.interpolation,
                              crop_pct, "crop")
        logits[name] = torch.cat([teacher(batch).cpu() for batch, _ in images])
    return logits


def student_file(run: Run, state: dict[str, torch.Tensor]) -> dict:
    """What student.pt (and its best-epoch and EMA siblings) holds: the inner network's
    state_dict under "model" (so any kdpipe --weights reads it), and what deploying it
    needs without the run directory: the model spec (its class count), the class names
    in output order, and the preprocessing its evaluation view uses (normalisation, and
    the size, crop_pct and interpolation `kdpipe eval`, `predict` and `export` apply)."""
    spec = run.spec
    own = preprocessing(spec.student)
    prep = replace(own, interpolation=spec.recipe.interpolation, input_size=run.student_size)
    return {"format": STUDENT_FORMAT, "model": state,
            "spec": replace(spec.student, weights=None, pretrained=None).to_dict(),
            "outputs": "embeddings" if run.embeddings else "logits", "classes": run.classes,
            "preprocessing": prep.to_dict()}


def _checkpoint(learner: Learner, objective: Objective, epoch: int, standing: Standing, config: dict) -> dict:
    state = {
        "model": learner.student.net.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "epoch": epoch,
        "val_top1": standing.last.get("val_top1"),
        "standing": dataclasses.asdict(standing),
        "config": config,
    }
    if learner.ema is not None:
        state["ema"] = learner.ema.state_dict()
    if learner.features is not None:
        state["connectors"] = learner.features.state_dict()
    loss_state = objective.state_dict()
    return state if loss_state is None else state | {"loss_state": loss_state}


def _restore(learner: Learner, objective: Objective, checkpoint: dict | None, out: str) -> tuple[int, Standing]:
    """Load a resumed run's state; returns the first epoch to train and the scores so far."""
    if checkpoint is None:
        return 0, Standing()
    learner.student.net.load_state_dict(checkpoint["model"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    learner.scheduler.load_state_dict(checkpoint["scheduler"])
    if "loss_state" in checkpoint:
        objective.load_state_dict(checkpoint["loss_state"])
    if learner.ema is not None:
        learner.ema.load_state_dict(checkpoint["ema"])
    if learner.features is not None:
        learner.features.load_state_dict(checkpoint["connectors"])
    say(f"resuming {out} after epoch {checkpoint['epoch'] + 1}")
    standing = Standing(**checkpoint["standing"]) if "standing" in checkpoint else \
        Standing(last={"val_top1": checkpoint["val_top1"]})  # a checkpoint of an older kdpipe
    return checkpoint["epoch"] + 1, standing


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of views on `device`: copied without blocking from pinned memory, and
    channels-last on a GPU (where convolutions are fastest that way)."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if accelerated(device) else images
