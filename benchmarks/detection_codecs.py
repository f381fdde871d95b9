"""The detector-neck table of docs/compression.md: what each feature codec of a detector
teacher's cached FPN neck costs in bytes and how close its decoded maps stay to float32,
measured on the built-in digit scenes, and what the same codecs would store per view for
a RetinaNet / FCOS R50-FPN neck at COCO's resolution (arithmetic, not measured).

Measured: the digit scenes (--train-images train images, --val-images val images) are
written; a `kdpipe:det-small` teacher is trained on them (--epochs, supervised, 96 px
views), or taken from --teacher-weights; its neck (`neck.0`, `neck.1`, `neck.2`: maps of 12 x
12, 6 x 6 and 3 x 3 at 96 px, as many channels as det-small's pyramid) is cached once per codec over the same views
(one epoch, one view per image, view seed 0), `cache-teacher --outputs neck=CODEC`. A
codec written LEVEL0/LEVEL1/LEVEL2 gives each level its own (`neck.0=...,neck.1=...`),
so pooling can halve every level's side. Per codec: the archive's bytes per view (all of
it: view parameters, indices, manifest) and the neck's own objects alone (each level's
arrays, their metadata and its PCA projection), the neck's bytes against the fp16
archive's, the relative L2 error and mean per-view cosine of the decoded maps against
the float32 archive's (a pooled level against the float32 maps pooled the same way, so
these columns measure what PCA and the number type lose on top of the pooling), per
level and over all levels; what pooling alone loses per level (the pooled fp32 maps, each
bin's mean spread back, against the full maps; `-` for bins of unequal size); and
cache-teacher's wall time.

Arithmetic: the raw bytes per view (before compression) that each codec's stored fields
would take for a 256-channel, 5-level (P3-P7) neck at an 800 x 1333 input, from
`FeatureCodec.fields`; the PCA projections, stored once per archive, are left out.

    python benchmarks/detection_codecs.py --workdir detection-codecs-run [--epochs 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from feature_codecs import fidelity, pooling_loss

from pipeline.cache import cache_teacher
from pipeline.coco import write_digit_scenes
from pipeline.config import CacheSpec, ModelSpec, TrainSpec
from pipeline.detection import detection_recipe, train_detector
from pipeline.store import ArchiveReader
from pipeline.store.feature_codecs import FeatureCodec, adaptive_average_pool

SIZE = 96  # the views' side: det-small's neck levels are then 12 x 12, 6 x 6 and 3 x 3
TEACHER = "kdpipe:det-small"
REFERENCE = "fp32"  # lossless: what the other codecs are compared with
CODECS = ["fp32", "fp16", "int8", "pca:16+int8", "pca:8+int8", "pool:6+fp16/pool:3+fp16/pool:2+fp16",
          "pool:6+int8/pool:3+int8/pool:2+int8", "pool:6+pca:16+int8/pool:3+pca:16+int8/pool:2+pca:16+int8",
          "pool:3+fp16", "pool:3+pca:8+int8", "pool:1+fp16"]
# torchvision's RetinaNet / FCOS R50-FPN neck at an 800 x 1333 input: P3-P7, 256 channels
COCO_LEVELS = {"P3": (256, 100, 167), "P4": (256, 50, 84), "P5": (256, 25, 42), "P6": (256, 13, 21), "P7": (256, 7, 11)}
HALF = "pool:50x84/pool:25x42/pool:13x21/pool:7x11/pool:4x6"  # every level's side halved (rounded up)
COCO_CODECS = ["fp32", "fp16", "int8", "pca:16+int8", "pca:8+int8", f"{HALF}+fp16", f"{HALF}+int8",
               f"{HALF}+pca:16+int8", "pool:7+fp16", "pool:7+pca:16+int8", "pool:1+fp16"]


def level_codecs(codec: str, levels: int) -> list[str]:
    """One codec per level: `A/B/C` gives each level its own, a plain codec every level the same."""
    parts = codec.split("/")
    if len(parts) == 1:
        return parts * levels
    if len(parts) != levels:
        raise SystemExit(f"codec {codec!r} names {len(parts)} levels; the neck has {levels}")
    return parts


def coco_codecs(codec: str) -> list[str]:
    """The COCO codec per level: the HALF pools carry the chain's tail (`HALF+fp16`)."""
    if codec.startswith(HALF):
        tail = codec.removeprefix(HALF)
        return [pool + tail for pool in HALF.split("/")]
    return level_codecs(codec, len(COCO_LEVELS))


def outputs(codec: str) -> tuple[str, ...]:
    """cache-teacher's --outputs for `codec`: `neck=CODEC`, or one per level."""
    if "/" not in codec:
        return (f"neck={codec}",)
    return tuple(f"neck.{level}={part}" for level, part in enumerate(level_codecs(codec, 3)))


