"""The cache-teacher stage: run the teacher once over the seeded view stream and store
its per-view logits, shard by shard, in an archive that replays exactly those views."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import CacheSpec, first_difference
from .data import RangeBatches, ViewDataset, open_source
from .errors import ArchiveError, ModelError
from .models import Teacher, with_num_classes
from .progress import say, views_progress
from .store import ARCHIVE_FORMAT, SCHEMA_VERSION, ArchiveWriter, Codec, Location, parse_codec, plan_layout
from .store.archive import finish_cleanup
from .store.manifest import MANIFEST, job_identity, library_versions, read_manifest
from .views import VIEW_PARAM_FIELDS


def archive_summary(manifest: dict, location: str) -> dict:
    """Size figures of a finished archive."""
    layout = manifest["layout"]
    views = layout["epochs"] * layout["num_samples"] * layout["views_per_sample"]
    return {
        "archive": location,
        "views": views,
        "bytes": manifest["total_bytes"],
        "bytes_per_view": manifest["total_bytes"] / views,
    }


def cache_teacher(spec: CacheSpec) -> dict:
    """Cache the teacher's logits for every view of the recipe; resumes an unfinished
    archive of the same job, and is a no-op on a finished one. Returns size and speed."""
    started = time.perf_counter()
    source = open_source(spec.data)
    recipe = spec.recipe
    location = Location(spec.out, spec.storage_options)
    if not location.writable:
        raise ArchiveError(f"cannot write an archive to {spec.out}: http(s) is read-only; use a local path, s3:// or gs://")
    teacher = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), size=recipe.size)
    codec = parse_codec(spec.codec, teacher.num_classes)
    plan = _plan(spec, codec, source.describe(), teacher.describe(), len(source))
    num_samples, views, classes = len(source), recipe.views_per_sample, teacher.num_classes
    done = _finished_same_job(spec, location, plan)
    if done is not None:
        say(f"archive {spec.out} is already complete for this job; nothing to do")
        return archive_summary(done, spec.out) | {"seconds": 0.0, "views_per_sec": None, "computed_views": 0}

    writer = ArchiveWriter(location, plan, source.labels, overwrite=spec.overwrite)
    units = writer.pending_units()
    total_views = sum(stop - start for *_, start, stop in units) * views
    if units and len(units) < recipe.epochs * writer.shards_per_epoch:
        say(f"resuming {spec.out}: {len(units)} shard(s) left to compute")
    try:
        loader = DataLoader(
            ViewDataset(source, recipe),
            batch_sampler=RangeBatches([(e, start, stop) for e, _, start, stop in units], num_samples, spec.batch_size),
            num_workers=spec.workers,
            pin_memory=teacher.device.type == "cuda",
        )
        compute_started = time.perf_counter()
        pending = iter(units)
        unit = next(pending, None)
        with views_progress() as progress:
            task = progress.add_task("cache-teacher", total=total_views)
            for batch in loader:
                epoch, shard, start, stop = unit
                if batch["position"][0] == start:
                    logits_buffer = np.empty((stop - start, views, classes), dtype=np.float32)
                    params_buffer = np.empty((stop - start, views, len(VIEW_PARAM_FIELDS)), dtype=np.float32)
                count = len(batch["index"])
                logits = teacher(batch["views"].flatten(0, 1)).cpu().view(count, views, classes)
                if not torch.isfinite(logits).all():
                    bad = int(batch["index"][(~torch.isfinite(logits)).flatten(1).any(1)][0])
                    raise ModelError(
                        f"the teacher gave NaN or Inf logits for sample {bad} in epoch {epoch}; "
                        "check its weights and input normalisation (nothing was stored for this shard)"
                    )
                rows = slice(int(batch["position"][0]) - start, int(batch["position"][-1]) - start + 1)
                logits_buffer[rows] = logits.float().numpy()
                params_buffer[rows] = batch["params"].numpy()
                if rows.stop == stop - start:
                    writer.write_unit(epoch, shard, logits_buffer, params_buffer)
                    unit = next(pending, None)
                progress.advance(task, count * views)
        compute_seconds = time.perf_counter() - compute_started
        manifest = writer.finish()
    except BaseException:
        writer.lease.release()  # the committed shards stay; a re-run resumes
        raise
    return archive_summary(manifest, spec.out) | {
        "seconds": time.perf_counter() - started,
        "computed_views": total_views,
        "views_per_sec": total_views / compute_seconds if total_views else None,
    }


def _plan(spec: CacheSpec, codec: Codec, dataset: dict, teacher: dict, num_samples: int) -> dict:
    """Everything the manifest will say except the shard list and checksums."""
    recipe = spec.recipe
    classes, views = teacher["num_classes"], recipe.views_per_sample
    fields = codec.fields(views, classes) | {"view_params": ((views, len(VIEW_PARAM_FIELDS)), np.dtype(np.float32))}
    bytes_per_position = sum(int(np.prod(tail)) * dtype.itemsize for tail, dtype in fields.values())
    layout = {
        "epochs": recipe.epochs,
        "num_samples": num_samples,
        "views_per_sample": recipe.views_per_sample,
        "num_classes": classes,
        "view_param_fields": list(VIEW_PARAM_FIELDS),
    } | plan_layout(num_samples, bytes_per_position, spec.positions_per_shard, buffer_bytes_per_position=views * classes * 4)
    return {
        "format": ARCHIVE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "backend": spec.format,
        "recipe": recipe.to_dict(),
        "teacher": teacher,
        "dataset": dataset,
        "codec": codec.to_dict(),
        "layout": layout,
        "libraries": library_versions(),
    }


def _finished_same_job(spec: CacheSpec, location: Location, plan: dict) -> dict | None:
    """The manifest of a finished archive at `spec.out` made by this very job, if any."""
    if spec.overwrite or not location.exists(MANIFEST):
        return None
    manifest = read_manifest(location)
    where = first_difference(job_identity(plan), job_identity(manifest))
    if where is not None:
        raise ArchiveError(
            f"archive {spec.out} already exists for a different job ({where} differs); "
            "pass --overwrite to replace it, or choose another --out"
        )
    finish_cleanup(location)  # a run killed just after writing the manifest left these
    return manifest
