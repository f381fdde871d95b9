"""`kdpipe bench`: what caching the teacher buys, measured side by side on one machine.

Every figure comes from the same run, models, data and recipe, so the ratios hold even
on a shared, noisy machine: supervised, cached-KD and online-KD training, the teacher's
inference alone, cache-teacher, and reading the logits back. The images are real JPEG
files written once (so each view's cost includes a real decode), in class folders.
"""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

import torch
from PIL import Image

from . import distributed
from .cache import cache_teacher
from .config import CacheSpec, ModelSpec, TrainSpec, ViewRecipe
from .data import SyntheticImages, ViewDataset, content_digest, open_source
from .host import keep_freed_memory
from .models import Teacher, with_num_classes
from .progress import say
from .store import ArchiveReader
from .train import train_student

T = TypeVar("T")

# What each measured figure is, in the order they are taken and printed.
CASES = {
    "supervised": "supervised student training, V views per decode",  # training: steady-state epochs
    "supervised_1view": "supervised student training, 1 view per decode",
    "cached": "cached-KD student training",
    "online": "online-KD student training (teacher live)",
    "teacher": "teacher inference alone (views in memory)",
    "cache_teacher": "cache-teacher (decode, render, teacher, encode, write)",
    "read": "logit reads (one core, verified, decoded)",
    "content_check": "content check alone (read + sha256 of each image, one core)",
}
TARGETS = {
    "cached/supervised": 0.97,
    "cached/online vs ideal": 0.9,
    "cache_teacher/teacher": 0.9,
    "cached (V views) / supervised (1 view)": 1.0,
}
# Ratios that must stay below their bound: the share of cached training's time that the
# per-sample content check (the sha256 of each image's bytes, checked against the
# archive's record) would cost if it ran on the training core (it runs in the workers).
CEILINGS = {
    "content check / cached": 0.03,
}


@dataclass(frozen=True)
class BenchSpec:
    """The models, data and recipe every case of one bench run shares."""

    teacher: ModelSpec
    student: ModelSpec
    workdir: str
    num_samples: int = 256
    num_classes: int = 10
    image_size: int = 320
    size: int = 224
    views_per_sample: int = 4
    epochs: int = 2
    batch_size: int = 32
    teacher_batch_size: int | None = None
    workers: int = 2
    repeats: int = 1
    compile: bool = False


def write_jpeg_images(root: Path, num_samples: int, num_classes: int, image_size: int) -> Path:
    """A labelled folder of seeded JPEG images (each class a colour pattern plus noise)."""
    if root.is_dir() and len(list(root.rglob("*.jpg"))) == num_samples:
        return root
    synthetic = SyntheticImages(num_samples, num_classes, size=image_size)
    for index in range(num_samples):
        folder = root / synthetic.classes[int(synthetic.labels[index])]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = synthetic.load(index).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)
    return root


def _teacher_alone(spec: BenchSpec, data: str, recipe: ViewRecipe) -> float:
    """Views/s of the teacher's forward passes alone, over views rendered beforehand: as
    many views as one epoch, cycling over at most 8 batches held in memory, after a
    warm-up pass on a full batch (the first pass at a batch shape is slow)."""
    keep_freed_memory()  # as cache-teacher runs it
    source = open_source(data)
    teacher = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), recipe.size)
    views = ViewDataset(source, recipe)
    held = min(len(source), 8 * spec.batch_size)
    batches = [
        torch.cat([views[i]["views"] for i in range(start, min(start + spec.batch_size, held))])
        for start in range(0, held, spec.batch_size)
    ]
    teacher(batches[0], spec.teacher_batch_size)
    _synchronize(teacher.device)
    done, started = 0, time.perf_counter()
    for batch in itertools.cycle(batches):
        if done >= len(source) * recipe.views_per_sample:
            break
        teacher(batch, spec.teacher_batch_size)
        done += len(batch)
    _synchronize(teacher.device)
    return done / (time.perf_counter() - started)


