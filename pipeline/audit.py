"""`kdpipe inspect` and `kdpipe verify`: what an archive holds, and whether it is sound.

inspect reads the manifest (or, for an unfinished archive, the plan and its commit
markers) and, with stats on, every view's logits once: the teacher's top-1 agreement
with the labels and the entropy of its distributions.

verify checks every object against the manifest's sha256, recomputes N random views with
the teacher on the data (those the manifest records, unless others are given) and
compares the teacher's fresh logits with the stored ones. Dense codecs compare logits (error relative to the view's largest logit); top-k
compares the log-probabilities of the stored classes. Feature outputs are compared as
stored: the fresh output pooled and projected as the archive does, against the stored
values (error relative to the largest).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import torch

from .config import ModelSpec
from .data import Source, ViewDataset, open_source
from .errors import ArchiveError, ModelError
from .detection import NeckTeacher
from .models import Teacher, with_num_classes
from .store import (INT8_LEVELS, LOGPROB_STEP, ArchiveReader, Location, TopKCodec, UnfinishedArchive, added_teachers,
                    check_archive_matches, read_manifest, unfinished_archive, verify_objects)
from .views import view_param_fields

# A recomputed view passes when its error is within these bounds.
DENSE_RELATIVE_TOLERANCE = 0.02  # covers float16 storage and bf16 autocast on a GPU
TOPK_LOGPROB_TOLERANCE = LOGPROB_STEP / 2 + 0.02  # half a quantisation step, plus float noise


def inspect_archive(url: str, storage_options: dict | None = None, local_cache: str | None = None,
                    stats: bool = True) -> dict:
    """A description of the archive at `url`; `stats` adds a pass over every view."""
    location = Location(url, storage_options)
    unfinished = unfinished_archive(location)
    if unfinished is not None:
        return _describe_unfinished(location, unfinished)
    reader = ArchiveReader(location, local_cache=local_cache)
    reader.read_only_features(())  # the statistics are the logits': feature maps are neither fetched nor decoded
    manifest, layout = reader.manifest, reader.layout
    dataset, teacher = manifest.dataset, manifest.teacher
    report = {
        "archive": str(location),
        "complete": True,
        "backend": manifest.backend,
        "schema_version": manifest.schema_version,
        "codec": manifest.codec.to_dict(),
        "recipe": manifest.recipe.to_dict(),
        "teacher": {"name": teacher.spec["name"], "fingerprint": teacher.fingerprint, "num_classes": teacher.num_classes},
        "dataset": {"fingerprint": dataset.fingerprint, "num_samples": dataset.num_samples,
                    "labelled": dataset.labelled, "location": dataset.location,
                    "num_classes": len(dataset.classes or [])},
        "shape": {"epochs": layout.epochs, "positions": layout.num_samples,
                  "views_per_sample": layout.views_per_sample, "classes": layout.num_classes},
        "shards": len(manifest.shards),
        "files": len(manifest.files),
        "views": layout.views,
        "total_bytes": manifest.total_bytes,
        "bytes_per_view": manifest.total_bytes / layout.views,
        "libraries": manifest.libraries,
    }
    if manifest.features:  # schema 3: the teacher's feature outputs, each with its codec
        report["features"] = [{"module": feature.module, "shape": list(feature.shape), "codec": feature.name,
                               "stored_shape": list(feature.stored_shape)} for feature in manifest.features]
    if teacher.preprocessing is not None:  # archives made before kdpipe recorded it have none
        report["teacher"]["preprocessing"] = teacher.preprocessing.to_dict()
    added = added_teachers(location)
    if added:  # each also an archive of its own: inspect URL/teachers/NAME for its figures
        report["added_teachers"] = added
    if teacher.outputs == "embeddings":
        report["teacher"]["outputs"] = f"embeddings of layer {teacher.embedding_layer or '(penultimate)'}"
    elif teacher.outputs == "features":
        report["teacher"]["outputs"] = "a detector's neck features alone (no logits)"
    elif stats:  # agreement and entropy describe logits, not embeddings
        report["stats"] = _logit_stats(reader)
    return report


def _describe_unfinished(location: Location, unfinished: UnfinishedArchive) -> dict:
    plan = unfinished.plan
    return {
        "archive": str(location),
        "complete": False,
        "backend": plan.backend,
        "codec": plan.codec.to_dict(),
        "recipe": plan.recipe.to_dict(),
        "teacher": {"name": plan.teacher.spec["name"], "fingerprint": plan.teacher.fingerprint},
        "shards_committed": unfinished.shards_committed,
        "shards_total": unfinished.shards_total,
        "note": "unfinished: re-run the cache-teacher command that made it to complete it",
    }


# What a mixed view's teacher top-1 is scored against, as inspect reports it.
MIXED_AGREEMENT = ("the label of each mixed view's dominant component: its own sample's when lam >= 0.5, "
                   "its partner's when lam <= 0.5 (at 0.5 either counts)")


def _logit_stats(reader: ArchiveReader) -> dict:
    """Top-1 agreement with the labels and entropy (nats) of the teacher's distributions.
    A mixed view (mixup, CutMix) is scored against the label of its dominant component
    (`_agreement`), which needs its partner's label: every sample is at some position of
    every epoch, so the first epoch's views are scored once that epoch has been read."""
    mixing = _mix_columns(reader.manifest.recipe)
    labels_of = np.full(reader.num_samples, -1, dtype=np.int64)  # by sample index
    counts = np.zeros(2, dtype=np.int64)  # views whose top-1 is their label, labelled views
    entropies, waiting = [], []
    for epoch in range(reader.epochs):
        for start in range(0, reader.num_samples, reader.shard_size):
            stop = min(start + reader.shard_size, reader.num_samples)
            fields = reader.read_fields(epoch, start, stop)
            log_probs = torch.from_numpy(reader.codec.decode(fields)).log_softmax(-1)
            entropies.append(-(log_probs.exp() * log_probs).sum(-1).flatten())
            labels_of[fields["sample_index"]] = fields["label"]
            mixed = None if mixing is None else fields["view_params"][..., list(mixing)]
            waiting.append((log_probs.argmax(-1).numpy(), np.asarray(fields["label"]), mixed))
            if mixing is None or epoch > 0 or stop == reader.num_samples:  # else a partner may come later
                counts += sum(_agreement(*views, labels_of) for views in waiting)
                waiting.clear()
    agree, labelled = (int(count) for count in counts)
    entropy = torch.cat(entropies).double()
    quantiles = torch.quantile(entropy, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    stats = {
        "top1_agreement_with_labels": 100.0 * agree / labelled if labelled else None,
        "labelled_views": labelled,
        "entropy_mean": float(entropy.mean()),
        "entropy_p05": quantiles[0],
        "entropy_median": quantiles[1],
        "entropy_p95": quantiles[2],
        "entropy_max_possible": math.log(reader.num_classes),
    }
    return stats if mixing is None else {"agreement_target": MIXED_AGREEMENT} | stats


def _mix_columns(recipe) -> tuple[int, int] | None:
    """The columns of the partner and of lam among an archive's view parameters; None
    when its recipe does not mix."""
    names = view_param_fields(recipe)
    return (names.index("partner"), names.index("lam")) if recipe.mixup else None


def _agreement(top1: np.ndarray, labels: np.ndarray, mixed: np.ndarray | None, labels_of: np.ndarray) -> np.ndarray:
    """[views whose teacher top-1 is their label, labelled views] among `top1` (positions,
    views), for the positions' `labels`. With `mixed` (positions, views, [partner, lam]),
    the label is the dominant component's (MIXED_AGREEMENT): a view that is 70% sample a
    and 30% sample b is a's, and a teacher that sees b in it has not got it right."""
    own = np.broadcast_to(labels[:, None], top1.shape)
    known = own >= 0
    if mixed is None:
        right = top1 == own
    else:
        partner, lam = labels_of[mixed[..., 0].astype(np.int64)], mixed[..., 1]
        right = ((top1 == own) & (lam >= 0.5)) | ((top1 == partner) & (lam <= 0.5))
    return np.array([right[known].sum(), known.sum()], dtype=np.int64)


def verify_archive(url: str, storage_options: dict | None = None, teacher: ModelSpec | None = None,
                   data: str | None = None, recompute: int = 0, seed: int = 0, weights: str | None = None) -> dict:
    """Check every object's checksum; then recompute `recompute` random samples with the
    teacher (by default the one the manifest records, with `weights` if its file moved)
    on the data (by default where the manifest says it was cached from). Returns a
    report whose `problems` list is empty when the archive is sound."""
    location = Location(url, storage_options)
    manifest = read_manifest(location)  # an unfinished, foreign or inconsistent archive is a user error
    problems = verify_objects(location, manifest)
    report = {"archive": str(location), "files_checked": len(manifest.files)}
    if recompute and not problems:
        teacher = teacher or ModelSpec.from_dict(manifest.teacher.spec)
        if weights:
            teacher = replace(teacher, weights=weights, pretrained=None)  # the file holds the weights now
        elif teacher.weights and "://" not in teacher.weights and not os.path.isfile(teacher.weights):
            raise ModelError(f"the teacher's weights {teacher.weights}, recorded in the manifest, are not there; "
                             "pass --weights FILE (where they are now)")
        data = data or manifest.dataset.location
        report["recomputed"] = _recompute(ArchiveReader(location), teacher, data, recompute, seed, problems)
    report["problems"] = problems
    return report


def _recompute(reader: ArchiveReader, teacher_spec: ModelSpec, data: str, count: int, seed: int,
               problems: list[str]) -> dict:
    manifest = reader.manifest
    source = open_source(data)
    check_archive_matches(manifest, str(reader.location), dataset__fingerprint=source.describe()["fingerprint"])
    recipe = manifest.recipe
    modules = tuple(reader.features)
    detector = manifest.teacher.outputs == "features"
    teacher = NeckTeacher(teacher_spec, manifest.teacher.num_classes, recipe.size) if detector else \
        Teacher(with_num_classes(teacher_spec, source.classes, "teacher"), recipe.size, features=modules)
    check_archive_matches(manifest, str(reader.location), teacher__fingerprint=teacher.fingerprint_for(manifest.teacher))
    dataset = ViewDataset(source, recipe)
    rng = np.random.default_rng(seed)
    picks = sorted(set(map(int, rng.choice(len(dataset), size=min(count, len(dataset)), replace=False))))
    topk = isinstance(reader.codec, TopKCodec)
    worst_abs = worst_rel = 0.0
    worst_feature: dict[str, float] = {}
    for item in picks:
        sample = dataset[item]
        epoch, position = sample["epoch"], sample["position"]
        fields = reader.read_fields(epoch, position, position + 1)
        problems.extend(_record_problems(reader, source, sample, fields))
        try:
            fresh, fresh_features = teacher.with_features(sample["views"])
        except Exception as exc:  # noqa: BLE001 - a user model failing on its input
            raise ArchiveError(f"the teacher failed on epoch {epoch}, position {position}: {exc}") from None
        fresh = fresh.cpu()
        for module, values in fresh_features.items():
            error = _feature_error(reader, module, values.cpu().numpy()[None], fields)
            worst_feature[module] = max(worst_feature.get(module, 0.0), error)
            if error > DENSE_RELATIVE_TOLERANCE + (1 / INT8_LEVELS if reader.features[module].dtype == "int8" else 0):
                problems.append(f"epoch {epoch}, position {position} (sample {sample['index']}): the stored feature "
                                f"output of module {module!r} differs from the teacher's by {error:.4g} (relative)")
        if detector:
            continue  # its archive holds the neck's maps alone
        if topk:
            indices = torch.from_numpy(fields["topk_indices"][0].astype(np.int64))
            stored = torch.from_numpy(reader.codec.stored_log_probs(fields)[0])
            expected = fresh.log_softmax(-1).gather(-1, indices)
            kept = reader.codec.quantised(fields)[0] < 255  # entries clipped at the floor carry no value
            error = (stored - expected).abs()[torch.from_numpy(kept)]
            abs_error = float(error.max()) if error.numel() else 0.0
            rel_error = abs_error
            bad = abs_error > TOPK_LOGPROB_TOLERANCE
        else:
            stored = torch.from_numpy(reader.codec.decode(fields)[0])
            abs_error = float((stored - fresh).abs().max())
            rel_error = abs_error / max(float(fresh.abs().max()), 1e-6)
            bad = rel_error > DENSE_RELATIVE_TOLERANCE
        worst_abs, worst_rel = max(worst_abs, abs_error), max(worst_rel, rel_error)
        if bad:
            problems.append(
                f"epoch {epoch}, position {position} (sample {sample['index']}): stored logits differ from the "
                f"teacher's by {abs_error:.4g} (relative {rel_error:.4g})"
            )
    compared = "neck features" if detector else "log-probabilities of the stored classes" if topk else "logits"
    report = {"views": len(picks) * recipe.views_per_sample, "samples": len(picks), "compared": compared}
    if not detector:  # a detector's archive has no logits: its figures are the features' below
        report |= {"max_abs_error": worst_abs, "max_rel_error": worst_rel}
    return report | ({"features_max_rel_error": worst_feature} if worst_feature else {})


def _feature_error(reader: ArchiveReader, module: str, fresh: np.ndarray, fields: dict) -> float:
    """How far a view's stored feature output is from the teacher's fresh one (1, V, ...):
    both as stored (pooled and projected with the archive's projection), the largest
    difference relative to the largest fresh value. A PCA codec's discarded components
    are its design, not damage: the stored coefficients are what is checked."""
    feature = reader.features[module]
    expected = feature.reduce(fresh, reader.projections.get(module))
    return float(np.abs(feature.dequantise(fields) - expected).max() / max(float(np.abs(expected).max()), 1e-6))


def _record_problems(reader: ArchiveReader, source: Source, sample: dict, fields: dict) -> list[str]:
    """What differs between the archive's record of a view and the view derived afresh:
    the sample at its position, its view parameters, the bytes its pixels come from
    (checksums only prove the record is the one written, not that it is right)."""
    where = f"epoch {sample['epoch']}, position {sample['position']}"
    stored_index = int(fields["sample_index"][0])
    if stored_index != sample["index"]:
        return [f"{where}: the archive holds sample {stored_index} where the recipe puts sample {sample['index']}"]
    problems = []
    if not np.array_equal(fields["view_params"][0], sample["params"].numpy()):
        problems.append(f"{where} (sample {sample['index']}): the stored view parameters are not those the recipe "
                        "gives (the archive was altered, or the recipe or kdpipe's view code changed)")
    digests = reader.content_digests()
    for index, content in ((sample["index"], sample["content"]), (sample["partner"], sample["partner_content"])):
        if digests is not None and not np.array_equal(digests[index], content.numpy()):
            problems.append(f"{source.name(index)} changed since the archive was cached (its bytes differ)")
    return problems

