"""Where an archive's bytes go, array by array, in schema 1 and schema 2, and how close
dense-int8 stays to the teacher.

A realistic 1,000-class teacher is simulated rather than trained, so the figures take
seconds and do not depend on a training run: each view's logits are standard normal
noise, plus a spike of N(10, 1.5) at the sample's label and uniform(0, 10) boosts at
eight "confusable" classes fixed per label (mean entropy about 1.25 nats, mean top-1
probability about 0.65, as the issue's teacher; the script prints both). The views
are the real ones: `epoch_order` and `sample_view` of a recipe with crops of 25-100% of
the area on 16 x 16 images (the setting of codec_costs.py (a), where the issue measured
33.9 bytes per view). The same logits and views are written through kdpipe's own
`ArchiveWriter` as schema 1 (what kdpipe wrote before) and as schema 2, and each
object's size is read from the manifest.

    python benchmarks/archive_bytes.py                      # topk:10, 10,000 samples x 3 epochs: ~1 min
    python benchmarks/archive_bytes.py --codec topk:20 --image-size 224
    python benchmarks/archive_bytes.py --quick              # 2,000 samples: seconds, a smoke run
    python benchmarks/archive_bytes.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelSpec, ViewRecipe
from pipeline.store import (ArchiveReader, ArchiveWriter, DatasetInfo, Location, Manifest, TeacherInfo,
                            content_fingerprint, parse_codec)
from pipeline.views import epoch_order, sample_view, view_param_fields

sys.path.insert(0, str(Path(__file__).parent))
from codec_costs import fidelity, teacher_stats  # noqa: E402 - the shared measures, one definition

CLASSES, CONFUSABLE = 1000, 8
TARGET_BYTES_PER_VIEW = 28.0  # issue 17, item 5: topk:10 of the realistic teacher
FIDELITY_CODECS = ("dense-fp16", "dense-int8")  # measured against dense-fp32 besides --codec


def simulate(args: argparse.Namespace) -> dict:
    """The realistic teacher's logits (E*N, 1, C) in training order, its views' parameters and the labels."""
    rng = np.random.default_rng(args.seed)
    labels = np.arange(args.samples, dtype=np.int64) % CLASSES
    confusable = rng.integers(0, CLASSES, size=(CLASSES, CONFUSABLE))
    recipe = ViewRecipe(size=args.image_size, scale=(0.25, 1.0), epochs=args.epochs, seed=args.seed)
    fields = view_param_fields(recipe)
    logits, params = [], []
    for epoch in range(args.epochs):
        order = epoch_order(recipe, epoch, args.samples)
        target = labels[order]
        rows = np.arange(len(order))
        z = rng.standard_normal((len(order), CLASSES))
        z[rows, target] += rng.normal(10, 1.5, len(order))
        np.add.at(z, (rows[:, None], confusable[target]), rng.uniform(0, 10, (len(order), CONFUSABLE)))
        logits.append(z.astype(np.float32))
        size = (args.image_size, args.image_size)
        params.append(np.stack([sample_view(recipe, epoch, int(i), 0, size).as_array(fields) for i in order]))
    return {"recipe": recipe, "labels": labels, "logits": np.concatenate(logits)[:, None],
            "params": np.concatenate(params)[:, None]}


def write_archive(out: Path, world: dict, codec: str, schema_version: int) -> Manifest:
    """The simulated views cached as kdpipe would, through ArchiveWriter, in `schema_version`."""
    recipe, labels = world["recipe"], world["labels"]
    names = tuple(f"class_{c:04d}" for c in range(CLASSES))
    teacher = TeacherInfo(spec=ModelSpec("simulated", num_classes=CLASSES).to_dict(),
                          fingerprint="sha256:" + "0" * 64, num_classes=CLASSES, classes=names)
    digests = np.random.default_rng(1).integers(0, 256, size=(len(labels), 32), dtype=np.uint8)  # as random as sha256
    dataset = DatasetInfo(fingerprint="sha256:" + "1" * 64, num_samples=len(labels), classes=names, labelled=True,
                          location="simulated", content=content_fingerprint(digests))
    plan = Manifest.plan("zarr", recipe, teacher, dataset, parse_codec(codec, CLASSES), schema_version=schema_version)
    writer = ArchiveWriter(Location(out), plan, labels, content_digests=digests)
    samples = len(labels)
    for epoch, shard, start, stop in writer.pending_units():
        rows = slice(epoch * samples + start, epoch * samples + stop)
        writer.write_unit(epoch, shard, world["logits"][rows], world["params"][rows])
    return writer.finish()


def bytes_per_array(manifest: Manifest) -> dict[str, float]:
    """Bytes per view of each array (its chunks and shards), of the content digests, and
    of the metadata (every zarr.json), from the manifest's per-object sizes."""
    views = manifest.layout.views
    out: dict[str, float] = {}
    for key, entry in manifest.files.items():
        name = "metadata" if key.endswith("zarr.json") else key.split("/")[0]
        name = "content digests" if name == "dataset" else name
        out[name] = out.get(name, 0.0) + entry.bytes / views
    return out


