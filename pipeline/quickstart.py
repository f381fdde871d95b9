"""`kdpipe quickstart`: the whole job on scikit-learn's bundled 8x8 digits, in minutes.

The setting is reduced labelling, where distillation earns its keep: the teacher was
trained with every label, but the student has labels for only a few images per class.
The supervised baseline learns from those few; the distilled students learn from the
teacher's logits on every training image (no labels at all), cached or online.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .cache import cache_teacher
from .coco import write_digit_scenes
from .config import MAIN_TEACHER, CacheSpec, ModelSpec, TrainSpec, ViewRecipe
from .detection import NECK, detection_recipe, train_detector
from .errors import ConfigError
from .progress import say
from .report import write_report
from .train import train_student

MARKER = ".kdpipe-quickstart"
VAL_FRACTION = 0.2
LABELLED_PER_CLASS = 5  # the student's labels: 50 of 1,438 training images
SPLIT_SEED = 0
TEACHER, STUDENT = "kdpipe:cnn", "kdpipe:mlp"
# Mild crops rendered at 16 px; no flips, since digits are not mirror-symmetric.
RECIPE = {"size": 16, "scale": (0.5, 1.0), "ratio": (0.8, 1.25), "flip_prob": 0.0}
TEACHER_EPOCHS, STUDENT_EPOCHS, SUPERVISED_EPOCHS = 6, 6, 150  # 50 images: one step an epoch
KD_VIEWS = 2
EMA_DECAY = 0.99  # the students keep an EMA of their weights, scored beside them
# 8x8 PNGs decode in microseconds; on two cores the main process renders and trains, and
# worker processes would only compete with it for the same cores.
WORKERS = 0


def materialise_digits(root: Path, labelled_per_class: int = LABELLED_PER_CLASS) -> dict[str, Path]:
    """Write the digits as real PNG files: `train/` and `val/` (class folders), `labelled/`
    (the few labelled training images) and `pool/` (every training image, unlabelled)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pixels))
    num_val = int(len(pixels) * VAL_FRACTION)
    val, train = order[:num_val], order[num_val:]
    labelled = np.concatenate([train[digits.target[train] == c][:labelled_per_class] for c in range(10)])
    folders = {name: root / name for name in ("train", "val", "labelled", "pool")}
    for name, indices in (("train", train), ("val", val), ("labelled", labelled)):
        for i in indices:
            path = folders[name] / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(path)
    folders["pool"].mkdir(parents=True, exist_ok=True)
    for i in train:
        Image.fromarray(pixels[i], mode="L").save(folders["pool"] / f"{i:04d}.png")
    return folders


def _mean(runs: list[dict], key: str) -> float | None:
    """The mean of a figure over the runs, None where the runs have none (no EMA, no teacher)."""
    if any(run.get(key) is None for run in runs):
        return None
    return statistics.fmean(run[key] for run in runs)


def _entry(runs: list[dict], figures: tuple[str, ...], headline: str, **fixed) -> dict:
    """A row of the summary: the mean of each of `figures` over the runs (one per seed),
    `fixed` as given, the seed count and, over several seeds, the `headline` figure per
    seed and its standard deviation."""
    entry = {key: _mean(runs, key) for key in figures} | fixed | {"seeds": len(runs)}
    if len(runs) > 1:
        entry[f"{headline}_per_seed"] = [run[headline] for run in runs]
        entry[f"{headline}_std"] = statistics.stdev(run[headline] for run in runs)
    return entry


CLASSIFICATION_FIGURES = ("val_top1", "val_top5", "val_top1_ema", "val_agreement", "val_kl", "wall_seconds",
                          "views_per_sec")
DETECTION_FIGURES = ("val_map", "val_map50", "val_map75", "wall_seconds")


def _fresh_folder(out: str) -> Path:
    """The quickstart's folder, emptied: a folder it made before is replaced whole, any
    other non-empty folder is refused (nothing of the user's is deleted)."""
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise ConfigError(f"{root} exists and is not a quickstart folder; choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by kdpipe quickstart; the whole folder is replaced when it runs again\n")
    return root


