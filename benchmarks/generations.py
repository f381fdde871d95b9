"""The table of docs/methods.md's "Born-again generations and teacher assistants": chains
of students on the quickstart's digits, each link the same two kdpipe commands,

    kdpipe cache-teacher --teacher RUN_DIR ...     (the previous generation teaches)
    kdpipe train-student --cache ... --out NEXT    (the next generation learns, no labels)

in the quickstart's setting: reduced labelling, students distilled on the unlabelled pool
of 1,438 training images, 10 epochs of 2 views at 16 px, scored on the 359 val images.
Every run is made with the `kdpipe` CLI inside `--workdir` (relative paths, so the
printed commands run as shown from there); finished runs and archives are kept and reused.

    python benchmarks/generations.py --workdir generations-run [--seeds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from methods import RECIPE, TRAIN, kdpipe

from pipeline.quickstart import materialise_digits

GENERATIONS = 3
# the settings the table of docs/methods.md was measured with (the quickstart's before it
# was shortened to 6 epochs): the CNN teacher's epochs, each student's, the supervised
# baseline's, and the views per image of each archive
TEACHER_EPOCHS, STUDENT_EPOCHS, SUPERVISED_EPOCHS, KD_VIEWS = 10, 10, 150, 2
VIEWS = RECIPE[2:]  # the quickstart's crops without --size: each archive takes its teacher's (16 px)


def supervised(out: str, data: str, model: str, epochs: int, seed: int) -> list[str]:
    """A run trained on the labels of `data` alone."""
    return ["train-student", "--data", data, "--student", model, "--mode", "supervised", "--out", out,
            "--epochs", str(epochs), *RECIPE, *TRAIN, "--init-seed", str(seed)]


def archive_of(teacher: str) -> str:
    return f"archives/{Path(teacher).name}"


def cache(teacher: str) -> list[str]:
    """The first command of a link: the run `teacher` teaches on every view of the pool."""
    return ["cache-teacher", "--data", "digits/pool", "--teacher", teacher, "--out", archive_of(teacher),
            "--epochs", str(STUDENT_EPOCHS), "--views-per-sample", str(KD_VIEWS), *VIEWS, "--workers", "0"]


def taught(out: str, teacher: str, model: str, seed: int) -> list[str]:
    """The second command of a link: the next student learns from the archive, no labels."""
    return ["train-student", "--data", "digits/pool", "--student", model, "--cache", archive_of(teacher),
            "--out", out, *TRAIN, "--init-seed", str(seed)]


def val_top1(workdir: Path, run: str) -> float:
    return json.loads((workdir / run / "summary.json").read_text())["val_top1"]


def train(workdir: Path, command: list[str]) -> float:
    """Run train-student `command` unless its run is finished; the run's val top-1."""
    out = command[command.index("--out") + 1]
    if not (workdir / out / "summary.json").exists():
        kdpipe(workdir, command)
    return val_top1(workdir, out)


def distil(workdir: Path, teacher: str, out: str, model: str, seed: int) -> float:
    """One link: cache `teacher` (once; cache-teacher leaves a finished archive alone),
    train `out` from it; the new run's val top-1."""
    kdpipe(workdir, cache(teacher))
    return train(workdir, taught(out, teacher, model, seed))


def chain(workdir: Path, generation_0: str, name: str, seed: int) -> list[float]:
    """Born-again generations of kdpipe:mlp: generation k + 1 is taught by generation k."""
    teacher, scores = generation_0, []
    for generation in range(1, GENERATIONS + 1):
        out = f"runs/{name}-seed{seed}-gen{generation}"
        scores.append(distil(workdir, teacher, out, "kdpipe:mlp", seed))
        teacher = out
    return scores


def measure(workdir: Path, seeds: int) -> dict[str, list[float]]:
    """Every row's val top-1 per seed (student init seeds 0..seeds-1, the same along a chain)."""
    rows: dict[str, list[float]] = {}

    def add(row: str, score: float) -> None:
        rows.setdefault(row, []).append(score)

    teacher = "runs/teacher"
    add("cnn teacher, all labels (generation 0)",
        train(workdir, supervised(teacher, "digits/train", "kdpipe:cnn", TEACHER_EPOCHS, 0)))
    for seed in range(seeds):
        for generation, score in enumerate(chain(workdir, teacher, "cnn", seed), 1):
            add(f"born-again from the cnn: mlp generation {generation}", score)
        labelled = f"runs/labelled-seed{seed}"
        add("mlp, 50 labels (generation 0)",
            train(workdir, supervised(labelled, "digits/labelled", "kdpipe:mlp", SUPERVISED_EPOCHS, seed)))
        for generation, score in enumerate(chain(workdir, labelled, "labelled", seed), 1):
            add(f"born-again from 50 labels: mlp generation {generation}", score)
        add("mlp-small, all labels (no teacher)",
            train(workdir, supervised(f"runs/small-labels-seed{seed}", "digits/train", "kdpipe:mlp-small",
                                      STUDENT_EPOCHS, seed)))
        add("cnn -> mlp-small", distil(workdir, teacher, f"runs/small-direct-seed{seed}", "kdpipe:mlp-small", seed))
        add("cnn -> mlp -> mlp-small (assistant)",
            distil(workdir, f"runs/cnn-seed{seed}-gen1", f"runs/small-assisted-seed{seed}", "kdpipe:mlp-small", seed))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="generations-run")
    parser.add_argument("--seeds", type=int, default=3, help="student init seeds per chain (0..N-1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    started = time.perf_counter()
    if not (workdir / "digits").exists():
        materialise_digits(workdir / "digits")
    rows = measure(workdir, args.seeds)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
        return
    print("| run | val top-1 % | per seed |\n|---|---:|---|")
    for row, scores in rows.items():
        spread = f" ± {statistics.stdev(scores):.2f}" if len(scores) > 1 else ""
        print(f"| {row} | {statistics.fmean(scores):.2f}{spread} | {', '.join(f'{s:.2f}' for s in scores)} |")
    print("\nthe loop, generation 1 -> 2 of seed 0:\n")
    previous, following = "runs/cnn-seed0-gen1", "runs/cnn-seed0-gen2"
    for command in (cache(previous), taught(following, previous, "kdpipe:mlp", 0)):
        print("kdpipe " + " ".join(command))
    print(f"\n{seconds:.0f} s")


if __name__ == "__main__":
    main()
