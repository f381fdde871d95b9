"""The train-student stage: one loop, three modes.

- cached:     the teacher's logits come from an archive, read as contiguous slabs in
              training order, while the student renders the very views they were
              computed on (checked view by view against the stored parameters; `replay`);
- online:     the teacher runs live on the same views (same recipe, seed and order);
- supervised: cross-entropy on labels only, the baseline.

Everything a run needs is resolved and checked once, up front, into a `Run`
(`resolve_run`); `train_step` takes one batch and returns the named loss terms
(`objective`); `train_student` is the loop: steps, then per epoch the evaluation, the
metrics line and the checkpoint (`rundir`). AdamW with cosine decay and gradient-norm
clipping at 1.0 as in Beyer et al. (2022); SGD with momentum on request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed
from .config import DEFAULT_EPOCHS, ModelSpec, TrainSpec, absolute_path
from .data import RangeBatches, Source, ViewDataset, open_source
from .errors import ConfigError, DataError, ModelError, TrainingError
from .evaluation import evaluate
from .host import keep_freed_memory, quiet_worker
from .losses import check_loss_options
from .models import Normalized, Teacher, accelerated, build_model, output_classes, preprocessing, with_num_classes
from .objective import Objective, make_loss
from .precise_bn import batch_norms, recompute_batch_norm, sample_views
from .probe import linear_probe, whole_images
from .progress import say, views_progress
from .replay import ReplayBatches, ViewBatches, check_archives, open_archives, resolve_recipe
from .rundir import RunDir
from .store import ArchiveReader

GRADIENT_CLIP = 1.0


@dataclass(frozen=True)
class Run:
    """Everything a train-student run needs, resolved and checked before the first step.

    `spec` is the resolved one (the student's class count and the view recipe filled in;
    it is what config.json records). In cached mode `archives` names each teacher's
    archive; in online mode `teacher` is the live teacher. `embeddings` is SEED's case:
    the student learns the teacher's embedding and is scored by a linear probe fitted on
    `probe_source`. `classes` names the student's outputs in order (None when nothing
    names them); `inputs` pins what the run trains on (the dataset's fingerprint and each
    archive's manifest fingerprint), so a resumed run refuses anything else."""

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

    @property
    def student_size(self) -> int:
        return self.spec.student_size or self.spec.recipe.size


def resolve_run(spec: TrainSpec, recipe_options: dict) -> Run:
    """Open the data and the archives, decide the recipe, the teacher, the classes and
    the loss, and refuse anything that does not fit together, before anything is written."""
    check_loss_options(spec.loss, spec.loss_options)
    source = open_source(spec.data)
    val_source = open_source(spec.val) if spec.val else None
    archives, readers = open_archives(spec)
    spec = replace(spec, epochs=_epochs(spec, readers))
    recipe = resolve_recipe(spec, recipe_options, next(iter(readers.values()), None))
    teacher, columns, classes = None, {}, source.classes
    if spec.mode == "cached":
        num_classes, columns, classes = check_archives(spec, source, recipe, readers)
    elif spec.mode == "online":  # SEED online distils the penultimate features
        teacher = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), recipe.size,
                          embedding="" if spec.loss == "seed" else None)
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
    objective = Objective(distill, spec.loss, spec.alpha, spec.temperature, spec.schedule, columns)
    spec = replace(spec, student=student, recipe=recipe)
    spec = replace(spec, **_resolved_paths(spec, source, val_source, probe_source))
    inputs = {"dataset": source.describe()["fingerprint"],
              "archives": {name: reader.manifest.manifest_fingerprint for name, reader in readers.items()}}
    return Run(spec, source, val_source, probe_source, archives, teacher, objective, embeddings,
               None if embeddings else classes, inputs)