def run_quickstart(out: str, seeds: int = 1) -> dict:
    """Run the quickstart into `out`, print its table and return its summary."""
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    started = time.perf_counter()
    root = _fresh_folder(out)
    folders = materialise_digits(root / "digits")
    num_labelled = sum(1 for _ in folders["labelled"].rglob("*.png"))
    num_train = sum(1 for _ in folders["train"].rglob("*.png"))
    say(f"digits: {num_train} training images, {num_labelled} of them labelled for the student, "
        f"{sum(1 for _ in folders['val'].rglob('*.png'))} for validation")

    def train(name: str, data: str, model: ModelSpec, mode: str, epochs: int, recipe: dict, **options) -> dict:
        spec = TrainSpec(data=str(folders[data]), student=model, out=str(root / "runs" / name), mode=mode,
                         val=str(folders["val"]), epochs=epochs, lr=3e-3, batch_size=64, workers=WORKERS, **options)
        return train_student(spec, recipe)

    kd_recipe = RECIPE | {"views_per_sample": KD_VIEWS}
    say("1/4 teacher: supervised on every training label")
    teacher = train("teacher", "train", ModelSpec(TEACHER), "supervised", TEACHER_EPOCHS, RECIPE)
    teacher_model = ModelSpec(TEACHER, num_classes=10, weights=str(root / "runs" / "teacher" / "student.pt"))
    say("2/4 cache-teacher: teacher logits for every view of the unlabelled pool")
    archive = str(root / "teacher.zarr")
    cache = cache_teacher(
        CacheSpec(data=str(folders["pool"]), teacher=teacher_model, out=archive,
                  recipe=ViewRecipe.from_dict(kd_recipe | {"epochs": STUDENT_EPOCHS}), workers=WORKERS)
    )
    runs: dict[str, list[dict]] = {"supervised": [], "online": [], "cached": []}
    for seed in range(seeds):
        say(f"3/4 students, seed {seed}: supervised on {num_labelled} labels")
        runs["supervised"].append(
            train(f"supervised-seed{seed}", "labelled", ModelSpec(STUDENT), "supervised", SUPERVISED_EPOCHS, RECIPE,
                  seed=seed, ema=EMA_DECAY)
        )
        say(f"4/4 students, seed {seed}: distilled online and from the cache (no labels)")
        runs["online"].append(
            train(f"online-seed{seed}", "pool", ModelSpec(STUDENT), "online", STUDENT_EPOCHS, kd_recipe,
                  seed=seed, teacher=teacher_model, ema=EMA_DECAY)
        )
        runs["cached"].append(  # the recipe comes from the archive
            train(f"cached-seed{seed}", "pool", ModelSpec(STUDENT), "cached", STUDENT_EPOCHS, {}, seed=seed, cache=archive,
                  ema=EMA_DECAY)
        )
    summary = {
        "setting": (f"reduced labelling: teacher {TEACHER} trained on all {num_train} labels; student {STUDENT} "
                    f"has {num_labelled} labels (supervised) or the teacher's logits on all {num_train} images "
                    "without labels (online, cached)"),
        "teacher": _entry([teacher], CLASSIFICATION_FIGURES, "val_top1", labels_used=num_train),
        "supervised": _entry(runs["supervised"], CLASSIFICATION_FIGURES, "val_top1", labels_used=num_labelled),
        "online": _entry(runs["online"], CLASSIFICATION_FIGURES, "val_top1", labels_used=0),
        "cached": _entry(runs["cached"], CLASSIFICATION_FIGURES, "val_top1", labels_used=0),
        "cache": {"bytes": cache["bytes"], "bytes_per_view": cache["bytes_per_view"], "views": cache["views"],
                  "views_per_sec": cache["views_per_sec"]},
        "wall_seconds": time.perf_counter() - started,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(summary))
    report = write_report([str(root / "runs" / name) for name in ("teacher", "supervised-seed0", "online-seed0",
                                                                   "cached-seed0")], str(root))
    say(f"the teacher's and the seed-0 students' figures per epoch: {report['plot']} (table: {report['table']})")
    return summary


