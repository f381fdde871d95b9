"""What each logit codec costs: bytes per view, fidelity to the dense logits, and the
accuracy of a student trained from it.

Two settings, every archive made and every student trained through the kdpipe CLI:

(a) 1,000 classes. A teacher (`kdpipe:mlp`) is trained briefly, supervised, on
    `synthetic:N:1000:16`, then cached over the same images (random-resized crops of
    25-100% of the area, flips, as in its training) once per codec. For each
    codec: bytes per view, KL(dense-fp32 || codec) at T=1 and T=4 and top-1 agreement
    with dense-fp32, and the val top-1 of a `kdpipe:mlp` student distilled from it
    (val: held-out synthetic images of the same classes, written as PNG folders). The
    teacher's mean entropy is printed so the peakiness of its distributions can be judged.

(b) The quickstart. `kdpipe quickstart` is run once (or an existing folder reused with
    `--quickstart DIR`); its teacher is cached over the quickstart's own recipe once per
    codec, and the quickstart's cached student is trained from each archive with the
    quickstart's settings. Digits have 10 classes: topk:K with K >= 10 keeps every class
    and differs from dense only by the 1/16-nat quantisation of the log-probabilities.

    python benchmarks/codec_costs.py                       # both settings, ~10 min on 2 cores
    python benchmarks/codec_costs.py --quickstart kdpipe-quickstart   # reuse a quickstart run
    python benchmarks/codec_costs.py --quick               # (a) only, small: seconds
    python benchmarks/codec_costs.py --json                # machine-readable
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline.data import SyntheticImages
from pipeline.store import ArchiveReader, Manifest, parse_codec, read_manifest

CODECS = ("dense-fp32", "dense-fp16", "topk:5", "topk:10", "topk:20", "topk:50")
REFERENCE = "dense-fp32"  # lossless: what the other codecs are compared with
TEMPERATURES = (1.0, 4.0)
TARGET = {"codec": "topk:10", "bytes_per_view": 48, "accuracy_points": 0.5}
CLASSES, SIZE = 1000, 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kdpipe(*args) -> dict:
    """Run a kdpipe command in this process, as typed at a shell; returns its JSON line."""
    args = [str(a) for a in args]
    log(f"$ kdpipe {' '.join(args)}")
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        sys.exit(f"kdpipe {args[0]} failed (exit {result.exit_code}):\n{result.output}\n{result.exception!r}")
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_synthetic_val(root: Path, first: int, count: int) -> Path:
    """Held-out synthetic images (indices `first`..`first+count-1`, unseen in training) as
    class folders named like the synthetic source's classes."""
    source = SyntheticImages(first + count, CLASSES, SIZE)
    for folder in source.classes:  # every class folder, so the class lists match
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(first, first + count):
        pixels = source.load(index).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / source.classes[source.labels[index]] / f"{index:06d}.png")
    return root


def read_all(archive: str) -> dict:
    """Every view's decoded logits, (views, C) float32, with the views' keys."""
    reader = ArchiveReader(archive)
    logits, params, samples = [], [], []
    for epoch in range(reader.epochs):
        epoch_logits, epoch_params, epoch_samples = reader.read(epoch, 0, reader.num_samples)
        logits.append(epoch_logits.reshape(-1, reader.num_classes))
        params.append(epoch_params)
        samples.append(epoch_samples)
    return {"logits": np.concatenate(logits), "params": np.concatenate(params),
            "samples": np.concatenate(samples), "manifest": reader.manifest}


def sizes(manifest: Manifest) -> dict:
    """Bytes per view: the whole archive, its logit arrays alone, and the codec's raw
    (uncompressed) fields."""
    layout = manifest.layout
    views = layout.views
    fields = manifest.codec.fields(layout.views_per_sample, layout.num_classes)
    raw = sum(math.prod(tail) * dtype.itemsize for tail, dtype in fields.values()) / layout.views_per_sample
    logit_bytes = sum(entry.bytes for key, entry in manifest.files.items() if key.split("/")[0] in fields)
    return {"bytes_per_view": manifest.total_bytes / views, "logit_bytes_per_view": logit_bytes / views,
            "raw_logit_bytes_per_view": raw}


def fidelity(reference: np.ndarray, decoded: np.ndarray) -> dict:
    """Mean KL(reference || decoded) in nats at each temperature, and top-1 agreement."""
    out = {}
    for temperature in TEMPERATURES:
        total = 0.0
        for start in range(0, len(reference), 4096):
            p = torch.from_numpy(reference[start:start + 4096]).double().div(temperature).log_softmax(-1)
            q = torch.from_numpy(decoded[start:start + 4096]).double().div(temperature).log_softmax(-1)
            total += (p.exp() * (p - q)).sum().item()
        out[f"kl_T{temperature:g}"] = total / len(reference)
    out["top1_agreement"] = float((reference.argmax(-1) == decoded.argmax(-1)).mean())
    return out