def decoded(archive: Path) -> np.ndarray:
    reader = ArchiveReader(archive)
    return np.concatenate([reader.read(epoch, 0, reader.num_samples)[0].reshape(-1, reader.num_classes)
                           for epoch in range(reader.epochs)])


def measure(work: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    world = simulate(args)
    reference = world["logits"][:, 0]
    sizes = {}
    for version in (1, 2):
        manifest = write_archive(work / f"schema{version}.zarr", world, args.codec, version)
        sizes[version] = bytes_per_array(manifest)
    kl = {args.codec: fidelity(reference, decoded(work / "schema2.zarr"))}
    for codec in FIDELITY_CODECS:
        manifest = write_archive(work / f"{codec}.zarr", world, codec, 2)
        kl[codec] = fidelity(reference, decoded(work / f"{codec}.zarr")) | {
            "bytes_per_view": manifest.total_bytes / manifest.layout.views}
    k = int(args.codec.split(":")[1]) if args.codec.startswith("topk:") else 10
    return {"setting": (f"simulated {CLASSES}-class teacher, {args.epochs} epochs x {args.samples} samples x 1 view, "
                        f"{args.image_size} px images, crops of 25-100% of the area, --codec {args.codec}, zarr"),
            "teacher": teacher_stats(reference, [k]), "bytes_per_view": sizes, "fidelity": kl,
            "wall_seconds": time.perf_counter() - started}


def format_report(report: dict, codec: str) -> str:
    stats, sizes = report["teacher"], report["bytes_per_view"]
    lines = [report["setting"],
             f"teacher: mean entropy {stats['mean_entropy_nats']:.3f} nats, mean top-1 probability "
             f"{stats['mean_top1_prob']:.3f}", "",
             f"{'array':<18}{'schema 1 B/view':>17}{'schema 2 B/view':>17}"]
    names = sorted(set(sizes[1]) | set(sizes[2]), key=lambda n: (n in ("metadata", "content digests"), n))
    for name in names:
        lines.append(f"{name:<18}{sizes[1].get(name, 0.0):>17.2f}{sizes[2].get(name, 0.0):>17.2f}")
    per_view = {v: sum(b for n, b in sizes[v].items() if n != "content digests") for v in (1, 2)}
    total = {v: sum(sizes[v].values()) for v in (1, 2)}
    lines += [f"{'all but digests':<18}{per_view[1]:>17.2f}{per_view[2]:>17.2f}",
              f"{'whole archive':<18}{total[1]:>17.2f}{total[2]:>17.2f}", "",
              f"target ({codec} <= {TARGET_BYTES_PER_VIEW:g} B/view, all but the per-sample content digests): "
              f"{per_view[2]:.1f} ({'met' if per_view[2] <= TARGET_BYTES_PER_VIEW else 'NOT met'})", "",
              f"{'codec (schema 2)':<18}{'B/view':>9}{'KL T=1':>11}{'KL T=4':>11}{'top-1 agree %':>15}"]
    for name, row in report["fidelity"].items():
        size = row.get("bytes_per_view", total[2])
        lines.append(f"{name:<18}{size:>9.1f}{row['kl_T1']:>11.2e}{row['kl_T4']:>11.2e}"
                     f"{100 * row['top1_agreement']:>15.2f}")
    lines.append(f"wall time {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="topk:10", help="the codec whose bytes are split by array (default topk:10)")
    parser.add_argument("--samples", type=int, default=10000, help="samples per epoch (default 10000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs, one view each (default 3)")
    parser.add_argument("--image-size", type=int, default=16, help="side of the source images in pixels (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated teacher and the views (default 0)")
    parser.add_argument("--quick", action="store_true", help="2,000 samples: a smoke run, not a measurement")
    parser.add_argument("--workdir", help="keep the archives in DIR (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args()
    if args.quick:
        args.samples = 2000
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bytes-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        report = measure(work, args)
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.codec))


if __name__ == "__main__":
    main()
