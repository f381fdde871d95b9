"""The train-student stage: one loop, three modes.

- cached:     the teacher's logits come from an archive, read as contiguous slabs in
              training order, while the student renders the very views they were
              computed on (checked view by view against the stored parameters);
- online:     the teacher runs live on the same views (same recipe, seed and order);
- supervised: cross-entropy on labels only, the baseline.

The loss is Hinton's KD, (1-alpha) * T^2 * KL(teacher || student) + alpha * CE, with
alpha = 0 by default (function matching). AdamW with cosine decay and gradient-norm
clipping at 1.0 as in Beyer et al. (2022); SGD with momentum on request.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from dataclasses import replace
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .config import MAIN_TEACHER, TrainSpec, ViewRecipe, first_difference
from .data import RangeBatches, ViewDataset, open_source
from .distributed import check_batches
from .errors import NO_SPACE, ArchiveMismatchError, ConfigError, DataError, TrainingError
from .losses import STATEFUL_LOSSES, get_loss, loss_options
from .host import keep_freed_memory
from .models import Teacher, accelerated, build_model, with_num_classes
from .probe import evaluate, linear_probe, whole_images
from .progress import say, views_progress
from .store import ArchiveReader, check_archive_matches, write_local_atomic
from .store.archive import TEACHERS

CHECKPOINT = "checkpoint.pt"


def resolve_recipe(spec: TrainSpec, recipe_options: dict, reader: ArchiveReader | None) -> ViewRecipe:
    """The view recipe to train with: the archive's in cached mode (explicit options must
    agree with it), otherwise the defaults with one view epoch per training epoch."""
    if reader is not None:
        cached = reader.manifest["recipe"]
        check_archive_matches(reader.manifest, spec.cache, recipe=cached | recipe_options)
        return ViewRecipe.from_dict(cached)
    return ViewRecipe.from_dict({"epochs": spec.epochs} | recipe_options)


def loss_terms(
    student_logits: torch.Tensor, teacher_logits: dict[str, torch.Tensor] | None, labels: torch.Tensor,
    spec: TrainSpec, mixing: tuple[torch.Tensor, torch.Tensor] | None = None, epoch: int = 0,
    columns: dict[str, list[int] | None] | None = None, loss: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """The named terms of one step; `loss` is the one to minimise. `teacher_logits` holds
    each teacher's logits by name; `columns` maps a teacher that knows only some of the
    student's classes to their columns. `mixing` holds the partner labels and lam of
    mixed views: their cross-entropy is lam-weighted."""
    if teacher_logits is None:
        ce = _cross_entropy(student_logits, labels, mixing)
        return {"loss": ce, "ce": ce}
    distill = distillation(student_logits, teacher_logits, labels, spec, epoch, columns or {}, loss)
    terms = {spec.loss: distill, "loss": (1 - spec.alpha) * distill}
    if spec.alpha > 0:
        terms["ce"] = _cross_entropy(student_logits, labels, mixing)
        terms["loss"] = terms["loss"] + spec.alpha * terms["ce"]
    return terms


def distillation(
    student_logits: torch.Tensor, teacher_logits: dict[str, torch.Tensor], labels: torch.Tensor, spec: TrainSpec,
    epoch: int, columns: dict[str, list[int] | None], loss: Callable | None = None,
) -> torch.Tensor:
    """The distillation loss against the teachers active in `epoch` (all of them, or the
    one --schedule names). Teachers over the same classes are combined into one target,
    the mean of their probabilities at temperature T; teachers over different subsets of
    the classes each teach their own columns, and their losses are averaged."""
    loss = loss or make_loss(spec)
    active = [scheduled_teacher(spec.schedule, epoch)] if spec.schedule else list(teacher_logits)
    if all(columns.get(name) is None for name in active):
        target = ensemble_logits([teacher_logits[name] for name in active], spec.temperature)
        return loss(student_logits, target, labels)
    return torch.stack([
        loss(student_logits[:, columns[name]] if columns.get(name) else student_logits, teacher_logits[name], None)
        for name in active
    ]).mean()


def make_loss(spec: TrainSpec) -> Callable:
    """The run's distillation loss as a function of (student, teacher, labels), its
    options bound; a stateful loss (SEED's queue) is one object for the whole run."""
    loss = get_loss(spec.loss)
    options = dict(spec.loss_options)
    if "temperature" in loss_options(spec.loss):
        options["temperature"] = spec.temperature
    return loss(**options) if spec.loss in STATEFUL_LOSSES else functools.partial(loss, **options)


def ensemble_logits(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the mean of the given logits' softmaxes."""
    if len(logits) == 1:
        return logits[0]
    log_probs = torch.stack([F.log_softmax(l.float() / temperature, dim=-1) for l in logits])
    return temperature * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))


