"""`kdpipe order-teachers`: in which order a student should learn from several teachers.

Multi-teacher progressive distillation (MTPD, Cao et al., ICML 2023) teaches a student
one teacher at a time, a curriculum that ends with the accurate but complex target
teacher, each earlier teacher a stepping stone towards the next. kdpipe builds the
sequence backward and greedily from the target: the teacher before the current one is
the candidate whose outputs adapt to the current teacher's most cheaply, and the chain
stops when the student itself adapts to the current teacher at least as cheaply as any
candidate left (a further stepping stone would not help). The adaptation cost from
model A to model B is the held-out error of a linear map fitted from A's outputs to
B's on the same views, as a share of B's variance (0: B is a linear function of A;
1: A says nothing about B). A model's outputs are its logits, or for detectors (the
paper's setting) its neck's maps, each level average-pooled to 2 x 2: the cost is then
that of adapting one neck to another, which is what MTPD's feature matching asks of the
student (the paper ranks teachers by a representation similarity of the same maps).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import MAIN_TEACHER, ModelSpec
from .data import RangeBatches, ViewDataset, open_source
from .errors import ConfigError
from .detection import detection_classes
from .detectors import build_detector
from .models import build_model, output_classes, with_num_classes
from .store import ArchiveReader, Location, added_teachers, check_archive_matches, read_manifest, teacher_archive

HELD_OUT = 0.25  # share of the samples the fitted maps are scored on
RIDGE = 1e-3  # ridge penalty, relative to the mean variance of the inputs
STUDENT = "student"  # the student's row in the cost table (no teacher may take this name)


def adaptation_cost(source: np.ndarray, target: np.ndarray, split: int) -> float:
    """Held-out squared error of the ridge map source -> target fitted on rows [:split],
    scored on rows [split:], divided by the target's held-out variance."""
    inputs = np.hstack([source, np.ones((len(source), 1))]).astype(np.float64)
    targets = target.astype(np.float64)
    fit_in, fit_out = inputs[:split], targets[:split]
    penalty = RIDGE * max(float(fit_in[:, :-1].var(0).mean()), 1e-12) * split
    gram = fit_in.T @ fit_in + penalty * np.eye(inputs.shape[1])
    weights = np.linalg.solve(gram, fit_in.T @ fit_out)
    residual = inputs[split:] @ weights - targets[split:]
    spread = targets[split:] - targets[split:].mean(0)
    return float((residual**2).sum() / max((spread**2).sum(), 1e-12))


def cost_table(outputs: dict[str, np.ndarray], student: np.ndarray, split: int) -> dict[str, dict[str, float]]:
    """The adaptation cost from every model (the student first) to every other teacher."""
    models = {STUDENT: student} | outputs
    return {a: {b: adaptation_cost(models[a], outputs[b], split) for b in outputs if b != a} for a in models}


def backward_greedy_order(table: dict[str, dict[str, float]], target: str) -> list[tuple[str, float]]:
    """The teachers to learn from, first to last, ending with `target`; each with the
    cost of adapting to it from the model before it in the chain (the student first).
    `table` is `cost_table`'s."""
    chain, current = [target], target
    remaining = set(table) - {STUDENT, target}
    while remaining:
        best = min(remaining, key=lambda name: (table[name][current], name))
        if table[STUDENT][current] <= table[best][current]:
            break  # the student is as close to the current teacher as any stepping stone
        chain.insert(0, best)
        remaining.remove(best)
        current = best
    return [(name, table[source][name]) for source, name in zip([STUDENT, *chain[:-1]], chain)]


NECK_POOL = 2  # a detector's neck levels are compared average-pooled to 2 x 2 each


def pooled_maps(maps: dict[str, np.ndarray]) -> np.ndarray:
    """(views, features): each (views, C, H, W) map average-pooled to NECK_POOL x NECK_POOL
    (adaptive pooling's bins), flattened, the levels side by side."""
    pool = torch.nn.AdaptiveAvgPool2d(NECK_POOL)
    return np.concatenate([pool(torch.from_numpy(value).float()).flatten(1).numpy() for value in maps.values()], axis=1)


def _pooled_neck(reader: ArchiveReader, count: int) -> np.ndarray:
    """A detector teacher's pooled neck maps (`pooled_maps`) for the views of the first
    `count` positions of epoch 0."""
    fields = reader.read_fields(0, 0, count)
    return pooled_maps({module: reader.decode_feature(module, fields).reshape(-1, *feature.decoded_shape)
                        for module, feature in reader.features.items()})


