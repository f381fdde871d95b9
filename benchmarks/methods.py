"""The results table of docs/methods.md: kdpipe's distillation methods on the quickstart's
digits, each row with the exact commands that produced it.

Every teacher, archive and student is made with the `kdpipe` CLI inside `--workdir`
(relative paths, so the printed commands run as shown from there). The digits are
written as in `kdpipe quickstart`: 1,438 training images, 359 for validation, 50
labelled images, and two halves of the classes (0-4, 5-9) for the label-union row.

    python benchmarks/methods.py --workdir methods-run [--seeds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import ModelSpec
from pipeline.data import open_source
from pipeline.models import build_model
from pipeline.probe import linear_probe, whole_images
from pipeline.quickstart import materialise_digits

RECIPE = ["--size", "16", "--scale", "0.5,1", "--ratio", "0.8,1.25", "--flip-prob", "0"]
TRAIN = ["--val", "digits/val", "--lr", "3e-3", "--batch-size", "64", "--workers", "0"]
EPOCHS = 30


def teacher(out: str, *extra: str, data: str = "digits/train", model: str = "kdpipe:cnn") -> list[str]:
    """A teacher trained on every label of `data` (scored on digits/val when it has all 10 classes)."""
    scored = TRAIN if data == "digits/train" else TRAIN[2:]
    return ["train-student", "--data", data, "--student", model, "--mode", "supervised", "--out", out,
            "--epochs", str(EPOCHS), *RECIPE, *scored, *extra]


def cache(out: str, weights: str, *extra: str, data: str = "digits/train", model: str = "kdpipe:cnn") -> list[str]:
    return ["cache-teacher", "--data", data, "--teacher", model, "--weights", weights, "--out", out,
            "--epochs", str(EPOCHS), "--views-per-sample", "2", *RECIPE, "--workers", "0", *extra]


def student(out: str, *extra: str, data: str = "digits/train", epochs: int = EPOCHS) -> list[str]:
    return ["train-student", "--data", data, "--student", "kdpipe:mlp", "--out", out, "--epochs", str(epochs),
            *TRAIN, *extra]


# What is made once: teachers, then archives (further teachers added by name).
SETUP = [
    teacher("runs/teacher"),
    teacher("runs/teacher-b", "--init-seed", "1"),
    teacher("runs/teacher-mlp", model="kdpipe:mlp"),
    teacher("runs/teacher-0to4", data="digits/train-0to4"),
    teacher("runs/teacher-5to9", data="digits/train-5to9"),
    teacher("runs/teacher-0to5", data="digits/train-0to5"),
    teacher("runs/teacher-4to9", data="digits/train-4to9"),
    cache("archives/plain", "runs/teacher/student.pt"),
    cache("archives/plain", "runs/teacher-b/student.pt", "--teacher-name", "b"),
    cache("archives/plain", "runs/teacher-mlp/student.pt", "--teacher-name", "mlp", model="kdpipe:mlp"),
    cache("archives/pool", "runs/teacher/student.pt", "--num-classes", "10", data="digits/pool"),
    cache("archives/pool-embeddings", "runs/teacher/student.pt", "--num-classes", "10", "--outputs", "embeddings",
          data="digits/pool"),
    cache("archives/mixup", "runs/teacher/student.pt", "--mixup", "mixup"),
    cache("archives/cutmix", "runs/teacher/student.pt", "--mixup", "cutmix"),
    cache("archives/union", "runs/teacher-0to4/student.pt", "--num-classes", "5", "--teacher-classes", "0,1,2,3,4"),
    cache("archives/union", "runs/teacher-5to9/student.pt", "--num-classes", "5", "--teacher-classes", "5,6,7,8,9",
          "--teacher-name", "upper"),
    cache("archives/overlap", "runs/teacher-0to5/student.pt", "--num-classes", "6", "--teacher-classes", "0,1,2,3,4,5"),
    cache("archives/overlap", "runs/teacher-4to9/student.pt", "--num-classes", "6", "--teacher-classes", "4,5,6,7,8,9",
          "--teacher-name", "upper"),
]
ORDER = ["order-teachers", "--data", "digits/train", "--cache", "archives/plain", "--teachers", "main,mlp",
         "--student", "kdpipe:mlp", "--epochs", str(EPOCHS), "--json"]

# (row, what it shows, student options besides --out and --init-seed, and data/epochs when
# not digits/train and 30); PROGRESSIVE is filled in from ORDER's suggestion.
ROWS = [
    ("supervised, all 1,438 labels", "the student alone, every label", ["--mode", "supervised", *RECIPE]),
    ("supervised, 50 labels", "the student alone, the quickstart's few labels (150 epochs)",
     ["--mode", "supervised", *RECIPE], {"data": "digits/labelled", "epochs": 150}),
    ("KD (Hinton)", "cached KD, T = 1, no labels", ["--cache", "archives/plain"]),
    ("KD, T = 4", "cached KD at a higher temperature", ["--cache", "archives/plain", "--temperature", "4"]),
    ("KD, unlabelled transfer set", "the pool has no class folders", ["--cache", "archives/pool"], {"data": "digits/pool"}),
    ("DKD", "decoupled KD, T = 4, alpha 1, beta 8 (uses each view's label)",
     ["--cache", "archives/plain", "--loss", "dkd", "--temperature", "4", "--loss-option", "beta=8"]),
    ("DIST", "Pearson correlation, inter + intra class", ["--cache", "archives/plain", "--loss", "dist"]),
    ("LS", "logit standardisation, then KD at T = 2", ["--cache", "archives/plain", "--loss", "ls", "--temperature", "2"]),
    ("MSE on logits", "", ["--cache", "archives/plain", "--loss", "mse"]),
    ("KD + mixup", "function matching: consistent mixup, lam ~ U(0, 1)", ["--cache", "archives/mixup"]),
    ("KD + CutMix", "function matching: consistent CutMix", ["--cache", "archives/cutmix"]),
    ("ensemble of 2 CNN teachers", "mean of probabilities", ["--cache", "archives/plain", "--teachers", "main,b"]),
    ("progressive: CNN and MLP teachers", "MTPD, order from order-teachers", "PROGRESSIVE"),
    ("label union: teachers of 0-4 and 5-9", "disjoint classes: nothing ties the two groups together",
     ["--cache", "archives/union", "--teachers", "main,upper"]),
    ("label union: teachers of 0-5 and 4-9", "two shared classes tie the groups together",
     ["--cache", "archives/overlap", "--teachers", "main,upper"]),
    ("student at 12 px, teacher at 16 px", "the same views at two resolutions",
     ["--cache", "archives/plain", "--student-size", "12"]),
    ("SEED, unlabelled pool; linear probe", "the teacher's penultimate features; probe fitted on the 1,438 labels",
     ["--cache", "archives/pool-embeddings", "--loss", "seed", "--loss-option", "queue=1024",
      "--probe-data", "digits/train"], {"data": "digits/pool"}),
]


def kdpipe(workdir: Path, args: list[str]) -> str:
    """Run one kdpipe command in `workdir`; its stdout."""
    executable = shutil.which("kdpipe")
    if executable is None:
        raise SystemExit("kdpipe is not on PATH: pip install -e . first")
    print("kdpipe " + " ".join(args), file=sys.stderr)
    result = subprocess.run([executable, *args], cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"kdpipe {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def write_digits(workdir: Path) -> None:
    """The quickstart's digit folders, plus training folders of some of the classes."""
    digits = workdir / "digits"
    if not digits.exists():
        materialise_digits(digits)
    for name, classes in (("train-0to4", "01234"), ("train-5to9", "56789"), ("train-0to5", "012345"),
                          ("train-4to9", "456789")):
        if not (digits / name).exists():
            for c in classes:
                shutil.copytree(digits / "train" / c, digits / name / c)


