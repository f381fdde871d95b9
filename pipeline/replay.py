"""Training from an archive: which teachers' archives a cached run reads, whether they
fit the run, and the student's batches with the logits stored for exactly their views.

A DataLoader over `ViewBatches` (or `ReplayBatches`) is given whole batches of item
numbers by `data.RangeBatches` (with `batch_size=None`): each batch is consecutive
positions of one epoch, so a cached teacher's logits for it are one contiguous slab of
the archive. The slab is checked and handed to the batch as it is, (samples, views,
classes), never split per sample and collated back.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .config import MAIN_TEACHER, TrainSpec, ViewRecipe
from .data import Source, ViewDataset
from .deploy import view_defaults
from .errors import ArchiveMismatchError, ConfigError
from .models import Teacher, with_num_classes
from .progress import say
from .store import ArchiveReader, check_archive_matches, teacher_archive
from .views import ViewParams, view_boxes


class ViewBatches(Dataset):
    """Item `[k, k+1, ...]` is the collated batch of those ViewDataset items: the views
    (samples, V, 3, size, size), their keys (epoch, position, index), labels and view
    parameters; for a detection recipe also `targets`, the boxes each view shows
    (`view_targets`)."""

    def __init__(self, views: ViewDataset):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, items: list[int]) -> dict:
        batch = default_collate([self.views[item] for item in items])
        if self.views.recipe.detection is not None:
            batch["targets"] = view_targets(self.views.source, self.views.recipe, batch["index"], batch["params"],
                                            self.views.sizes["views"])
        return batch


def view_targets(source: Source, recipe: ViewRecipe, indices: torch.Tensor, params: torch.Tensor,
                 size: int) -> list[dict[str, torch.Tensor]]:
    """The ground truth of each view of a detection batch, sample by sample and view by
    view (as `views.flatten(0, 1)` orders them): the sample's boxes as the view shows
    them at `size` pixels (`views.view_boxes`, derived from the view's parameters, never
    stored), with their labels; crowd boxes are left out of training, as torchvision's
    references do."""
    targets = []
    for index, rows in zip(indices.tolist(), params):
        truth = source.targets(index)
        for row in rows.tolist():
            boxes, kept = view_boxes(ViewParams(*(int(value) for value in row[:5]), *row[5:8]), truth["boxes"], size,
                                     recipe.detection["min_visible"])
            labels = truth["labels"][kept]
            solid = ~truth["crowd"][kept]
            targets.append({"boxes": torch.from_numpy(boxes[solid]), "labels": torch.from_numpy(labels[solid])})
    return targets


class ReplayBatches(ViewBatches):
    """ViewBatches with each cached teacher's logits for the batch's views attached, by
    teacher name, as `batch["teacher_logits"][name]` of shape (samples, V, classes) (none
    for an archive of features alone), and the feature outputs `features[name]` of each
    teacher by module as `batch["teacher_features"][name][module]`, (samples, V, *the
    feature's decoded shape).

    Before a slab is used, the archive's sample indices and view parameters at those
    positions must equal those of the views just rendered: a mismatch means the recipe,
    the data or kdpipe's view code changed since the archive was made. Archives are
    opened in the process that loads the batch, so each DataLoader worker has its own
    store connections (never one inherited over fork).
    """

    def __init__(self, views: ViewDataset, archives: dict[str, str], storage_options: dict, local_cache: str | None,
                 features: dict[str, tuple[str, ...]] | None = None):
        super().__init__(views)
        self.archives, self.storage_options, self.local_cache = archives, storage_options, local_cache
        self.features = features or {}  # the feature outputs to attach: modules by teacher name
        self._readers: tuple[int, dict[str, ArchiveReader]] | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_readers": None}  # a worker opens its own

    def readers(self) -> dict[str, ArchiveReader]:
        if self._readers is None or self._readers[0] != os.getpid():
            opened = {name: ArchiveReader(url, self.storage_options, self.local_cache) for name, url in self.archives.items()}
            for name, reader in opened.items():
                reader.read_only_features(self.features.get(name, ()))
            self._readers = (os.getpid(), opened)
        return self._readers[1]

    def __getitem__(self, items: list[int]) -> dict:
        batch = super().__getitem__(items)
        epoch, positions = int(batch["epoch"][0]), batch["position"]
        first, last = int(positions[0]), int(positions[-1])
        batch["teacher_logits"], batch["teacher_features"] = {}, {}
        for name, reader in self.readers().items():
            archive = self.archives[name]
            fields = reader.read_fields(epoch, first, last + 1)
            logits, params, indices = reader.codec.decode(fields), fields["view_params"], fields["sample_index"]
            if not np.array_equal(indices, batch["index"].numpy()):
                raise ArchiveMismatchError(f"archive {archive} holds other samples at epoch {epoch}, positions {first}-{last}")
            if not np.array_equal(params, batch["params"].numpy()):
                raise ArchiveMismatchError(
                    f"archive {archive} recorded other view parameters at epoch {epoch}, positions {first}-{last}: "
                    "the recipe, the data or kdpipe's view code changed since it was cached"
                )
            self._check_content(reader, batch, archive)
            if logits is not None:
                batch["teacher_logits"][name] = torch.from_numpy(logits)
            batch["teacher_features"][name] = {module: torch.from_numpy(reader.decode_feature(module, fields))
                                               for module in self.features.get(name, ())}
        return batch

    def _check_content(self, reader: ArchiveReader, batch: dict, archive: str) -> None:
        """The bytes each view was decoded from (its sample's and its mixing partner's)
        must be those the teacher's views were decoded from: equal names and sizes do not
        make equal images (a swapped or regenerated file keeps both)."""
        recorded = reader.content_digests()
        if recorded is None:  # an archive made before kdpipe recorded content
            return
        samples = torch.cat([batch["index"], batch["partner"]]).numpy()
        decoded = torch.cat([batch["content"], batch["partner_content"]]).numpy()
        changed = sorted({int(i) for i in samples[(recorded[samples] != decoded).any(1)]})
        if changed:
            source = self.views.source
            names = ", ".join(source.name(i) for i in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise ArchiveMismatchError(
                f"{names} changed since archive {archive} was cached (the teacher saw other bytes); "
                "restore the files, or cache the archive again"
            )


def resolve_recipe(spec: TrainSpec, recipe_options: dict, reader: ArchiveReader | None) -> ViewRecipe:
    """The view recipe to train with: the archive's in cached mode (explicit options must
    agree with it), otherwise the defaults with one view epoch per training epoch, at the
    input size and interpolation of the model that sees the views first (the teacher
    online, else the student)."""
    if reader is not None:
        cached = reader.manifest.recipe
        # through ViewRecipe, so an option given at its default (--random-erase 0) reads as the archive's JSON does
        given = ViewRecipe.from_dict(cached.to_dict() | recipe_options)
        check_archive_matches(reader.manifest, spec.cache, recipe=given.to_dict())
        return cached
    return ViewRecipe.from_dict({"epochs": spec.epochs} | view_defaults(spec.teacher or spec.student) | recipe_options)


def open_archives(spec: TrainSpec) -> tuple[dict[str, str], dict[str, ArchiveReader]]:
    """Cached mode: where each teacher's archive is, and a reader of each (their manifests
    are checked on opening). Empty in the other modes."""
    if spec.mode != "cached":
        return {}, {}
    archives = {name: teacher_archive(spec.cache, name) for name in spec.teachers or (MAIN_TEACHER,)}
    readers = {name: ArchiveReader(url, spec.storage_options, spec.local_cache) for name, url in archives.items()}
    missing = [name for name, _ in spec.schedule or () if name not in readers]
    if missing:
        raise ConfigError(f"--schedule names teacher {missing[0]!r}: add it to --teachers")
    return archives, readers


def check_archives(spec: TrainSpec, source: Source, recipe: ViewRecipe,
                   readers: dict[str, ArchiveReader]) -> tuple[int, dict[str, list[int] | None], list[str] | None]:
    """Check that every teacher's archive fits this run; returns the number of outputs
    the student must have, for each teacher that knows only some of them their columns,
    and the names of the student's outputs (None where nothing names them)."""
    fingerprint = source.describe()["fingerprint"]
    for name, reader in readers.items():
        if reader.manifest.teacher.outputs == "features":
            raise ArchiveMismatchError(f"archive {teacher_archive(spec.cache, name)} holds a detector's neck features "
                                       "for detection views; a classifier student needs an archive of a classifier's "
                                       "logits (train a detector from it with --data coco:...)")
        check_archive_matches(reader.manifest, teacher_archive(spec.cache, name), dataset__fingerprint=fingerprint,
                              recipe=recipe.to_dict())
    if spec.epochs > recipe.epochs and not spec.cycle_epochs:
        raise ArchiveMismatchError(
            f"archive {spec.cache} holds {recipe.epochs} epochs of views but --epochs is {spec.epochs}; "
            "cache more epochs, or pass --cycle-epochs to replay them in a cycle"
        )
    if spec.teacher is not None:  # the caller named a teacher: it must be the archive's
        if len(readers) > 1:
            raise ConfigError("--teacher checks the teacher of a one-teacher run; drop it with --teachers")
        named = Teacher(with_num_classes(spec.teacher, source.classes, "teacher"), recipe.size, torch.device("cpu"))
        manifest = next(iter(readers.values())).manifest
        check_archive_matches(manifest, spec.cache, teacher__fingerprint=named.fingerprint_for(manifest.teacher))
    embeddings = [name for name, reader in readers.items() if reader.manifest.teacher.outputs == "embeddings"]
    if embeddings and (spec.loss != "seed" or len(readers) > 1):
        raise ConfigError(f"{teacher_archive(spec.cache, embeddings[0])} holds teacher embeddings, not logits: "
                          "distil them alone with --loss seed")
    unchecked = [name for name, reader in readers.items() if reader.manifest.dataset.content is None]
    if unchecked:
        say(f"warning: {teacher_archive(spec.cache, unchecked[0])} records no image contents (made by an older "
            "kdpipe): a changed image with an unchanged name and size would go unnoticed")
    if spec.loss == "seed" and not embeddings:
        raise ConfigError("--loss seed distils embeddings: cache them with cache-teacher --embedding-layer")
    _check_cached_features(spec, readers)
    if embeddings:
        return readers[embeddings[0]].manifest.layout.num_classes, {}, None
    return _class_union(spec, source, readers)