def order_teachers(
    data: str, cache: str, student: ModelSpec, teachers: tuple[str, ...] | None = None, samples: int = 512,
    storage_options: dict | None = None, epochs: int | None = None, target: str = MAIN_TEACHER,
) -> dict:
    """Order the archive's teachers for `student`, ending with `target`, on the views of
    the first `samples` positions of epoch 0 (the maps are scored on the last quarter)."""
    storage_options = storage_options or {}
    location = Location(cache, storage_options)
    read_manifest(location)  # a clear error for a missing or unfinished archive
    names = list(teachers or [MAIN_TEACHER, *added_teachers(location)])
    if target not in names:
        names.append(target)
    if STUDENT in names:
        raise ConfigError(f"a teacher named {STUDENT!r} would be confused with the student; "
                          "leave it out with --teachers, or add it again under another name")
    if len(names) < 2:
        raise ConfigError(f"archive {cache} has one teacher ({names[0]}); add others with cache-teacher --teacher-name")
    readers = {name: ArchiveReader(teacher_archive(cache, name), storage_options) for name in names}
    main = next(iter(readers.values())).manifest
    detectors = main.teacher.outputs == "features"
    for reader in readers.values():
        # a classifier's order is its logits': feature maps are neither fetched nor decoded
        reader.read_only_features(tuple(reader.features) if detectors else ())
    source = open_source(data)
    check_archive_matches(main, cache, dataset__fingerprint=source.describe()["fingerprint"])  # the views' images
    count = min(samples, main.layout.num_samples)
    if count < 8:
        raise ConfigError(f"--samples must be at least 8 to fit and score the maps, got {count}")
    recipe = main.recipe
    loader = DataLoader(ViewDataset(source, recipe), batch_sampler=RangeBatches([(0, 0, count)], len(source), 64))
    if detectors:
        outputs = {name: _pooled_neck(reader, count) for name, reader in readers.items()}
        model = build_detector(student, detection_classes(source), recipe.size).eval()
        with torch.inference_mode():
            student_outputs = np.concatenate([pooled_maps({level: value.numpy() for level, value in
                                                           model.neck(batch["views"].flatten(0, 1)).items()})
                                              for batch in loader])
    else:
        outputs = {name: reader.read(0, 0, count)[0].reshape(count * main.layout.views_per_sample, -1)
                   for name, reader in readers.items()}
        model = build_model(with_num_classes(student, source.classes, "student") if student.num_classes is None
                            else student).eval()
        output_classes(model, recipe.size, "student")  # logits it gives, or one clear line
        with torch.inference_mode():
            student_outputs = np.concatenate([model(batch["views"].flatten(0, 1)).float().numpy() for batch in loader])
    split = int(round(count * (1 - HELD_OUT))) * recipe.views_per_sample  # whole samples on each side
    table = cost_table(outputs, student_outputs, split)
    order = backward_greedy_order(table, target)
    chosen = [name for name, _ in order]
    report = {"order": chosen, "costs": {name: cost for name, cost in order},
              "skipped": [name for name in names if name not in chosen], "table": table,
              "views": len(student_outputs), "held_out_views": len(student_outputs) - split}
    if epochs is not None:
        shares = np.diff(np.round(np.linspace(0, epochs, len(order) + 1)).astype(int))
        report["schedule"] = ",".join(f"{name}:{share}" for (name, _), share in zip(order, shares))
    return report


def format_order(report: dict) -> str:
    """The suggested order with the cost of each step, then every pairwise cost."""
    lines = ["suggested order (learn from the first, end with the last):"]
    before = ["student"] + report["order"][:-1]
    for step, (name, source) in enumerate(zip(report["order"], before), 1):
        lines.append(f"  {step}. {name:<16} adaptation cost {source} -> {name}: {report['costs'][name]:.4f}")
    if report["skipped"]:
        lines.append(f"not used (no cheaper step than the student's own): {', '.join(report['skipped'])}")
    if "schedule" in report:
        lines.append(f"train-student --teachers {','.join(report['order'])} --schedule {report['schedule']}")
    lines.append(f"adaptation costs (row -> column; {report['views']} views, {report['held_out_views']} held out):")
    for source, costs in report["table"].items():
        lines.append(f"  {source:<16} " + "  ".join(f"{name}: {cost:.4f}" for name, cost in costs.items()))
    return "\n".join(lines)