def scheduled_teacher(schedule: tuple[tuple[str, int], ...], epoch: int) -> str:
    """The teacher of training epoch `epoch` (0-based) in a progressive schedule."""
    for name, epochs in schedule:
        if epoch < epochs:
            return name
        epoch -= epochs
    return schedule[-1][0]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mixing: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if mixing is None:
        return F.cross_entropy(logits.float(), labels)
    partner_labels, lam = mixing
    own = F.cross_entropy(logits.float(), labels, reduction="none")
    other = F.cross_entropy(logits.float(), partner_labels, reduction="none")
    return (lam * own + (1 - lam) * other).mean()


def _make_optimizer(spec: TrainSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def _write_run_file(path: Path, data: bytes) -> None:
    """Write one file of the run directory whole (temp file, fsync, rename), so a kill
    leaves the old file or the new one and a resumed run never reads a torn one."""
    try:
        write_local_atomic(path, data)
    except OSError as exc:
        advice = "free some space, then re-run with --resume" if exc.errno in NO_SPACE else "choose another --out"
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; {advice}") from None


def _save_torch(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_run_file(path, buffer.getvalue())


def _write_json(path: Path, obj) -> None:
    _write_run_file(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _prepare_run_dir(out: Path, config: dict, resume: bool) -> dict | None:
    """Create the run directory, or check a resumed one; returns the checkpoint to resume."""
    if (out / "summary.json").exists():
        raise ConfigError(f"{out} already holds a finished run; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; choose another --out")
    config_path = out / "config.json"
    if config_path.is_file() and config_path.stat().st_size == 0:
        config_path.unlink()  # left by a kdpipe killed while creating it (before writes were atomic)
    has_run = config_path.exists()
    if has_run and not resume:
        raise ConfigError(f"{out} holds an unfinished run; pass --resume to continue it, or choose another --out")
    if not has_run and out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists, is not empty and holds no run; choose another --out")
    if has_run:
        where = first_difference(json.loads(config_path.read_text()), config)
        if where is not None:
            raise ConfigError(f"cannot resume {out}: {where} differs from the run being resumed")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {out}: {exc.strerror or exc}; choose another --out") from None
    _write_json(config_path, config)
    if resume and (out / CHECKPOINT).exists():
        return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    return None


def teacher_archive(cache: str, name: str) -> str:
    """Where teacher `name` of the archive at `cache` lives."""
    return cache if name == MAIN_TEACHER else f"{cache.rstrip('/')}/{TEACHERS}/{name}"


def _teacher_and_classes(
    spec: TrainSpec, source, recipe: ViewRecipe, readers: dict[str, ArchiveReader]
) -> tuple[Teacher | None, int, dict[str, list[int] | None]]:
    """The live teacher (online mode only), the number of classes the student must
    output, and for each cached teacher that knows only some of them, their columns;
    in cached mode, the checks that every teacher's archive fits this run."""
    if readers:
        fingerprint = source.describe()["fingerprint"]
        for name, reader in readers.items():
            where = teacher_archive(spec.cache, name)
            check_archive_matches(reader.manifest, where, dataset__fingerprint=fingerprint, recipe=recipe.to_dict())
        if spec.epochs > recipe.epochs and not spec.cycle_epochs:
            raise ArchiveMismatchError(
                f"archive {spec.cache} holds {recipe.epochs} epochs of views but --epochs is {spec.epochs}; "
                "cache more epochs, or pass --cycle-epochs to replay them in a cycle"
            )
        if spec.teacher is not None:  # the caller named a teacher: it must be the archive's
            if len(readers) > 1:
                raise ConfigError("--teacher checks the teacher of a one-teacher run; drop it with --teachers")
            reader = next(iter(readers.values()))
            named = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), recipe.size, torch.device("cpu"))
            check_archive_matches(reader.manifest, spec.cache, teacher__fingerprint=named.fingerprint)
        embeddings = [name for name, r in readers.items() if r.manifest["teacher"].get("outputs") == "embeddings"]
        if embeddings and (spec.loss != "seed" or len(readers) > 1):
            raise ConfigError(f"{teacher_archive(spec.cache, embeddings[0])} holds teacher embeddings, not logits: "
                              "distil them alone with --loss seed")
        if spec.loss == "seed" and not embeddings:
            raise ConfigError("--loss seed distils embeddings: cache them with cache-teacher --embedding-layer")
        if embeddings:
            return None, readers[embeddings[0]].manifest["layout"]["num_classes"], {}
        return None, *_class_union(spec, source, readers)
    if spec.mode == "online":
        embedding = "" if spec.loss == "seed" else None  # SEED online: the penultimate features
        teacher = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), recipe.size, embedding=embedding)
        return teacher, teacher.num_classes, {}
    if source.classes is None:
        raise DataError(f"supervised training needs labelled data, but {spec.data} has no class folders")
    return None, len(source.classes), {}


