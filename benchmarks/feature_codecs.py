"""The feature-codec table of docs/compression.md: what each codec of a cached feature map
costs in bytes, how close its decoded map stays to float32, and how a student
feature-distilled through it scores, each row with the exact commands that produced it.

The setting is benchmarks/features.py's hint row, cached instead of online: its
`kdpipe:cnn` teacher (trained on all 1,438 training digits) is cached over the student's
own views (the 50 labelled digits, 10 epochs of 4 views: 2,000 views) once per codec,
with `--outputs logits,9=CODEC`: block 2's maps, 64 x 8 x 8 per view. A `kdpipe:cnn`
student learns from each archive with CE on the labels plus the FitNets hint
(`--alpha 1 --feature hint:9@100`), the same seeds in every row, so rows are paired.

Per codec: the bytes per view of the feature's stored objects (its arrays' chunks and
metadata, plus the PCA projection spread over the archive's views), against the 8,192
raw bytes of a float16 map; the relative L2 error and the mean per-view cosine
similarity of the decoded maps against the float32 archive's (for a pooled codec,
against the float32 maps pooled the same way, so the columns measure what PCA and
quantisation lose on top of the pooling); the student's val top-1.

    python benchmarks/feature_codecs.py --workdir feature-codecs-run [--seeds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from features import EPOCHS, prepare, student
from methods import RECIPE, kdpipe

from pipeline.store import ArchiveReader
from pipeline.store.feature_codecs import adaptive_average_pool

MODULE = "9"  # kdpipe:cnn's block 2 (the ReLU after its first 64-channel convolution): 64 x 8 x 8
REFERENCE = "fp32"  # lossless: what the other codecs are compared with
CODECS = ["fp32", "fp16", "int8", "pca:16+int8", "pca:2+int8", "pool:4+pca:8+int8", "pool:4+pca:4+int8",
          "pool:4+pca:2+int8", "pool:2+pca:16+int8", "pool:1+fp16"]
TARGET = {"bytes_fraction_of_fp16": 1 / 50, "accuracy_points": 0.5}
HINT = ["--alpha", "1", "--feature", f"hint:{MODULE}@100"]


def archive(codec: str) -> str:
    return "archives/" + codec.replace(":", "").replace("+", "-")


def cache(codec: str) -> list[str]:
    """The teacher over exactly the views the student trains on (its data, recipe, epochs and views)."""
    return ["cache-teacher", "--data", "digits/labelled", "--teacher", "kdpipe:cnn", "--weights",
            "runs/teacher/student.pt", "--out", archive(codec), "--epochs", str(EPOCHS), "--views-per-sample", "4",
            *RECIPE, "--workers", "0", "--outputs", f"logits,{MODULE}={codec}"]


def train(codec: str, seed: int) -> list[str]:
    out = "runs/" + archive(codec).removeprefix("archives/") + f"-seed{seed}"
    return student(out, "--mode", "cached", "--cache", archive(codec), *HINT, "--init-seed", str(seed))


def stored_bytes(reader: ArchiveReader) -> dict:
    """Bytes per view of the feature: as stored (every object of its arrays, metadata
    included, and its projection) and raw (its fields before compression, and the
    projection), with the raw bytes of the same map in float16."""
    feature = reader.features[MODULE]
    views = reader.epochs * reader.num_samples * reader.views
    names = feature.fields(1)
    files = reader.manifest.files
    arrays = sum(entry.bytes for key, entry in files.items() if key.split("/")[0] in names)
    projection = files[feature.projection_key].bytes if feature.projection_key else 0
    raw = sum(math.prod(shape[1:]) * dtype.itemsize for shape, dtype in names.values())
    return {"stored": (arrays + projection) / views, "projection": projection / views, "raw": raw + projection / views,
            "fp16_raw": math.prod(feature.shape) * 2}


def decoded_maps(reader: ArchiveReader) -> tuple[np.ndarray, np.ndarray]:
    """Every view's decoded feature (views, *decoded shape), in archive order, and the
    view parameters and sample indices they were computed on (to check two archives agree)."""
    reader.read_only_features((MODULE,))
    maps, keys = [], []
    for epoch in range(reader.epochs):
        fields = reader.read_fields(epoch, 0, reader.num_samples)
        maps.append(reader.decode_feature(MODULE, fields).reshape(-1, *reader.features[MODULE].decoded_shape))
        keys.append(np.concatenate([fields["view_params"].reshape(len(maps[-1]), -1),
                                    np.repeat(fields["sample_index"], reader.views)[:, None]], axis=1))
    return np.concatenate(maps), np.concatenate(keys)


def fidelity(decoded: np.ndarray, reference: np.ndarray) -> dict:
    """Relative L2 error over the whole archive and the mean over views of the cosine similarity."""
    decoded, reference = decoded.reshape(len(decoded), -1).astype(np.float64), reference.reshape(len(reference), -1)
    error = np.linalg.norm(decoded - reference) / np.linalg.norm(reference)
    norms = np.linalg.norm(decoded, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.sum(decoded * reference, axis=1) / np.maximum(norms, 1e-30)
    return {"relative_l2": float(error), "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def pooling_loss(maps: np.ndarray, pool: tuple[int, int]) -> float | None:
    """What pooling alone discards: the relative L2 error of the pooled maps, each bin's
    mean spread back over its positions, against the full maps (None for bins of unequal size)."""
    height, width = maps.shape[-2:]
    if height % pool[0] or width % pool[1]:
        return None
    spread = adaptive_average_pool(maps, pool).repeat(height // pool[0], axis=-2).repeat(width // pool[1], axis=-1)
    return float(np.linalg.norm(maps - spread) / np.linalg.norm(maps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="feature-codecs-run")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per codec (init-seed 1..N)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated; fp32 is always measured")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started, workdir = time.perf_counter(), Path(args.workdir)
    codecs = [REFERENCE] + [codec for codec in args.codecs.split(",") if codec != REFERENCE]
    teacher = prepare(workdir)
    reference_maps = reference_keys = None
    results = []
    for codec in codecs:
        kdpipe(workdir, cache(codec))  # a finished archive is left alone
        reader = ArchiveReader(workdir / archive(codec))
        maps, keys = decoded_maps(reader)
        if codec == REFERENCE:
            reference_maps, reference_keys, views = maps, keys, len(maps)
        if not np.array_equal(keys, reference_keys):
            raise SystemExit(f"{archive(codec)} holds other views than {archive(REFERENCE)}")
        feature = reader.features[MODULE]
        pool = feature.pool  # a pooled codec is compared with the float32 maps pooled alike
        reference = reference_maps if pool is None else adaptive_average_pool(reference_maps, pool)
        scores = []
        for seed in range(1, args.seeds + 1):
            command = train(codec, seed)
            out = workdir / command[command.index("--out") + 1]
            if not (out / "summary.json").exists():
                kdpipe(workdir, command)
            scores.append(json.loads((out / "summary.json").read_text())["val_top1"])
        results.append({"codec": feature.name, "stored_shape": list(feature.stored_shape),
                        "bytes_per_view": stored_bytes(reader), **fidelity(maps, reference),
                        "compared_with": "fp32" if pool is None else f"fp32 pooled to {pool[0]}x{pool[1]}",
                        "pooling_relative_l2": None if pool is None else pooling_loss(reference_maps, pool),
                        "val_top1": statistics.fmean(scores), "per_seed": scores,
                        "std": statistics.stdev(scores) if len(scores) > 1 else None,
                        "commands": ["kdpipe " + " ".join(cache(codec)), "kdpipe " + " ".join(train(codec, 1))]})
    for row in results:  # paired with the fp32 row, seed by seed
        row["vs_fp32"] = statistics.fmean(s - r for s, r in zip(row["per_seed"], results[0]["per_seed"]))
        row["meets_target"] = (row["bytes_per_view"]["stored"] <= row["bytes_per_view"]["fp16_raw"] *
                               TARGET["bytes_fraction_of_fp16"] and row["vs_fp32"] >= -TARGET["accuracy_points"])
    report = {"teacher": teacher, "module": MODULE, "views": views, "seeds": args.seeds, "target": TARGET,
              "rows": results, "seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"teacher (val top-1 %): {teacher:.2f}; feature {MODULE}: "
          f"{results[0]['bytes_per_view']['fp16_raw']:,} float16 bytes per view")
    print("| codec | stored shape | B/view stored | raw | fp16 raw / stored | rel. L2 | cosine | compared with "
          "| pooling alone: rel. L2 | val top-1 % | vs fp32 | per seed |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for r in results:
        size = r["bytes_per_view"]
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        pooled = r["pooling_relative_l2"]
        shape = " x ".join(map(str, r["stored_shape"]))
        print(f"| `{r['codec']}` | {shape} | {size['stored']:,.1f} | {size['raw']:,.1f} "
              f"| {size['fp16_raw'] / size['stored']:.1f}x | {r['relative_l2']:.2e} | {r['cosine_mean']:.6f} "
              f"| {r['compared_with']} | {'' if pooled is None else f'{pooled:.3f}'} | {r['val_top1']:.2f}{spread} "
              f"| {r['vs_fp32']:+.2f} "
              f"| {', '.join(f'{s:.2f}' for s in r['per_seed'])} |")
    for r in results:
        print(f"{r['codec']}:\n  " + "\n  ".join(r["commands"]))
    print(f"{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