def _check_cached_features(spec: TrainSpec, readers: dict[str, ArchiveReader]) -> None:
    """Every --feature's teacher module must be a feature output of the main teacher's archive."""
    if not spec.features:
        return
    if MAIN_TEACHER not in readers:
        raise ConfigError("--feature distils the feature outputs of the archive's main teacher: add main to --teachers")
    cached = readers[MAIN_TEACHER].features
    teacher = readers[MAIN_TEACHER].manifest.teacher
    timm_index = teacher.spec.get("name", "").startswith("timm:")  # --outputs resolved such a number to a module
    for feature in spec.features:
        module = feature.teacher_module
        if module not in cached:
            held = f"it holds {', '.join(cached)}" if cached else "it holds none"
            advice = ("name the module as the archive records it (--outputs resolved the timm feature_info index)"
                      if module.isdigit() and timm_index and cached else
                      f"cache it with cache-teacher --outputs {teacher.outputs},{module}")
            raise ConfigError(f"--feature {feature.name}: archive {spec.cache} holds no feature output of the teacher's "
                              f"module {module!r} ({held}); {advice}")


def cached_feature_shapes(spec: TrainSpec, readers: dict[str, ArchiveReader]) -> dict[str, tuple[int, ...]]:
    """The per-view shape of each feature output --feature reads from the archive, by module."""
    if spec.mode != "cached":
        return {}
    cached = readers[MAIN_TEACHER].features if MAIN_TEACHER in readers else {}
    return {feature.teacher_module: cached[feature.teacher_module].decoded_shape for feature in spec.features}