def _epochs(spec: TrainSpec, readers: dict[str, ArchiveReader]) -> int:
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
    `model` is what a step runs (DDP over ranks, compiled on request)."""

    student: Normalized
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    rank: int


def make_learner(run: Run, device: torch.device, ranks: distributed.Ranks) -> Learner:
    spec = run.spec
    student = build_model(spec.student, seed=spec.seed).to(device)
    outputs = output_classes(student, run.student_size, "student")
    if outputs != spec.student.num_classes:
        raise ModelError(f"the student {spec.student.name} gives {outputs} outputs, not {spec.student.num_classes}")
    if accelerated(device):
        student = student.to(memory_format=torch.channels_last)
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(student.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    total_steps = spec.epochs * math.ceil(len(run.source) / spec.batch_size)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    model = student
    if ranks.world > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if spec.compile:
        model = torch.compile(model)
    return Learner(student, model, optimizer, scheduler, device, ranks.rank)


def train_step(run: Run, learner: Learner, batch: dict, epoch: int, step: int, weight: float) -> dict[str, torch.Tensor]:
    """One optimisation step on one batch; returns the named loss terms. `weight` scales
    this rank's mean loss so that DDP's average over ranks is the global batch's mean."""
    device, views = learner.device, run.spec.recipe.views_per_sample
    # every random layer (dropout, stochastic depth) draws from a generator seeded by the
    # step itself, so a resumed run, an online run and a cached run draw alike
    torch.manual_seed(step_seed(run.spec.seed, epoch, step, learner.rank))
    images = _to_device(batch["views"].flatten(0, 1), device)
    labels = batch["label"].repeat_interleave(views).to(device)
    mixing = None
    if run.spec.recipe.mixup:
        mixing = (batch["partner_label"].repeat_interleave(views).to(device), batch["lam"].flatten().to(device))
    teacher_logits = None
    if run.spec.mode == "cached":
        teacher_logits = {name: slab.flatten(0, 1).to(device, non_blocking=True)
                          for name, slab in batch["teacher_logits"].items()}
    elif run.spec.mode == "online":
        teacher_views = _to_device(batch["teacher_views"].flatten(0, 1), device) if "teacher_views" in batch else images
        teacher_logits = {"online": run.teacher(teacher_views, run.spec.teacher_batch_size).clone()}  # leave inference mode
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device)):
        student_logits = learner.model(images)
    terms = run.objective.terms(student_logits, teacher_logits, labels, mixing, epoch)
    if not torch.isfinite(terms["loss"]):
        raise TrainingError(f"the loss became {terms['loss'].item()} at epoch {epoch + 1}, step {step + 1}; "
                            "lower --lr or check the data and teacher")
    learner.optimizer.zero_grad(set_to_none=True)
    (terms["loss"] * weight).backward()
    torch.nn.utils.clip_grad_norm_(learner.student.parameters(), GRADIENT_CLIP)
    learner.optimizer.step()
    learner.scheduler.step()
    return terms


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of torch's generators for one step of one rank: a pure function of those
    integers (as views are), never of what ran before."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def train_student(spec: TrainSpec, recipe_options: dict | None = None, resume: bool = False) -> dict:
    """Train a student as `spec` says, writing student.pt, metrics.jsonl, summary.json,
    config.json and an epoch checkpoint into `spec.out`. Returns the summary."""
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
    try:
        start_epoch, val_top1 = _restore(learner, run.objective, checkpoint, run.spec.out)
        if ranks.main:
            rundir.keep_metrics_until(start_epoch)
        val_top1, train_seconds = _train_epochs(run, learner, rundir, config, start_epoch, val_top1)
        # save the weights, then the summary that marks the run finished
        train_views = (run.spec.epochs - start_epoch) * len(run.source) * run.spec.recipe.views_per_sample
        summary = {
            "mode": run.spec.mode, "val_top1": val_top1, "epochs": run.spec.epochs,
            "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
            "views_per_sec": train_views / train_seconds if train_seconds else None,
            "student": run.spec.student.name, "classes": run.classes, "run_dir": str(run.spec.out),
            "ranks": ranks.world,
        }
        if ranks.main:
            rundir.finish(learner.student.net.state_dict(), summary)
        distributed.barrier()  # no rank reports success before the weights are saved
        return summary
    finally:
        rundir.release()


def _train_epochs(run: Run, learner: Learner, rundir: RunDir, config: dict, start_epoch: int,
                  val_top1: float | None) -> tuple[float | None, float]:
    """The loop over the epochs left to train; returns the last val_top1 and the seconds spent training."""
    ranks, device = distributed.ranks(), learner.device
    num_samples, views, epochs = len(run.source), run.spec.recipe.views_per_sample, run.spec.epochs
    batch_size, steps_per_epoch = run.spec.batch_size, math.ceil(num_samples / run.spec.batch_size)
    score = _scorer(run) if ranks.main else None
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
                    global_count = min(batch_size, num_samples - step * batch_size)
                    terms = train_step(run, learner, batch, epoch, step, weight=count * ranks.world / global_count)
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value.item() * count
                    progress.advance(task, global_count * views)
                progress.remove_task(task)
                sums = distributed.sum_across(sums, device)
                seconds = time.perf_counter() - epoch_started
                train_seconds += seconds
                if not ranks.main:
                    continue
                # recompute BatchNorm's statistics (what is scored and saved), evaluate, log the epoch, checkpoint it
                _precise_bn(run, learner, epoch)
                scores = {"val_top1": val_top1} if score is None else score(learner.student, device)
                val_top1 = scores["val_top1"]
                record = {"epoch": epoch + 1} | {k: v / num_samples for k, v in sorted(sums.items())} | scores | {
                    "seconds": seconds, "views_per_sec": num_samples * views / seconds}
                rundir.append_metrics(record)
                rundir.save_checkpoint(_checkpoint(learner, run.objective, epoch, val_top1, config))
                shown = f"  val_top1 {val_top1:.2f}%" if val_top1 is not None else ""
                say(f"[{run.spec.mode}] epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}{shown}  "
                    f"{record['views_per_sec']:,.0f} views/s")
    except BaseException:
        del batches  # the traceback keeps this frame: let the DataLoader workers go now
        raise
    return val_top1, train_seconds