def format_table(summary: dict) -> str:
    """The quickstart's result table, as plain text."""
    lines = [
        f"setting: {summary['setting']}",
        "",
        f"{'run':<12}{'labels':>8}{'val top-1 %':>16}{'top-5 %':>9}{'EMA top-1':>11}{'agreement':>11}"
        f"{'wall s':>9}{'views/s':>10}",
    ]
    for name in ("teacher", "supervised", "online", "cached"):
        e = summary[name]
        accuracy = f"{e['val_top1']:.2f}" + (f" ±{e['val_top1_std']:.2f}" if "val_top1_std" in e else "")
        figures = "".join(f"{'-' if e.get(key) is None else format(e[key], '.2f'):>{width}}"
                          for key, width in (("val_top5", 9), ("val_top1_ema", 11), ("val_agreement", 11)))
        lines.append(f"{name:<12}{e['labels_used']:>8}{accuracy:>16}{figures}{e['wall_seconds']:>9.1f}"
                     f"{e['views_per_sec']:>10,.0f}")
    c = summary["cache"]
    lines += [
        "",
        f"cache: {c['views']:,} views, {c['bytes']:,} bytes, {c['bytes_per_view']:.1f} bytes/view",
        "agreement: % of val images where the student's top-1 is the teacher's; EMA: the average of its weights "
        f"(--ema {EMA_DECAY})",
        f"student figures are means over {summary['cached']['seeds']} seed(s) (± standard deviation); "
        f"total {summary['wall_seconds']:.0f} s",
    ]
    return "\n".join(lines)


# The detection quickstart: digits pasted on real photographs (`coco.write_digit_scenes`).
DETECTION_TEACHER, DETECTION_ASSISTANT, DETECTION_STUDENT = "kdpipe:det-small", "kdpipe:det-tiny", "kdpipe:det-tiny"
DETECTION_IMAGES = {"train": 240, "val": 80}
DETECTION_RECIPE = {"size": 96}
DETECTION_EPOCHS = {"teacher": 20, "assistant": 10, "student": 8}
DETECTION_BATCH, DETECTION_LR = 16, 5e-3
# The neck term starts near 25 (the teacher's maps are not normalised) against a detection
# loss near 2: weighted 0.1, neither drowns the other (on seed 0, weight 1 gave 4.48 mAP,
# 0.3 gave 4.80, 0.1 gave 5.39, 0.03 gave 4.87, the student alone 4.23).
DETECTION_NECK_WEIGHT = 0.1