def teacher_stats(logits: np.ndarray, ks: list[int]) -> dict:
    """How peaky the teacher is: mean entropy (nats), mean top-1 probability, and the
    mean probability mass outside the top K."""
    entropy, top1, outside = 0.0, 0.0, {k: 0.0 for k in ks}
    for start in range(0, len(logits), 4096):
        log_p = torch.from_numpy(logits[start:start + 4096]).double().log_softmax(-1)
        p = log_p.exp()
        entropy += -(p * log_p).sum().item()
        ordered = p.sort(-1, descending=True).values.cumsum(-1)
        top1 += ordered[:, 0].sum().item()
        for k in ks:
            outside[k] += (1 - ordered[:, min(k, p.shape[1]) - 1]).clamp(min=0).sum().item()
    n = len(logits)
    return {"classes": logits.shape[1], "mean_entropy_nats": entropy / n, "uniform_entropy_nats": math.log(logits.shape[1]),
            "mean_top1_prob": top1 / n, "mean_mass_outside_topk": {str(k): v / n for k, v in outside.items()}}


def compare_codecs(archives: dict[str, str]) -> tuple[dict, dict]:
    """Sizes and fidelity of every codec's archive against the reference's, and the teacher's stats."""
    reference = read_all(archives[REFERENCE])
    rows = {}
    for codec, archive in archives.items():
        decoded = reference if codec == REFERENCE else read_all(archive)
        if not (np.array_equal(decoded["samples"], reference["samples"])
                and np.array_equal(decoded["params"], reference["params"])):
            sys.exit(f"{archive} holds other views than {archives[REFERENCE]}: the benchmark is broken")
        rows[codec] = sizes(decoded["manifest"]) | fidelity(reference["logits"], decoded["logits"])
    ks = [int(c.split(":")[1]) for c in archives if c.startswith("topk:")]
    return rows, teacher_stats(reference["logits"], ks)


def cache_args(codec: str, out: Path) -> list[str]:
    return ["--codec", codec, "--out", out, "--workers", "0", "--overwrite"]


def student_args(settings: dict) -> list:
    """train-student options from a run's config.json (a TrainSpec dict)."""
    return ["--epochs", settings["epochs"], "--batch-size", settings["batch_size"], "--lr", settings["lr"],
            "--optimizer", settings["optimizer"], "--weight-decay", settings["weight_decay"],
            "--temperature", settings["temperature"], "--alpha", settings["alpha"], "--workers", settings["workers"]]


def train_students(archives: dict[str, str], data: str, val: str, student: str, settings: dict,
                   seeds: list[int], runs: Path) -> dict:
    """Val top-1 of one cached student per codec and seed."""
    out = {}
    for codec, archive in archives.items():
        accuracies = []
        for seed in seeds:
            summary = kdpipe("train-student", "--data", data, "--student", student, "--cache", archive, "--val", val,
                             *student_args(settings), "--init-seed", seed,
                             "--out", runs / f"{codec.replace(':', '')}-seed{seed}")
            accuracies.append(summary["val_top1"])
        out[codec] = {"val_top1": float(np.mean(accuracies)), "val_top1_per_seed": accuracies}
    return out


def setting_a(work: Path, args: argparse.Namespace) -> dict:
    """1,000 classes: a briefly trained MLP teacher on synthetic data."""
    data = f"synthetic:{args.samples}:{CLASSES}:{SIZE}"
    started = time.perf_counter()
    val = write_synthetic_val(work / "val", args.samples, args.val_samples)
    recipe = ["--size", SIZE, "--scale", args.scale]
    teacher = kdpipe("train-student", "--mode", "supervised", "--data", data, "--student", "kdpipe:mlp",
                     *recipe, "--epochs", args.teacher_epochs, "--lr", "3e-3", "--batch-size", 128,
                     "--workers", 0, "--val", val, "--out", work / "teacher")
    weights = work / "teacher" / "student.pt"
    archives = {}
    for codec in CODECS:
        archives[codec] = str(work / f"{codec.replace(':', '')}.zarr")
        kdpipe("cache-teacher", "--data", data, "--teacher", "kdpipe:mlp", "--weights", weights,
               *recipe, "--epochs", args.cache_epochs, *cache_args(codec, Path(archives[codec])))
    rows, stats = compare_codecs(archives)
    settings = {"epochs": args.cache_epochs, "batch_size": 128, "lr": 3e-3, "optimizer": "adamw",
                "weight_decay": 0.05, "temperature": 1.0, "alpha": 0.0, "workers": 0}
    students = train_students(archives, data, str(val), "kdpipe:mlp", settings,  # seeds other than the teacher's 0
                              list(range(1, args.seeds + 1)), work / "runs")
    for codec in rows:
        rows[codec] |= students[codec]
    return {
        "setting": (f"{CLASSES} classes: teacher kdpipe:mlp trained {args.teacher_epochs} epochs on {data} "
                    f"(val top-1 {teacher['val_top1']:.2f}% on {args.val_samples} held-out images); cached over "
                    f"{args.cache_epochs} epochs x {args.samples} samples x 1 view at {SIZE} px, crops of "
                    f"{args.scale.replace(',', '-')} of the area, flips; "
                    f"students kdpipe:mlp, {args.cache_epochs} epochs, lr 3e-3, batch 128, T=1, "
                    f"init seeds {list(range(1, args.seeds + 1))}"),
        "teacher_val_top1": teacher["val_top1"],
        "teacher": stats,
        "codecs": rows,
        "wall_seconds": time.perf_counter() - started,
    }


