"""The cache-teacher stage: run the teacher once over the seeded view stream and store
its per-view logits (and any feature outputs of `--outputs`), shard by shard, in an
archive that replays exactly those views."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed
from .config import MAIN_TEACHER, CacheSpec, ModelSpec, ViewRecipe, absolute_path, check_teacher_name
from .data import RangeBatches, Source, ViewDataset, content_digests, is_detection, open_source
from .deploy import view_defaults
from .detection import (BACKGROUND, NECK, NeckTeacher, detection_classes, detection_options, detection_recipe,
                        is_detection_data)
from .detectors import refuse_detector
from .errors import ArchiveError, ConfigError, ModelError
from .host import keep_freed_memory, quiet_worker
from .models import Teacher, with_num_classes
from .progress import say, views_progress
from .store import (ArchiveWriter, DatasetInfo, FeatureCodec, Location, Manifest, NoLogitsCodec, TeacherInfo,
                    check_archive_matches, check_backend_name, check_codec_name, content_fingerprint, finished_archive_of,
                    fit_projection, parse_codec, parse_output, projection_samples, read_manifest, teacher_archive)
from .views import view_param_fields


def archive_summary(manifest: Manifest, location: str) -> dict:
    """Size figures of a finished archive."""
    views = manifest.layout.views
    return {
        "archive": location,
        "views": views,
        "bytes": manifest.total_bytes,
        "bytes_per_view": manifest.total_bytes / views,
    }


def cache_teacher(spec: CacheSpec) -> dict:
    """Cache the teacher's logits for every view of the recipe; resumes an unfinished
    archive of the same job, and is a no-op on a finished one. Returns size and speed."""
    started = time.perf_counter()
    spec = replace(spec, teacher=replace(spec.teacher, weights=absolute_path(spec.teacher.weights)))  # as recorded
    check_codec_name(spec.codec)  # the options first, before any data or archive is touched
    check_backend_name(spec.format)
    for module, name in map(parse_output, spec.features):
        FeatureCodec.from_name(module, name, shape=None)
    keep_freed_memory()
    source = open_source(spec.data)
    if spec.features and spec.teacher_name != MAIN_TEACHER and not is_detection(source):
        raise ConfigError("--outputs stores feature outputs of the archive's main teacher only (train-student "
                          "--feature reads those): drop the feature outputs with --teacher-name")
    location = Location(spec.out, spec.storage_options)
    if not location.writable:
        raise ArchiveError(f"cannot write an archive to {spec.out}: http(s) is read-only; use a local path, s3:// or gs://")
    digests = content_digests(source)  # what every image is, so a replay can tell it is the same
    if spec.teacher_name != MAIN_TEACHER:
        location = _added_teacher_location(spec, source, digests, location)
    teacher, plan = _plan(spec, source, digests)
    ranks = distributed.ranks()
    finished = finished_archive_of(location, plan) if ranks.main and not spec.overwrite else None
    done = distributed.broadcast(finished)
    if done is not None:
        say(f"archive {spec.out} is already complete for this job; nothing to do")
        return archive_summary(done, spec.out) | {"seconds": 0.0, "views_per_sec": None, "computed_views": 0,
                                                  "ranks": ranks.world}

    # Rank 0 takes the lease and lays the archive out; then every rank computes its share
    # of the uncommitted (epoch, shard) units, taken in turn, and writes them itself.
    writer = ArchiveWriter(location, plan, source.labels, overwrite=spec.overwrite, content_digests=digests,
                           fit_projections=lambda: fit_projections(plan, source, teacher)) if ranks.main else None
    pending = distributed.broadcast(writer.pending_units() if ranks.main else None)
    if writer is None:
        writer = ArchiveWriter(location, plan, source.labels, lead=False, content_digests=digests)
    if pending and len(pending) < spec.recipe.epochs * writer.shards_per_epoch:
        say(f"resuming {spec.out}: {len(pending)} shard(s) left to compute")
    try:
        compute_started = time.perf_counter()
        _compute(spec, source, teacher, writer, pending[ranks.rank :: ranks.world])
        with writer.lease.kept() if writer.lease is not None else nullcontext():
            distributed.barrier()  # every rank's shards are committed
        compute_seconds = time.perf_counter() - compute_started
        manifest = writer.finish() if ranks.main else None
    except BaseException:
        writer.abandon()  # never hides the failure that stopped the run
        raise
    computed = sum(stop - start for *_, start, stop in pending) * spec.recipe.views_per_sample
    return archive_summary(distributed.broadcast(manifest), spec.out) | {
        "seconds": time.perf_counter() - started,
        "computed_views": computed,
        "views_per_sec": computed / compute_seconds if computed else None,
        "ranks": ranks.world,
    }


def cache_recipe(teacher: ModelSpec, options: dict, teacher_name: str, out: str, storage_options: dict,
                 data: str = "") -> ViewRecipe:
    """The view recipe to cache: for the archive's own teacher the options given, else
    one epoch at the teacher's input size and interpolation (detection data: box-aware
    views, `detection.detection_options`); for a teacher added to the archive at `out`,
    the archive's recipe, which options given must agree with."""
    check_teacher_name(teacher_name)
    if teacher_name == MAIN_TEACHER:
        if is_detection_data(data):
            return detection_recipe(options, 1)
        return ViewRecipe.from_dict({"epochs": 1} | view_defaults(teacher) | options)
    manifest = read_manifest(Location(out, storage_options))
    if manifest.recipe.detection is not None:
        options = detection_options(options, manifest.recipe.detection)
    # through ViewRecipe, so an option given at its default (--random-erase 0) reads as the archive's JSON does
    check_archive_matches(manifest, out, recipe=ViewRecipe.from_dict(manifest.recipe.to_dict() | options).to_dict())
    return manifest.recipe