def _reads(archive: str, batch_size: int) -> float:
    """Views/s of reading every view's logits back, batch by batch, in training order."""
    torch.set_num_threads(1)
    reader = ArchiveReader(archive)
    reader.read_only_features(())
    layout = reader.layout
    started = time.perf_counter()
    for epoch in range(layout.epochs):
        for start in range(0, layout.num_samples, batch_size):
            reader.read(epoch, start, min(start + batch_size, layout.num_samples))
    seconds = time.perf_counter() - started
    return layout.views / seconds


def _content_checks(data: str, views_per_sample: int) -> float:
    """Views/s of the content check alone: each image's bytes read and hashed, on one
    core, counted as the V views each decode gives."""
    source = open_source(data)
    started = time.perf_counter()
    for index in range(len(source)):
        content_digest(source.read(index))
    return len(source) * views_per_sample / (time.perf_counter() - started)


def _steady_views_per_sec(run: Path) -> float:
    """Training views/s in the steady state: over the epochs after the first (which also
    starts the DataLoader workers and warms caches) and before the last (in which the
    workers, with nothing left to prefetch, stop competing for the cores), or over
    what there is of them in a shorter run."""
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = epochs[1:-1] or epochs[1:] or epochs
    return sum(e["views_per_sec"] * e["seconds"] for e in steady) / sum(e["seconds"] for e in steady)


def _fresh(function: Callable[..., T], *args) -> T:
    """`function(*args)` in a new Python interpreter started as a kdpipe command is (a
    plain `python -c`), so no case inherits the allocator's state, threads or caches of
    the cases before it. Run in one process or forked from one, cached KD came out 5-17%
    slower than supervised training; in a child of multiprocessing's spawn, cache-teacher
    ran 5% slower than as a command (docs/performance.md). The call and its result (or
    exception) travel as pickles in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as folder:
        call, result = Path(folder) / "call.pickle", Path(folder) / "result.pickle"
        call.write_bytes(pickle.dumps((function, args)))
        code = "import sys; from pipeline.bench import _call_pickled; _call_pickled(sys.argv[1], sys.argv[2])"
        subprocess.run([sys.executable, "-c", code, str(call), str(result)], check=True)
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise value
    return value


def _call_pickled(call: str, result: str) -> None:
    """The child's side of `_fresh`: run the pickled call, pickle (ok, value or exception)."""
    function, args = pickle.loads(Path(call).read_bytes())
    try:
        outcome = (True, function(*args))
    except Exception as exc:  # handed to the parent, which raises it there
        outcome = (False, exc)
    Path(result).write_bytes(pickle.dumps(outcome))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(spec: BenchSpec) -> dict:
    """Measure every case (best of `repeats`), then the ratios and whether each target holds."""
    workdir = Path(spec.workdir)
    data = str(write_jpeg_images(workdir / "images", spec.num_samples, spec.num_classes, spec.image_size))
    recipe = ViewRecipe(size=spec.size, views_per_sample=spec.views_per_sample, epochs=spec.epochs, scale=(0.35, 1.0))
    threads = torch.get_num_threads()
    best: dict[str, float] = {}

    def record(case: str, views_per_sec: float) -> None:
        best[case] = max(best.get(case, 0.0), views_per_sec)
        say(f"bench: {CASES[case]}: {views_per_sec:,.1f} views/s")

    def train(case: str, mode: str, repeat: int, views: ViewRecipe | None, **changes) -> None:
        """Train the student in `mode` on the `views` recipe (None: the archive's). At one
        view per sample it trains V times the epochs on batches of V times the samples,
        so every case trains on as many views, in steps of as many views."""
        scale = spec.views_per_sample // views.views_per_sample if views is not None else 1
        train_spec = TrainSpec(
            data=data, student=spec.student, out=str(workdir / f"{case}-{repeat}"), mode=mode,
            epochs=spec.epochs * scale, batch_size=spec.batch_size * scale, workers=spec.workers,
            compile=spec.compile, **changes,
        )
        _fresh(train_student, train_spec, views.to_dict() if views is not None else {})
        record(case, _steady_views_per_sec(Path(train_spec.out)))

    for repeat in range(spec.repeats):
        archive = str(workdir / f"archive-{repeat}")
        cached = _fresh(cache_teacher, CacheSpec(
            data=data, teacher=spec.teacher, out=archive, recipe=recipe, batch_size=spec.batch_size,
            workers=spec.workers,
        ))
        record("cache_teacher", cached["views_per_sec"])
        record("teacher", _fresh(_teacher_alone, spec, data, recipe))
        one_view = replace(recipe, views_per_sample=1, epochs=recipe.epochs * recipe.views_per_sample)
        runs = [
            lambda: train("supervised", "supervised", repeat, recipe),
            lambda: train("supervised_1view", "supervised", repeat, one_view),
            lambda: train("cached", "cached", repeat, None, cache=archive),
            lambda: train("online", "online", repeat, recipe, teacher=spec.teacher, teacher_batch_size=spec.teacher_batch_size),
        ]
        for run in runs if repeat % 2 == 0 else reversed(runs):  # alternate, so a drifting machine favours no case
            run()
        record("read", _fresh(_reads, archive, spec.batch_size))
        record("content_check", _fresh(_content_checks, data, spec.views_per_sample))

    t_teacher, t_student = 1 / best["teacher"], 1 / best["supervised"]
    ideal = (t_teacher + t_student) / t_student
    ratios = {
        "cached/supervised": best["cached"] / best["supervised"],
        "cached/online": best["cached"] / best["online"],
        "ideal cached/online": ideal,
        "cached/online vs ideal": best["cached"] / best["online"] / ideal,
        "cache_teacher/teacher": best["cache_teacher"] / best["teacher"],
        "cached (V views) / supervised (1 view)": best["cached"] / best["supervised_1view"],
        "content check / cached": best["cached"] / best["content_check"],
    }
    targets = {name: {"target": target, "met": bool(ratios[name] >= target)} for name, target in TARGETS.items()}
    targets |= {name: {"ceiling": ceiling, "met": bool(ratios[name] <= ceiling)} for name, ceiling in CEILINGS.items()}
    return {
        "setup": {
            "teacher": spec.teacher.name, "student": spec.student.name, "samples": spec.num_samples,
            "image_size": spec.image_size, "size": spec.size, "views_per_sample": spec.views_per_sample,
            "epochs": spec.epochs, "batch_size": spec.batch_size, "workers": spec.workers, "repeats": spec.repeats,
            "device": _device_name(), "threads": threads, "torch": torch.__version__,
        },
        "views_per_sec": best,
        "ratios": ratios,
        "targets": targets,
    }