def setting_b(work: Path, args: argparse.Namespace) -> dict:
    """The quickstart: its teacher, recipe and cached student, once per codec."""
    started = time.perf_counter()
    quickstart = Path(args.quickstart) if args.quickstart else work / "quickstart"
    if not args.quickstart:
        log("$ kdpipe quickstart (once, for its data, teacher and settings)")
        result = CliRunner().invoke(app, ["quickstart", "--out", str(quickstart)])
        if result.exit_code != 0:
            sys.exit(f"kdpipe quickstart failed:\n{result.output}")
    summary = json.loads((quickstart / "summary.json").read_text())
    manifest = read_manifest(quickstart / "teacher.zarr")
    settings = json.loads((quickstart / "runs" / "cached-seed0" / "config.json").read_text())
    recipe, teacher = manifest.recipe.to_dict(), manifest.teacher.spec
    recipe_args = ["--size", recipe["size"], "--scale", ",".join(map(str, recipe["scale"])),
                   "--ratio", ",".join(map(str, recipe["ratio"])), "--flip-prob", recipe["flip_prob"],
                   "--color-jitter", recipe["color_jitter"], "--views-per-sample", recipe["views_per_sample"],
                   "--epochs", recipe["epochs"], "--seed", recipe["seed"]]
    teacher_args = ["--teacher", teacher["name"], "--weights", teacher["weights"], "--num-classes",
                    teacher["num_classes"], "--mean", ",".join(map(str, teacher["mean"])),
                    "--std", ",".join(map(str, teacher["std"]))]
    data = manifest.dataset.location
    # K is capped at the class count: topk:20 of 10 classes is topk:10, cached and trained once
    effective = {codec: parse_codec(codec, teacher["num_classes"]).name for codec in CODECS}
    archives = {}
    for codec in dict.fromkeys(effective.values()):
        archives[codec] = str(work / f"{codec.replace(':', '')}.zarr")
        kdpipe("cache-teacher", "--data", data, *teacher_args, *recipe_args, *cache_args(codec, Path(archives[codec])))
    same = read_manifest(archives["dense-fp16"]).files == manifest.files
    measured, stats = compare_codecs(archives)
    students = train_students(archives, data, settings["val"], settings["student"]["name"], settings,
                              list(range(args.seeds)), work / "runs")
    rows = {}
    for codec, stored in effective.items():
        rows[codec] = measured[stored] | students[stored] | ({"same_as": stored} if stored != codec else {})
    return {
        "setting": (f"quickstart: teacher {teacher['name']} (val top-1 {summary['teacher']['val_top1']:.2f}%), "
                    f"{recipe['epochs']} epochs x {manifest.dataset.num_samples} images x "
                    f"{recipe['views_per_sample']} views, 10 classes; student {settings['student']['name']}, "
                    f"{settings['epochs']} epochs, lr {settings['lr']}, batch {settings['batch_size']}, "
                    f"no labels, init seeds {list(range(args.seeds))}"),
        "quickstart_cached_val_top1": summary["cached"]["val_top1"],
        "dense_fp16_identical_to_quickstart_archive": same,
        "teacher": stats,
        "codecs": rows,
        "wall_seconds": time.perf_counter() - started,
    }


