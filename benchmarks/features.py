"""The feature-distillation table of docs/methods.md: logit KD against FitNets hints,
attention transfer, similarity-preserving KD and relational KD, and KD with a feature
term, all online, each row with the exact command that produced it.

The setting is the quickstart's few labels: a `kdpipe:cnn` teacher trained on all 1,438
training digits teaches a `kdpipe:cnn` student (another initialisation) that sees only the
50 labelled digits (10 epochs of 4 views each), with the teacher running live on the same
views; every row is scored on the 359 validation digits. The feature rows add their term to cross-entropy on the
labels (`--alpha 1`), with the weights their papers (or CRD's benchmark, for hints) used.

    python benchmarks/features.py --workdir features-run [--seeds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from methods import RECIPE, kdpipe

from pipeline.quickstart import materialise_digits

EPOCHS = 10  # of 4 views per image: 2,000 views of the 50 images
TEACHER = ["train-student", "--data", "digits/train", "--student", "kdpipe:cnn", "--mode", "supervised",
           "--out", "runs/teacher", "--epochs", "10", *RECIPE, "--val", "digits/val", "--lr", "3e-3",
           "--batch-size", "64", "--workers", "0"]
ONLINE = ["--mode", "online", "--teacher", "kdpipe:cnn", "--weights", "runs/teacher/student.pt"]
KD = ["--alpha", "0.5", "--temperature", "4"]  # Hinton's CE + KD, halved

# (row, what it shows, the student's options besides --out and --init-seed)
ROWS = [
    ("CE on the 50 labels", "no teacher", ["--mode", "supervised"]),
    ("KD (Hinton)", "CE + KD at T = 4", [*ONLINE, *KD]),
    ("CE + hint (FitNets)", "block 2's maps (64 x 8 x 8), 1 x 1 connector, weight 100",
     [*ONLINE, "--alpha", "1", "--feature", "hint:9@100"]),
    ("CE + attention transfer", "block 2's attention maps, weight 1000",
     [*ONLINE, "--alpha", "1", "--feature", "at:9@1000"]),
    ("CE + similarity-preserving", "last conv maps (128 x 4 x 4), weight 3000",
     [*ONLINE, "--alpha", "1", "--feature", "sp:16@3000"]),
    ("CE + relational (RKD)", "penultimate features, distance 25 + angle 50",
     [*ONLINE, "--alpha", "1", "--feature", "rkd:18"]),
    ("KD + attention transfer", "CE + KD at T = 4, + AT as above", [*ONLINE, *KD, "--feature", "at:9@1000"]),
]


def student(out: str, *extra: str) -> list[str]:
    return ["train-student", "--data", "digits/labelled", "--student", "kdpipe:cnn", "--out", out,
            "--epochs", str(EPOCHS), "--views-per-sample", "4", *RECIPE, "--val", "digits/val", "--lr", "3e-3",
            "--batch-size", "16", "--workers", "0", *extra]


def prepare(workdir: Path) -> float:
    """The digits and the trained teacher in `workdir` (made once); the teacher's val top-1."""
    if not (workdir / "digits").exists():
        materialise_digits(workdir / "digits")
    if not (workdir / "runs" / "teacher" / "summary.json").exists():
        kdpipe(workdir, TEACHER)
    return json.loads((workdir / "runs" / "teacher" / "summary.json").read_text())["val_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="features-run")
    parser.add_argument("--seeds", type=int, default=1,
                        help="student seeds per row (init-seed 1..N; 0 is the teacher's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started, workdir = time.perf_counter(), Path(args.workdir)
    teacher = prepare(workdir)
    results = []
    for number, (row, note, extra) in enumerate(ROWS, 1):
        scores = []
        for seed in range(1, args.seeds + 1):
            out = f"runs/row{number}-seed{seed}"
            if not (workdir / out / "summary.json").exists():
                kdpipe(workdir, student(out, *extra, "--init-seed", str(seed)))
            scores.append(json.loads((workdir / out / "summary.json").read_text())["val_top1"])
        results.append({"row": row, "note": note, "val_top1": statistics.fmean(scores), "per_seed": scores,
                        "std": statistics.stdev(scores) if len(scores) > 1 else None,
                        "command": "kdpipe " + " ".join(student(f"runs/row{number}-seed1", *extra))})
    report = {"teacher": teacher, "rows": results, "seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"teacher (val top-1 %): {teacher:.2f}")
    for r in results:
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        seeds = " (" + ", ".join(f"{s:.2f}" for s in r["per_seed"]) + ")" if len(r["per_seed"]) > 1 else ""
        print(f"| {r['row']} | {r['note']} | {r['val_top1']:.2f}{spread}{seeds} |")
    print(f"{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