def archive(codec: str) -> str:
    return "archives/" + codec.replace(":", "").replace("+", "-").replace("/", "_")


def prepare(workdir: Path, args: argparse.Namespace) -> tuple[Path, dict | None]:
    """The digit scenes, and the teacher's weights (trained here unless given) with its summary."""
    scenes = workdir / "scenes"
    if not (scenes / "val.json").exists():
        write_digit_scenes(scenes, args.train_images, args.val_images)
    if args.teacher_weights:
        return Path(args.teacher_weights).resolve(), None
    run = workdir / "runs" / "teacher"
    if not (run / "summary.json").exists():
        train_detector(TrainSpec(data=f"coco:{scenes / 'train.json'}", student=ModelSpec(TEACHER), out=str(run),
                                 mode="supervised", val=f"coco:{scenes / 'val.json'}", epochs=args.epochs, lr=args.lr,
                                 batch_size=16, workers=0), {"size": SIZE})
    return run / "student.pt", json.loads((run / "summary.json").read_text())


def cache(workdir: Path, weights: Path, codec: str) -> dict:
    """Cache the teacher's neck with `codec` over one epoch of views; cache_teacher's summary,
    kept beside the archive so that a re-run (which finds it finished) reports its time."""
    recipe = detection_recipe({"size": SIZE}, 1)
    kept = workdir / (archive(codec) + ".summary.json")
    summary = cache_teacher(CacheSpec(data=f"coco:{workdir / 'scenes' / 'train.json'}",
                                   teacher=ModelSpec(TEACHER, weights=str(weights)), out=str(workdir / archive(codec)),
                                   recipe=recipe, workers=0, features=outputs(codec)))
    if summary["computed_views"]:
        kept.write_text(json.dumps(summary))
    return json.loads(kept.read_text()) if kept.exists() else summary


def neck_bytes(reader: ArchiveReader) -> dict:
    """Bytes per view: the whole archive, and the neck's own objects (every level's arrays,
    metadata included, and projections) as stored and raw."""
    views = reader.epochs * reader.num_samples * reader.views
    files = reader.manifest.files
    stored = raw = 0
    for feature in reader.features.values():
        names = feature.fields(1)
        stored += sum(entry.bytes for key, entry in files.items() if key.split("/")[0] in names)
        projection = files[feature.projection_key].bytes if feature.projection_key else 0
        stored += projection
        raw += sum(math.prod(shape[1:]) * dtype.itemsize for shape, dtype in names.values()) * views + projection
    return {"archive": reader.manifest.total_bytes / views, "neck": stored / views, "neck_raw": raw / views}