def _class_union(spec: TrainSpec, source: Source, readers: dict[str, ArchiveReader]
                 ) -> tuple[int, dict[str, list[int] | None], list[str] | None]:
    """The student's class count, each teacher's columns among them, and their names.
    Teachers over the same classes need no columns; otherwise the student learns the
    union: the data's class folders when it has them, else the teachers' classes sorted
    by name (as class folders are, so a labelled validation folder scores them alike)."""
    known = {name: r.manifest.teacher.classes or source.classes for name, r in readers.items()}
    known = {name: list(classes) if classes is not None else None for name, classes in known.items()}
    counts = {name: r.manifest.layout.num_classes for name, r in readers.items()}
    if len({json.dumps(classes) for classes in known.values()}) == 1 and len(set(counts.values())) == 1:
        return next(iter(counts.values())), {}, next(iter(known.values()))
    if any(classes is None for classes in known.values()):
        raise ArchiveMismatchError(
            f"the teachers of {spec.cache} give {', '.join(map(str, counts.values()))} logits and record no class "
            "names; cache them with --teacher-classes to train on the union of their classes"
        )
    if spec.loss == "dkd":
        raise ConfigError("--loss dkd needs every teacher to know every class; these teachers know different classes")
    union = list(source.classes or sorted({c for classes in known.values() for c in classes}))
    return len(union), {name: [union.index(c) for c in classes] for name, classes in known.items()}, union