def _loader(run: Run, start_epoch: int, ranks: distributed.Ranks, device: torch.device) -> DataLoader:
    """Batches of the epochs still to train, in training order: this rank's part of each
    global batch. Training epoch e replays recipe epoch e % (the recipe's epochs)."""
    spec, recipe, num_samples = run.spec, run.spec.recipe, len(run.source)
    ranges = [(epoch % recipe.epochs, 0, num_samples) for epoch in range(start_epoch, spec.epochs)]
    sizes = {"views": run.student_size}
    if spec.mode == "online" and run.student_size != recipe.size:
        sizes["teacher_views"] = recipe.size  # the teacher sees the same views at its own size
    views = ViewDataset(run.source, recipe, sizes)
    dataset = ReplayBatches(views, run.archives, spec.storage_options, spec.local_cache) if spec.mode == "cached" \
        else ViewBatches(views)
    return DataLoader(dataset, sampler=RangeBatches(ranges, num_samples, spec.batch_size, ranks), batch_size=None,
                      num_workers=spec.workers, pin_memory=device.type == "cuda", worker_init_fn=quiet_worker)


def _precise_bn(run: Run, learner: Learner, epoch: int) -> None:
    """Recompute the student's BatchNorm running statistics on the first --precise-bn
    views of this epoch (`precise_bn`); nothing without BatchNorm or with --precise-bn 0.
    The statistics are a function of the weights and the epoch alone, so a resumed run
    saves the ones an uninterrupted run saves; the global generators are left as they
    were (dropout draws from a seed of its own, as in a step after the epoch's last)."""
    spec, device = run.spec, learner.device
    if not spec.precise_bn or not batch_norms(learner.student):
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(step_seed(spec.seed, epoch, math.ceil(len(run.source) / spec.batch_size), learner.rank))
        views = sample_views(run.source, spec.recipe, run.student_size, epoch % spec.recipe.epochs, spec.precise_bn,
                             spec.batch_size, spec.workers)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device)):
            recompute_batch_norm(learner.student, (_to_device(images, device) for images in views))


def _scorer(run: Run) -> Callable[[nn.Module, torch.device], dict[str, float]] | None:
    """How the student is scored after each epoch on the standard evaluation views of the
    validation images (`views.eval_view`: shorter side to size / the student's crop_pct,
    centre crop, the training views' interpolation): val_top1 and val_top5 of its class
    scores, or for a SEED student val_top1 of a linear probe; None without --val."""
    if run.val_source is None:
        return None
    resize, crop_pct = run.spec.recipe.interpolation, preprocessing(run.spec.student).crop_pct
    val = whole_images(run.val_source, run.student_size, run.spec.workers, resize, crop_pct, "crop")
    if not run.embeddings:
        classes = run.val_source.classes

        def score(model: nn.Module, device: torch.device) -> dict[str, float]:
            metrics = evaluate(model, val, classes, device)
            return {"val_top1": metrics["top1"], "val_top5": metrics["top5"]}

        return score
    probe = whole_images(run.probe_source, run.student_size, run.spec.workers, resize, crop_pct, "crop")
    return lambda model, device: {"val_top1": linear_probe(model, probe, val, device)}


def _checkpoint(learner: Learner, objective: Objective, epoch: int, val_top1: float | None, config: dict) -> dict:
    state = {
        "model": learner.student.net.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "epoch": epoch,
        "val_top1": val_top1,
        "config": config,
    }
    loss_state = objective.state_dict()
    return state if loss_state is None else state | {"loss_state": loss_state}


def _restore(learner: Learner, objective: Objective, checkpoint: dict | None, out: str) -> tuple[int, float | None]:
    """Load a resumed run's state; returns the first epoch to train and the last val_top1."""
    if checkpoint is None:
        return 0, None
    learner.student.net.load_state_dict(checkpoint["model"])
    learner.optimizer.load_state_dict(checkpoint["optimizer"])
    learner.scheduler.load_state_dict(checkpoint["scheduler"])
    if "loss_state" in checkpoint:
        objective.load_state_dict(checkpoint["loss_state"])
    say(f"resuming {out} after epoch {checkpoint['epoch'] + 1}")
    return checkpoint["epoch"] + 1, checkpoint["val_top1"]


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of views on `device`: copied without blocking from pinned memory, and
    channels-last on a GPU (where convolutions are fastest that way)."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if accelerated(device) else images