def run_detection_quickstart(out: str, seeds: int = 1) -> dict:
    """The detection quickstart into `out`: a teacher detector and a weaker assistant
    trained on the boxes, their neck features cached (float32) for the student's views,
    then the student detector trained alone, distilled from the teacher (cached, and
    online for comparison) and progressively from the assistant then the teacher (MTPD);
    prints the mAP table and returns the summary."""
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    started = time.perf_counter()
    root = _fresh_folder(out)
    data = write_digit_scenes(root / "scenes", DETECTION_IMAGES["train"], DETECTION_IMAGES["val"])
    train_data, val_data = f"coco:{data['train']}", f"coco:{data['val']}"
    say(f"digit scenes: {DETECTION_IMAGES['train']} training and {DETECTION_IMAGES['val']} validation images "
        f"({data['images']})")

    def train(name: str, model: ModelSpec, mode: str, epochs: int, recipe: dict, **options) -> dict:
        spec = TrainSpec(data=train_data, student=model, out=str(root / "runs" / name), mode=mode, val=val_data,
                         epochs=epochs, lr=DETECTION_LR, batch_size=DETECTION_BATCH, workers=WORKERS,
                         **options)
        return train_detector(spec, recipe)

    say("1/4 teachers: the teacher and its assistant, trained on the boxes")
    epochs = DETECTION_EPOCHS["student"]
    teachers = {"teacher": train("teacher", ModelSpec(DETECTION_TEACHER), "supervised", DETECTION_EPOCHS["teacher"],
                                 DETECTION_RECIPE),
                "assistant": train("assistant", ModelSpec(DETECTION_ASSISTANT), "supervised",
                                   DETECTION_EPOCHS["assistant"], DETECTION_RECIPE, seed=1)}
    models = {name: ModelSpec(model, weights=str(root / "runs" / name / "student.pt"))
              for name, model in (("teacher", DETECTION_TEACHER), ("assistant", DETECTION_ASSISTANT))}
    say("2/4 cache-teacher: both teachers' neck features (float32) for every view the students see")
    archive = str(root / "teachers.zarr")
    recipe = detection_recipe(DETECTION_RECIPE, epochs)
    caches = {name: cache_teacher(CacheSpec(data=train_data, teacher=models[name], out=archive, recipe=recipe,
                                            workers=WORKERS, teacher_name=archive_name, features=(f"{NECK}=fp32",)))
              for name, archive_name in (("teacher", MAIN_TEACHER), ("assistant", "assistant"))}
    student = ModelSpec(DETECTION_STUDENT)
    half = epochs // 2
    runs: dict[str, list[dict]] = {"alone": [], "online": [], "cached": [], "progressive": []}
    for seed in range(seeds):
        say(f"3/4 student seed {seed}: alone, and distilled from the teacher online")
        runs["alone"].append(train(f"alone-seed{seed}", student, "supervised", epochs, DETECTION_RECIPE,
                                   seed=seed))
        runs["online"].append(train(f"online-seed{seed}", student, "online", epochs, DETECTION_RECIPE,
                                    seed=seed, teacher=models["teacher"], neck_weight=DETECTION_NECK_WEIGHT))
        say(f"4/4 student seed {seed}: distilled from the cache, from the teacher and progressively (MTPD)")
        runs["cached"].append(train(f"cached-seed{seed}", student, "cached", epochs, {}, seed=seed,
                                    cache=archive, neck_weight=DETECTION_NECK_WEIGHT))
        runs["progressive"].append(train(f"progressive-seed{seed}", student, "cached", epochs, {},
                                         seed=seed, cache=archive, neck_weight=DETECTION_NECK_WEIGHT,
                                         teachers=("assistant", MAIN_TEACHER),
                                         schedule=(("assistant", half), (MAIN_TEACHER, epochs - half))))
    summary = {
        "setting": (f"detection: student {DETECTION_STUDENT}; teacher {DETECTION_TEACHER} "
                    f"({DETECTION_EPOCHS['teacher']} epochs), assistant {DETECTION_ASSISTANT} "
                    f"({DETECTION_EPOCHS['assistant']} epochs); every student trains {epochs} epochs "
                    f"on the boxes, the distilled ones also match a teacher's neck (--neck-weight {DETECTION_NECK_WEIGHT})"),
        **{name: _entry([run], DETECTION_FIGURES, "val_map") for name, run in teachers.items()},
        **{name: _entry(found, DETECTION_FIGURES, "val_map") for name, found in runs.items()},
        "cache": {name: {"bytes": c["bytes"], "bytes_per_view": c["bytes_per_view"], "views": c["views"],
                         "seconds": c["seconds"]} for name, c in caches.items()},
        "wall_seconds": time.perf_counter() - started,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_detection_table(summary))
    return summary


DETECTION_ROWS = ("teacher", "assistant", "alone", "online", "cached", "progressive")


def format_detection_table(summary: dict) -> str:
    """The detection quickstart's result table, as plain text."""
    lines = [f"setting: {summary['setting']}", "",
             f"{'run':<13}{'val mAP':>16}{'AP50':>8}{'AP75':>8}{'wall s':>9}"]
    for name in DETECTION_ROWS:
        e = summary[name]
        value = f"{e['val_map']:.2f}" + (f" ±{e['val_map_std']:.2f}" if "val_map_std" in e else "")
        lines.append(f"{name:<13}{value:>16}{e['val_map50']:>8.2f}{e['val_map75']:>8.2f}{e['wall_seconds']:>9.1f}")
    lines.append("")
    for name, c in summary["cache"].items():
        lines.append(f"cache ({name}): {c['views']:,} views, {c['bytes_per_view']:,.0f} bytes/view, {c['seconds']:.1f} s")
    lines.append(f"student figures are means over {summary['cached']['seeds']} seed(s) (± standard deviation); "
                 f"total {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)