def format_table(name: str, result: dict) -> str:
    stats = result["teacher"]
    outside = ", ".join(f"K={k}: {v:.4f}" for k, v in stats["mean_mass_outside_topk"].items())
    lines = [
        f"({name}) {result['setting']}",
        f"teacher: mean entropy {stats['mean_entropy_nats']:.3f} nats (uniform: {stats['uniform_entropy_nats']:.3f}), "
        f"mean top-1 probability {stats['mean_top1_prob']:.3f}; mean mass outside the top K: {outside}",
        "",
        f"{'codec':<12}{'B/view':>9}{'logits B/view':>15}{'raw B/view':>12}{'KL T=1':>10}{'KL T=4':>10}"
        f"{'top-1 agree %':>15}  student val top-1 % (per seed)",
    ]
    for codec, row in result["codecs"].items():
        per_seed = row["val_top1_per_seed"]
        student = f"{row['val_top1']:.2f}" + (f" ({', '.join(f'{a:.2f}' for a in per_seed)})" if len(per_seed) > 1 else "")
        if "same_as" in row:
            lines.append(f"{codec:<12}   = {row['same_as']} (K is capped at the {stats['classes']} classes)")
            continue
        lines.append(f"{codec:<12}{row['bytes_per_view']:>9.1f}{row['logit_bytes_per_view']:>15.1f}"
                     f"{row['raw_logit_bytes_per_view']:>12.1f}{row['kl_T1']:>10.2e}{row['kl_T4']:>10.2e}"
                     f"{100 * row['top1_agreement']:>15.2f}  {student}")
    lines.append(f"wall time {result['wall_seconds']:.0f} s")
    return "\n".join(lines)


def verdict(a: dict) -> dict:
    """The issue's target, judged on the 1,000-class setting."""
    row, dense = a["codecs"][TARGET["codec"]], a["codecs"]["dense-fp16"]
    gap = dense["val_top1"] - row["val_top1"]
    return {"bytes_per_view": row["bytes_per_view"], "bytes_ok": row["bytes_per_view"] <= TARGET["bytes_per_view"],
            "accuracy_gap_points": gap, "accuracy_ok": gap <= TARGET["accuracy_points"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10000, help="(a) synthetic training samples (default 10000)")
    parser.add_argument("--val-samples", type=int, default=2000, help="(a) held-out val images (default 2000)")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="(a) teacher training epochs (default 10)")
    parser.add_argument("--cache-epochs", type=int, default=3,
                        help="(a) epochs cached, and the students' epochs (default 3)")
    parser.add_argument("--scale", default="0.25,1.0",
                        help="(a) crop area range of the teacher's training and of the cache (default 0.25,1.0)")
    parser.add_argument("--seeds", type=int, default=1, help="student seeds per codec (default 1)")
    parser.add_argument("--quickstart", help="(b) reuse this finished `kdpipe quickstart --out` folder")
    parser.add_argument("--skip-a", action="store_true", help="skip the 1,000-class setting")
    parser.add_argument("--skip-b", action="store_true", help="skip the quickstart setting")
    parser.add_argument("--quick", action="store_true", help="(a) only, small: a smoke run, not a measurement")
    parser.add_argument("--workdir", help="where to put data, archives and runs, in DIR/a and DIR/b (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.val_samples, args.teacher_epochs, args.cache_epochs = 2000, 1000, 2, 1
        args.skip_b = args.skip_b or not args.quickstart

    started = time.perf_counter()
    report = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-codecs-") as scratch:
        work = Path(args.workdir or scratch)
        for name in ("a", "b"):
            if (work / name).exists():
                sys.exit(f"{work / name} exists (a previous run's); remove it or choose another --workdir")
        if not args.skip_a:
            report["a"] = setting_a(work / "a", args)
            report["a"]["target"] = verdict(report["a"])
        if not args.skip_b:
            report["b"] = setting_b(work / "b", args)
    report["wall_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for name in ("a", "b"):
        if name in report:
            print(format_table(name, report[name]) + "\n")
    if "b" in report:
        b = report["b"]
        print(f"(b) the dense-fp16 archive is byte-identical to the quickstart's: "
              f"{b['dense_fp16_identical_to_quickstart_archive']}; the quickstart's own cached student: "
              f"{b['quickstart_cached_val_top1']:.2f}%")
    if "a" in report:
        t = report["a"]["target"]
        print(("smoke run (--quick), not a measurement: " if args.quick else "") + f"target ({TARGET['codec']} <= {TARGET['bytes_per_view']} B/view at {CLASSES} classes, student within "
              f"{TARGET['accuracy_points']} points of dense-fp16): {t['bytes_per_view']:.1f} B/view "
              f"({'met' if t['bytes_ok'] else 'NOT met'}); accuracy gap {t['accuracy_gap_points']:+.2f} points "
              f"({'met' if t['accuracy_ok'] else 'NOT met'})")
    print(f"total wall time {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