def _device_name() -> str:
    device = distributed.device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_bench(report: dict) -> str:
    """The report as aligned text: the setup, each case's views/s, the ratios against their targets."""
    setup = report["setup"]
    lines = [
        f"teacher {setup['teacher']}, student {setup['student']}, {setup['samples']} JPEG images "
        f"({setup['image_size']} px) -> {setup['size']} px views, V = {setup['views_per_sample']} views per decode, "
        f"{setup['epochs']} epochs, batch {setup['batch_size']} samples, {setup['workers']} workers, "
        f"best of {setup['repeats']}, on {setup['device']} ({setup['threads']} threads), torch {setup['torch']}",
        "",
    ]
    width = max(len(text) for text in CASES.values())
    for case, text in CASES.items():
        lines.append(f"  {text:<{width}}  {report['views_per_sec'][case]:>12,.1f} views/s")
    lines.append("")
    width = max(len(name) for name in report["ratios"])
    for name, value in report["ratios"].items():
        target = report["targets"].get(name)
        bound = "" if target is None else f">= {target['target']:g}" if "target" in target else f"<= {target['ceiling']:g}"
        verdict = f"  (target {bound}: {'met' if target['met'] else 'NOT met'})" if target else ""
        lines.append(f"  {name:<{width}}  {value:>7.3f}{verdict}")
    return "\n".join(lines)