def _plan(spec: CacheSpec, source: Source, digests: np.ndarray) -> tuple[Teacher | NeckTeacher, Manifest]:
    """The teacher to run and the manifest-to-be of its archive."""
    described = {key: value for key, value in source.describe().items() if key != "task"}  # the recipe says it
    dataset = DatasetInfo.from_dict(described | {"content": content_fingerprint(digests)})
    if is_detection(source):
        return _detector_plan(spec, source, dataset)
    refuse_detector(spec.teacher, "teacher")
    if spec.embedding_layer is None:
        classes = _teacher_classes(spec, source.classes)
        model = with_num_classes(spec.teacher, classes, "teacher")
    else:  # the head's class count does not matter: what is cached is a layer's output
        classes = None
        model = spec.teacher if spec.teacher.num_classes else with_num_classes(spec.teacher, source.classes, "teacher")
    outputs = dict(map(parse_output, spec.features))
    if len(outputs) != len(spec.features):
        raise ConfigError(f"--outputs names a module twice: {','.join(spec.features)}")
    teacher = Teacher(model, size=spec.recipe.size, embedding=spec.embedding_layer, features=tuple(outputs))
    codec = parse_codec(spec.codec, teacher.num_classes)
    described = TeacherInfo.from_dict(teacher.describe() | {"name": spec.teacher_name, "classes": classes})
    return teacher, Manifest.plan(spec.format, spec.recipe, described, dataset, codec, spec.positions_per_shard,
                                  features=_feature_codecs(teacher, outputs, spec.recipe.size))


def _detector_plan(spec: CacheSpec, source: Source, dataset: DatasetInfo) -> tuple[NeckTeacher, Manifest]:
    """A detector teacher and the plan of its archive: the neck's maps alone (codec
    `none`), each level with the codec --outputs gives it (`neck=CODEC` for every level,
    `neck.LEVEL=CODEC` for one), float16 by default."""
    if spec.embedding_layer is not None or spec.teacher_classes is not None or spec.codec != CacheSpec.codec:
        raise ConfigError("a detector teacher caches its neck features (--outputs neck=CODEC): --outputs embeddings, "
                          "--teacher-classes and --codec are for classifiers")
    classes = detection_classes(source)
    if spec.teacher.num_classes not in (None, classes):
        raise ConfigError(f"the teacher has {spec.teacher.num_classes} classes; a detector for the {classes - 1} "
                          f"categories of {spec.data} has {classes} (the background is class 0): drop --num-classes")
    teacher = NeckTeacher(replace(spec.teacher, num_classes=classes), classes, spec.recipe.size)
    given = dict(map(parse_output, spec.features))
    unknown = [name for name in given if name != NECK and name not in teacher.feature_modules]
    if unknown:
        raise ConfigError(f"--outputs {unknown[0]}: the teacher's neck gives {', '.join(teacher.feature_modules)} "
                          f"(or name them all: {NECK}=CODEC)")
    outputs = {name: given.get(name, given.get(NECK)) for name in teacher.feature_modules}
    codecs = tuple(FeatureCodec.from_name(name, codec or "fp16", teacher.shapes[name]) for name, codec in outputs.items())
    described = TeacherInfo.from_dict(teacher.describe() | {"name": spec.teacher_name,
                                                            "classes": [BACKGROUND, *source.classes]})
    return teacher, Manifest.plan(spec.format, spec.recipe, described, dataset, NoLogitsCodec(), spec.positions_per_shard,
                                  features=codecs)