def probe_baseline(workdir: Path) -> float:
    """The SEED row's reference: the same linear probe on the untrained student (seed 0),
    whose outputs are a random projection of the pooled pixels."""
    train, val = (whole_images(open_source(str(workdir / "digits" / name)), 16) for name in ("train", "val"))
    student = build_model(ModelSpec("kdpipe:mlp", num_classes=128))
    return linear_probe(student, train, val, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="methods-run")
    parser.add_argument("--seeds", type=int, default=1, help="student seeds per row (init-seed 0..N-1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    started = time.perf_counter()
    write_digits(workdir)
    for step in SETUP:  # a finished step is skipped by kdpipe itself (cache-teacher) or here (train-student)
        if step[0] == "cache-teacher" or not (workdir / step[step.index("--out") + 1] / "summary.json").exists():
            kdpipe(workdir, step)
    order = json.loads(kdpipe(workdir, ORDER))
    progressive = ["--cache", "archives/plain", "--teachers", ",".join(order["order"]), "--schedule", order["schedule"]]
    teachers = {name: json.loads((workdir / "runs" / name / "summary.json").read_text())["val_top1"]
                for name in ("teacher", "teacher-b", "teacher-mlp")}
    results = []
    for number, (row, note, extra, *where) in enumerate(ROWS, 1):
        extra = progressive if extra == "PROGRESSIVE" else extra
        where = where[0] if where else {}
        scores = []
        for seed in range(args.seeds):
            out = f"runs/row{number:02d}-seed{seed}"
            if not (workdir / out / "summary.json").exists():
                kdpipe(workdir, student(out, *extra, "--init-seed", str(seed), **where))
            scores.append(json.loads((workdir / out / "summary.json").read_text())["val_top1"])
        results.append({"row": row, "note": note, "val_top1": statistics.fmean(scores), "per_seed": scores,
                        "command": "kdpipe " + " ".join(student(f"runs/row{number:02d}-seed0", *extra, **where))})
    report = {"teachers": teachers, "order": order, "rows": results, "probe_baseline": probe_baseline(workdir),
              "seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"linear probe of the untrained student: {report['probe_baseline']:.2f}")
    print("teachers (val top-1 %): " + ", ".join(f"{k} {v:.2f}" for k, v in teachers.items()))
    print(f"order-teachers: {order['order']} costs {order['costs']}")
    for r in results:
        seeds = " (" + ", ".join(f"{s:.2f}" for s in r["per_seed"]) + ")" if len(r["per_seed"]) > 1 else ""
        print(f"| {r['row']} | {r['val_top1']:.2f}{seeds} | `{r['command']}` |")
    print(f"{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