def _class_union(spec: TrainSpec, source, readers: dict[str, ArchiveReader]) -> tuple[int, dict[str, list[int] | None]]:
    """The student's class count and each teacher's columns among them. Teachers over
    the same classes need no columns; otherwise the student learns the union: the data's
    class folders when it has them, else the teachers' classes in order of appearance."""
    known = {name: r.manifest["teacher"].get("classes") or source.classes for name, r in readers.items()}
    counts = {name: r.manifest["layout"]["num_classes"] for name, r in readers.items()}
    if len({json.dumps(classes) for classes in known.values()}) == 1 and len(set(counts.values())) == 1:
        return next(iter(counts.values())), {}
    if any(classes is None for classes in known.values()):
        raise ArchiveMismatchError(
            f"the teachers of {spec.cache} give {', '.join(map(str, counts.values()))} logits and record no class "
            "names; cache them with --teacher-classes to train on the union of their classes"
        )
    if spec.loss == "dkd":
        raise ConfigError("--loss dkd needs every teacher to know every class; these teachers know different classes")
    union = list(source.classes or dict.fromkeys(c for classes in known.values() for c in classes))
    return len(union), {name: [union.index(c) for c in classes] for name, classes in known.items()}


def train_student(spec: TrainSpec, recipe_options: dict | None = None, resume: bool = False) -> dict:
    """Train a student as `spec` says, writing student.pt, metrics.jsonl, summary.json,
    config.json and an epoch checkpoint into `spec.out`. Returns the summary."""
    started = time.perf_counter()
    keep_freed_memory()
    out = Path(spec.out)
    source = open_source(spec.data)
    val_source = open_source(spec.val) if spec.val else None
    names = (spec.teachers or (MAIN_TEACHER,)) if spec.mode == "cached" else ()
    archives = {name: teacher_archive(spec.cache, name) for name in names}
    readers = {name: ArchiveReader(url, spec.storage_options, spec.local_cache) for name, url in archives.items()}
    if spec.schedule:
        missing = [name for name, _ in spec.schedule if name not in readers]
        if missing:
            raise ConfigError(f"--schedule names teacher {missing[0]!r}: add it to --teachers")
    recipe = resolve_recipe(spec, recipe_options or {}, next(iter(readers.values()), None))
    teacher, num_classes, columns = _teacher_and_classes(spec, source, recipe, readers)
    if spec.mode != "supervised" and source.classes is None and (spec.alpha > 0 or spec.loss == "dkd"):
        needs = f"--alpha {spec.alpha}" if spec.alpha > 0 else "--loss dkd"
        raise DataError(f"{needs} needs labels, but {spec.data} has no class folders; use --alpha 0 and another --loss")
    student_spec = spec.student
    if student_spec.num_classes is None:  # default to the teacher's (or the labels') classes
        student_spec = replace(student_spec, num_classes=num_classes)
    if spec.loss == "seed":  # the student's outputs are an embedding of the teacher's width
        if student_spec.num_classes != num_classes:
            raise ConfigError(f"the student gives {student_spec.num_classes} outputs but the teacher's embeddings "
                              f"have {num_classes}; drop --num-classes")
        probe_source = open_source(spec.probe_data) if spec.probe_data else source
        if val_source is not None and probe_source.classes is None:
            raise DataError(f"a SEED student is scored by a linear probe fitted on labelled images, but {spec.data} "
                            "has no class folders: pass --probe-data")
    else:
        student_spec = with_num_classes(student_spec, source.classes, "student")
        if student_spec.num_classes != num_classes:
            raise ConfigError(f"the student has {student_spec.num_classes} classes but the teacher has {num_classes}")
    if val_source is not None and val_source.classes is None:
        raise DataError(f"validation data {spec.val} has no class folders, so it cannot be scored")
    if val_source is not None and source.classes is not None and val_source.classes != source.classes:
        raise DataError(f"the class folders of {spec.val} differ from those of {spec.data}")
    spec = replace(spec, student=student_spec, recipe=recipe)
    config = spec.to_dict()
    ranks = distributed.ranks()
    check_batches(spec.batch_size, len(source), ranks.world)
    # Rank 0 owns the run directory; the other ranks get its checkpoint from it (their
    # machines may not see the folder).
    checkpoint = distributed.broadcast(_prepare_run_dir(out, config, resume) if ranks.main else None)

    device = distributed.device()
    student = build_model(student_spec, seed=spec.seed).to(device)
    if accelerated(device):
        student = student.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(spec, student)
    loss = make_loss(spec)
    num_samples, views = len(source), recipe.views_per_sample
    steps_per_epoch = math.ceil(num_samples / spec.batch_size)
    total_steps = spec.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    start_epoch, val_top1 = 0, None
    if checkpoint is not None:
        student.net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if "loss_state" in checkpoint:
            loss.load_state_dict(checkpoint["loss_state"])
        start_epoch = checkpoint["epoch"] + 1
        val_top1 = checkpoint["val_top1"]
        say(f"resuming {out} after epoch {checkpoint['epoch'] + 1}")
    if ranks.main:
        _keep_metrics_until(out / "metrics.jsonl", start_epoch)
    # The model each step runs: DDP averages gradients over ranks; compiled on request.
    model = student
    if ranks.world > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if spec.compile:
        model = torch.compile(model)

    ranges = [(epoch % recipe.epochs, 0, num_samples) for epoch in range(start_epoch, spec.epochs)]
    student_size = spec.student_size or recipe.size
    sizes = {"views": student_size}
    if teacher is not None and student_size != recipe.size:
        sizes["teacher_views"] = recipe.size  # the teacher sees the same views at its own size
    views_dataset = ViewDataset(source, recipe, sizes)
    if readers:
        views_dataset = CachedViews(views_dataset, archives, spec.storage_options, spec.local_cache)
    loader = DataLoader(
        views_dataset,
        batch_sampler=RangeBatches(ranges, num_samples, spec.batch_size, ranks),
        num_workers=spec.workers,
        pin_memory=device.type == "cuda",
    )
    val_loader = probe_loader = None
    if val_source is not None and ranks.main:
        val_loader = whole_images(val_source, student_size, spec.workers)
        if spec.loss == "seed":
            probe_loader = whole_images(probe_source, student_size, spec.workers)
    batches = iter(loader)
    train_seconds, train_views = 0.0, 0
    try:
        with views_progress() as progress:
            for epoch in range(start_epoch, spec.epochs):
                student.train()
                epoch_started = time.perf_counter()
                sums: dict[str, float] = {}
                task = progress.add_task(f"epoch {epoch + 1}/{spec.epochs}", total=num_samples * views)
                for step in range(steps_per_epoch):
                    batch = next(batches)
                    count = len(batch["index"])
                    global_count = min(spec.batch_size, num_samples - step * spec.batch_size)
                    images = _to_device(batch["views"].flatten(0, 1), device)
                    labels = batch["label"].repeat_interleave(views).to(device)
                    mixing = None
                    if recipe.mixup:
                        mixing = (batch["partner_label"].repeat_interleave(views).to(device), batch["lam"].flatten().to(device))
                    teacher_logits = None
                    if readers:
                        teacher_logits = {name: logits.flatten(0, 1).to(device, non_blocking=True)
                                          for name, logits in batch["teacher_logits"].items()}
                    elif teacher is not None:
                        teacher_views = _to_device(batch["teacher_views"].flatten(0, 1), device) if "teacher_views" in batch else images
                        teacher_logits = {"online": teacher(teacher_views, spec.teacher_batch_size).clone()}  # clone: leave inference mode
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerated(device)):
                        student_logits = model(images)
                    terms = loss_terms(student_logits, teacher_logits, labels, spec, mixing, epoch, columns, loss)
                    if not torch.isfinite(terms["loss"]):
                        raise TrainingError(
                            f"the loss became {terms['loss'].item()} at epoch {epoch + 1}, step {step + 1}; "
                            "lower --lr or check the data and teacher"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    # Each rank's mean over its part, weighted so that DDP's average over
                    # ranks is the mean over the whole global batch.
                    (terms["loss"] * (count * ranks.world / global_count)).backward()
                    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value.item() * count
                    progress.advance(task, global_count * views)
                progress.remove_task(task)
                sums = distributed.sum_across(sums, device)
                seconds = time.perf_counter() - epoch_started
                train_seconds += seconds
                train_views += num_samples * views
                if not ranks.main:
                    continue
                if probe_loader is not None:
                    val_top1 = linear_probe(student, probe_loader, val_loader, device)
                elif val_loader is not None:
                    val_top1 = evaluate(student, val_loader, device)
                record = {"epoch": epoch + 1} | {k: v / num_samples for k, v in sorted(sums.items())} | {
                    "val_top1": val_top1,
                    "seconds": seconds,
                    "views_per_sec": num_samples * views / seconds,
                }
                _append_metrics(out / "metrics.jsonl", record)
                _save_torch(
                    {
                        "model": student.net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        **({"loss_state": loss.state_dict()} if hasattr(loss, "state_dict") else {}),
                        "epoch": epoch,
                        "val_top1": val_top1,
                        "config": config,
                    },
                    out / CHECKPOINT,
                )
                shown = f"  val_top1 {val_top1:.2f}%" if val_top1 is not None else ""
                say(f"[{spec.mode}] epoch {epoch + 1}/{spec.epochs}  loss {record['loss']:.4f}{shown}  {record['views_per_sec']:,.0f} views/s")
    except BaseException:
        del batches  # the traceback keeps this frame: let the DataLoader workers go now
        raise

    summary = {
        "mode": spec.mode,
        "val_top1": val_top1,
        "epochs": spec.epochs,
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "views_per_sec": train_views / train_seconds if train_seconds else None,
        "student": student_spec.name,
        "run_dir": str(out),
        "ranks": ranks.world,
    }
    if ranks.main:
        _save_torch(student.net.state_dict(), out / "student.pt")
        _write_json(out / "summary.json", summary)
    distributed.barrier()  # no rank reports success before the weights are saved
    return summary


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of views on `device`: copied without blocking from pinned memory, and
    channels-last on a GPU (where convolutions are fastest that way)."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if accelerated(device) else images


class CachedViews(Dataset):
    """ViewDataset items with each teacher's logits for their views attached, by name.

    A batch (consecutive positions of one epoch) is read as one slab per teacher, after
    checking that the stored sample indices and view parameters are exactly those of
    the views just rendered. Archives are opened in the process that loads the batch,
    so each DataLoader worker has its own store connections (never one inherited over fork).
    """

    def __init__(self, views: ViewDataset, archives: dict[str, str], storage_options: dict, local_cache: str | None):
        self.views, self.archives = views, archives
        self.storage_options, self.local_cache = storage_options, local_cache
        self._readers: tuple[int, dict[str, ArchiveReader]] | None = None

    def __len__(self) -> int:
        return len(self.views)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_readers": None}  # a worker opens its own

    def readers(self) -> dict[str, ArchiveReader]:
        if self._readers is None or self._readers[0] != os.getpid():
            opened = {name: ArchiveReader(url, self.storage_options, self.local_cache) for name, url in self.archives.items()}
            self._readers = (os.getpid(), opened)
        return self._readers[1]

    def __getitem__(self, item: int) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int]) -> list[dict]:
        samples = [self.views[item] for item in items]
        epoch, first, last = samples[0]["epoch"], samples[0]["position"], samples[-1]["position"]
        for sample in samples:
            sample["teacher_logits"] = {}
        for name, reader in self.readers().items():
            archive = self.archives[name]
            logits, params, indices = reader.read(epoch, first, last + 1)
            if not np.array_equal(indices, [s["index"] for s in samples]):
                raise ArchiveMismatchError(f"archive {archive} holds other samples at epoch {epoch}, positions {first}-{last}")
            if not np.array_equal(params, np.stack([s["params"].numpy() for s in samples])):
                raise ArchiveMismatchError(
                    f"archive {archive} recorded other view parameters at epoch {epoch}, positions {first}-{last}: "
                    "the recipe, the data or kdpipe's view code changed since it was cached"
                )
            for sample, sample_logits in zip(samples, logits):
                sample["teacher_logits"][name] = torch.from_numpy(sample_logits)
        return samples


def _keep_metrics_until(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs that were not checkpointed (a resumed run redoes them)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs_done]
        _write_run_file(path, "".join(line + "\n" for line in lines).encode())


def _append_metrics(path: Path, record: dict) -> None:
    """Add one epoch's line, rewriting the (small) file whole so no line is ever torn."""
    old = path.read_bytes() if path.exists() else b""
    _write_run_file(path, old + (json.dumps(record) + "\n").encode())