def _feature_codecs(teacher: Teacher, outputs: dict[str, str], size: int) -> tuple[FeatureCodec, ...]:
    """The codec of each feature output (by the name given) for the module it means, with
    the shape a view gives it, from one dry pass on a blank view."""
    if not outputs:
        return ()
    _, features = teacher.with_features(torch.zeros(1, 3, size, size))
    modules = teacher.feature_modules
    if len(set(modules.values())) != len(modules):
        raise ConfigError(f"--outputs names one module twice ({', '.join(outputs)} mean {', '.join(modules.values())})")
    return tuple(FeatureCodec.from_name(modules[name], codec, tuple(features[name].shape[1:]))
                 for name, codec in outputs.items())


PROJECTION_SAMPLES = 256  # samples whose epoch-0 views a pca codec is fitted on
PROJECTION_STREAM = 7  # the seed stream of their choice (views.py uses 0-6)


def fit_projections(plan: Manifest, source: Source, teacher: Teacher) -> dict[str, np.ndarray]:
    """The PCA projection of each feature stored with `pca`, by module: fitted on the
    teacher's (pooled) outputs for the views of epoch 0 of a seeded sample of samples."""
    recipe = plan.recipe
    rng = np.random.default_rng([recipe.seed, PROJECTION_STREAM])
    picks = np.sort(rng.choice(len(source), size=min(len(source), PROJECTION_SAMPLES), replace=False))
    views = ViewDataset(source, recipe)
    wanted = [feature for feature in plan.features if feature.components is not None]
    samples = {feature.module: [] for feature in wanted}
    for chunk in np.array_split(picks, -(-len(picks) // 32)):
        batch = torch.stack([views[int(position)]["views"] for position in chunk])
        _, features = _module_outputs(teacher, batch.flatten(0, 1))
        _check_finite(features, torch.as_tensor(chunk), 0)
        for feature in wanted:
            values = features[feature.module].cpu().numpy().reshape(len(chunk), recipe.views_per_sample, *feature.shape)
            samples[feature.module].append(projection_samples(feature.pooled(values)))
    return {feature.module: fit_projection(np.concatenate(samples[feature.module]), feature.components)
            for feature in wanted}


def _compute(spec: CacheSpec, source: Source, teacher: Teacher, writer: ArchiveWriter,
             units: list[tuple[int, int, int, int]]) -> None:
    """Run the teacher over the views of `units` (epoch, shard, start, stop) and write
    each shard whole. A finished shard is encoded and written on a thread while the
    teacher computes the next one; at most one shard is in flight, so commits stay in order."""
    recipe, num_samples = spec.recipe, len(source)
    views, params = recipe.views_per_sample, len(view_param_fields(recipe))
    classes = 0 if writer.plan.teacher.outputs == "features" else teacher.num_classes  # a detector's: no logits
    features = {feature.module: feature.shape for feature in writer.plan.features}
    loader = DataLoader(
        ViewDataset(source, recipe),
        batch_sampler=RangeBatches([(e, start, stop) for e, _, start, stop in units], num_samples, spec.batch_size),
        num_workers=spec.workers,
        pin_memory=teacher.device.type == "cuda",
        worker_init_fn=quiet_worker,
    )
    queue = iter(units)
    unit = next(queue, None)
    with ThreadPoolExecutor(1, thread_name_prefix="kdpipe-store") as storing, views_progress() as progress:
        task = progress.add_task("cache-teacher", total=sum(stop - start for *_, start, stop in units) * views)
        stored = None
        for batch in loader:
            epoch, shard, start, stop = unit
            if batch["position"][0] == start:
                logits_buffer = np.empty((stop - start, views, classes), dtype=np.float32)
                params_buffer = np.empty((stop - start, views, params), dtype=np.float32)
                feature_buffers = {module: np.empty((stop - start, views, *shape), dtype=np.float32)
                                   for module, shape in features.items()}
            count = len(batch["index"])
            logits, outputs = _module_outputs(teacher, batch["views"].flatten(0, 1))
            logits = logits.cpu().view(count, views, classes)
            if not torch.isfinite(logits).all():
                bad = int(batch["index"][(~torch.isfinite(logits)).flatten(1).any(1)][0])
                raise ModelError(
                    f"the teacher gave NaN or Inf logits for sample {bad} in epoch {epoch}; "
                    "check its weights and input normalisation (nothing was stored for this shard)"
                )
            _check_finite(outputs, batch["index"], epoch)
            rows = slice(int(batch["position"][0]) - start, int(batch["position"][-1]) - start + 1)
            logits_buffer[rows] = logits.float().numpy()
            params_buffer[rows] = batch["params"].numpy()
            for module, buffer in feature_buffers.items():
                buffer[rows] = outputs[module].cpu().view(count, views, *features[module]).numpy()
            if rows.stop == stop - start:
                if stored is not None:
                    stored.result()  # raises the store's error, if any
                stored = storing.submit(writer.write_unit, epoch, shard, logits_buffer, params_buffer, feature_buffers)
                unit = next(queue, None)
            progress.advance(task, count * views)
        if stored is not None:
            stored.result()


def _module_outputs(teacher: Teacher, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`Teacher.with_features`, with the feature outputs keyed by the module each name
    means (as the archive records them: a timm feature_info index resolved)."""
    outputs, features = teacher.with_features(views)
    return outputs, {teacher.feature_modules[name]: values for name, values in features.items()}


def _check_finite(outputs: dict[str, torch.Tensor], samples: torch.Tensor, epoch: int) -> None:
    """Refuse NaN or Inf in a feature output (rows: `samples`' views in order), naming the
    first sample that has one (as the logits' check does): nothing of that shard is stored."""
    for name, values in outputs.items():
        bad = ~torch.isfinite(values.reshape(len(samples), -1))
        if bad.any():
            sample = int(samples[bad.any(1).cpu()][0])
            raise ModelError(f"the teacher's module {name!r} gave NaN or Inf for sample {sample} in epoch {epoch}; "
                             "check its weights and input normalisation (nothing was stored for this shard)")


def _teacher_classes(spec: CacheSpec, data_classes: list[str] | None) -> list[str] | None:
    """The names of the teacher's outputs: --teacher-classes, or the data's class folders.
    A teacher may know a subset of the data's classes (its student learns their union)."""
    if spec.teacher_classes is None:
        return data_classes
    classes = list(spec.teacher_classes)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"--teacher-classes names a class twice: {','.join(classes)}")
    unknown = [c for c in classes if data_classes is not None and c not in data_classes]
    if unknown:
        raise ConfigError(f"--teacher-classes {unknown[0]!r} is not a class folder of {spec.data}")
    return classes


def _added_teacher_location(spec: CacheSpec, source, digests: np.ndarray, base: Location) -> Location:
    """Where a further teacher of the finished archive at `base` goes: teachers/NAME
    inside it, a complete archive of its own whose views are checked to be the archive's."""
    manifest = read_manifest(base)
    check_archive_matches(manifest, spec.out, recipe=spec.recipe.to_dict(),
                          dataset__fingerprint=source.describe()["fingerprint"])
    if manifest.dataset.content is not None:
        check_archive_matches(manifest, spec.out, dataset__content=content_fingerprint(digests))
    return Location(teacher_archive(base.url, spec.teacher_name), spec.storage_options)