def decoded_maps(reader: ArchiveReader) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every level's decoded maps (views, *decoded shape), in archive order, and the view
    parameters and sample indices they were computed on (to check two archives agree)."""
    reader.read_only_features(tuple(reader.features))
    fields = reader.read_fields(0, 0, reader.num_samples)
    maps = {module: reader.decode_feature(module, fields).reshape(-1, *feature.decoded_shape)
            for module, feature in reader.features.items()}
    views = reader.num_samples * reader.views
    keys = np.concatenate([fields["view_params"].reshape(views, -1),
                           np.repeat(fields["sample_index"], reader.views)[:, None]], axis=1)
    return maps, keys


def measure(reader: ArchiveReader, maps: dict[str, np.ndarray], reference_maps: dict[str, np.ndarray]) -> dict:
    """Fidelity per level and over all levels (the levels' maps side by side), each level
    against the fp32 maps pooled as that level's codec pools."""
    references = {}
    for module, feature in reader.features.items():
        pool = feature.pool
        references[module] = reference_maps[module] if pool is None else adaptive_average_pool(reference_maps[module],
                                                                                                 pool)
    levels = {module: fidelity(maps[module], references[module]) for module in maps}
    pooling = {module: None if feature.pool is None else pooling_loss(reference_maps[module], feature.pool)
               for module, feature in reader.features.items()}
    flat = lambda arrays: np.concatenate([a.reshape(len(a), -1) for a in arrays.values()], axis=1)  # noqa: E731
    return {"levels": levels, "overall": fidelity(flat(maps), flat(references)), "pooling_relative_l2": pooling}


def coco_arithmetic(codecs: list[str]) -> list[dict]:
    """Raw bytes per view of each codec's stored fields for the COCO-scale neck (no compression)."""
    rows = []
    for codec in codecs:
        per_level = {}
        for (level, shape), part in zip(COCO_LEVELS.items(), coco_codecs(codec)):
            feature = FeatureCodec.from_name(level, part, shape)
            per_level[level] = {"codec": feature.name, "stored_shape": list(feature.stored_shape),
                                "bytes": sum(math.prod(s[1:]) * d.itemsize for s, d in feature.fields(1).values())}
        total = sum(level["bytes"] for level in per_level.values())
        rows.append({"codec": codec, "levels": per_level, "bytes_per_view": total})
    fp16 = next((row["bytes_per_view"] for row in rows if row["codec"] == "fp16"), None)
    for row in rows:
        row["vs_fp16"] = row["bytes_per_view"] / fp16 if fp16 else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="detection-codecs-run")
    parser.add_argument("--epochs", type=int, default=4, help="teacher training epochs")
    parser.add_argument("--lr", type=float, default=3e-3, help="teacher learning rate")
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--teacher-weights", help="a trained kdpipe:det-small (student.pt): skip training one")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated; fp32 is always measured; "
                        "LEVEL0/LEVEL1/LEVEL2 gives each neck level its own codec")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started, workdir = time.perf_counter(), Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    codecs = [REFERENCE] + [codec for codec in args.codecs.split(",") if codec != REFERENCE]
    weights, teacher = prepare(workdir, args)
    reference_maps = reference_keys = None
    results = []
    for codec in codecs:
        summary = cache(workdir, weights, codec)  # a finished archive is left alone (0 s)
        reader = ArchiveReader(str(workdir / archive(codec)))
        maps, keys = decoded_maps(reader)
        if codec == REFERENCE:
            reference_maps, reference_keys = maps, keys
        if not np.array_equal(keys, reference_keys):
            raise SystemExit(f"{archive(codec)} holds other views than {archive(REFERENCE)}")
        results.append({"codec": codec, "outputs": list(outputs(codec)),
                        "stored_shapes": {m: list(f.stored_shape) for m, f in reader.features.items()},
                        "views": len(keys), "bytes_per_view": neck_bytes(reader),
                        **measure(reader, maps, reference_maps), "cache_seconds": summary["seconds"]})
    fp16 = next((r["bytes_per_view"]["neck"] for r in results if r["codec"] == "fp16"), None)
    for row in results:
        row["neck_vs_fp16"] = row["bytes_per_view"]["neck"] / fp16 if fp16 else None
    coco = coco_arithmetic(COCO_CODECS)
    report = {"teacher": teacher, "size": SIZE, "rows": results, "coco": coco, "seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    if teacher is not None:
        print(f"teacher {TEACHER}, {args.epochs} epochs: val mAP {teacher.get('val_map', float('nan')):.3f}, "
              f"AP50 {teacher.get('val_map50', float('nan')):.3f}; {results[0]['views']} views of {SIZE} px")
    modules = list(results[0]["levels"])
    print("| codec | stored per view | archive B/view | neck B/view | neck raw | neck / fp16 | "
          + " | ".join(f"{m} rel. L2 / cosine" for m in modules)
          + " | all levels rel. L2 | cosine | pooling alone: rel. L2 per level | cache s |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(modules) + "---:|---:|---:|---:|")
    for r in results:
        size = r["bytes_per_view"]
        shapes = ", ".join(" x ".join(map(str, s)) for s in r["stored_shapes"].values())
        ratio = "" if r["neck_vs_fp16"] is None else f"{r['neck_vs_fp16']:.3f}"
        levels = " | ".join(f"{v['relative_l2']:.2g} / {v['cosine_mean']:.4f}" for v in r["levels"].values())
        pooled = r["pooling_relative_l2"].values()
        pooled = "" if all(p is None for p in pooled) else " / ".join("-" if p is None else f"{p:.2f}" for p in pooled)
        print(f"| `{r['codec']}` | {shapes} | {size['archive']:,.1f} | {size['neck']:,.1f} | {size['neck_raw']:,.1f} "
              f"| {ratio} | {levels} | {r['overall']['relative_l2']:.2g} | {r['overall']['cosine_mean']:.4f} "
              f"| {pooled} | {r['cache_seconds']:.1f} |")
    print("\nCOCO arithmetic (raw bytes per view, no compression, projections left out): R50-FPN neck, "
          + ", ".join(f"{level} {' x '.join(map(str, shape))}" for level, shape in COCO_LEVELS.items())
          + f"; pool:HALF is {HALF}, each level's sides halved")
    print("| codec | stored per view | B/view | MB/view | / fp16 |")
    print("|---|---|---:|---:|---:|")
    for row in coco:
        shapes = ", ".join(" x ".join(map(str, v["stored_shape"])) for v in row["levels"].values())
        print(f"| `{row['codec'].replace(HALF, 'pool:HALF')}` | {shapes} | {row['bytes_per_view']:,} "
              f"| {row['bytes_per_view'] / 1e6:.3f} | {row['vs_fp16']:.4f} |")
    print(f"{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
