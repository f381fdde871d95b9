"""The archive manifest: what an archive holds, written last, checked on every read.

An archive without `manifest.json` is unfinished. `plan.json` holds the manifest-to-be
of an unfinished archive (`Manifest.plan`), so a re-run can tell whether it is
completing the same job.

`Manifest` and its parts are frozen dataclasses with `to_dict` / `from_dict`:
`to_dict` gives back exactly the JSON kdpipe writes, and `from_dict` is where every
check lives (types, and fields that must agree with each other), each refused with a
message that names the field. docs/format.md is the full specification.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..config import MAIN_TEACHER, Preprocessing, ViewRecipe, first_difference, fingerprint, sha256_hex
from ..errors import ArchiveError, ArchiveMismatchError, ConfigError
from ..views import view_param_fields
from .backends import BACKENDS, check_backend_name, make_backend
from .codecs import Codec, Int8Codec, NoLogitsCodec, TopKCodec, codec_from_dict
from .feature_codecs import FeatureCodec
from .layout import Layout, ManifestError, parse_int, parse_object, parse_str_list, parse_typed
from .location import Location

ARCHIVE_FORMAT = "kdpipe-archive"
SCHEMA_VERSION = 3  # the newest kdpipe writes (for an archive with feature outputs); it reads every version from 1 up
LOGITS_SCHEMA_VERSION = 2  # what kdpipe writes for an archive of logits or embeddings alone
MANIFEST = "manifest.json"
PLAN = "plan.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the stored bytes."""
    import numcodecs
    import numpy
    import torch
    import torchvision
    import zarr

    from .. import __version__

    return {
        "kdpipe": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": numpy.__version__,
    }


# Manifest fields that only a finished archive has, and fields that record where things
# were found rather than what they are: neither decides whether two runs are the same job.
MANIFEST_ONLY = ("shards", "files", "total_bytes", "manifest_fingerprint")
SEAL = "manifest_fingerprint"
INFORMATIONAL = (("dataset", "location"), ("teacher", "spec", "weights"))


OUTPUTS = ("logits", "embeddings", "features")  # what a teacher archive holds per view ("features": those alone)
PLAN_KEYS = ("format", "schema_version", "backend", "recipe", "teacher", "dataset", "codec", "layout", "libraries")
FEATURES = "features"  # schema 3 on: the teacher's named intermediate outputs, each with its own codec
SHA256 = re.compile(r"[0-9a-f]{64}")


def seal(manifest: dict) -> dict:
    """The manifest with its own fingerprint (over every other field) added, so an edit
    by hand or a damaged copy is caught when it is read."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return body | {SEAL: fingerprint(body)}


def job_identity(plan: dict) -> dict:
    """The part of a plan or manifest that defines the job: two runs with equal identities
    write identical archives."""
    identity = json.loads(json.dumps({k: v for k, v in plan.items() if k not in MANIFEST_ONLY}))
    for *parents, leaf in INFORMATIONAL:
        node = identity
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return identity


def json_bytes(obj: Any) -> bytes:
    """The stored form of a JSON document: indented, keys sorted, newline-terminated."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _parse_json(data: bytes, location: Location, key: str, what: str) -> dict:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ArchiveError(f"the {what} {location}/{key} is not valid JSON ({exc}); fetch a fresh copy") from None


def read_json(location: Location, key: str, what: str) -> dict:
    return _parse_json(location.read(key), location, key, what)


@dataclass(frozen=True)
class TeacherInfo:
    """The manifest's `teacher`: the model as given (`spec`, a ModelSpec's dict), the hash
    of its weights and preprocessing, what it outputs per view, its name in the archive,
    its classes and the preprocessing it was run with (normalisation and the input its
    weights were made for)."""

    spec: dict
    fingerprint: str
    num_classes: int
    outputs: str = "logits"
    embedding_layer: str | None = None  # embeddings only: the module whose output is stored ("" = penultimate)
    name: str = MAIN_TEACHER
    classes: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None  # None in archives made before kdpipe recorded it

    def to_dict(self) -> dict[str, Any]:
        data = {"spec": self.spec, "fingerprint": self.fingerprint, "num_classes": self.num_classes,
                "outputs": self.outputs}
        if self.outputs == "embeddings":
            data["embedding_layer"] = self.embedding_layer
        if self.preprocessing is not None:
            data["preprocessing"] = self.preprocessing.to_dict()
        return data | {"name": self.name, "classes": None if self.classes is None else list(self.classes)}

    @classmethod
    def from_dict(cls, data: Any, dataset_classes: tuple[str, ...] | None = None) -> TeacherInfo:
        """Archives written before teachers had names, outputs, classes or preprocessing
        lack them: they read as "main", "logits", the dataset's classes and None."""
        data = parse_object(data, "teacher", ("spec", "fingerprint", "num_classes"),
                            optional=("outputs", "embedding_layer", "name", "classes", "preprocessing"))
        parse_typed(data["spec"], "teacher.spec", dict)
        outputs = data.get("outputs", "logits")
        if outputs not in OUTPUTS:
            raise ManifestError(f"teacher.outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        layer = data.get("embedding_layer")
        if (outputs == "embeddings") != ("embedding_layer" in data):
            raise ManifestError("teacher.embedding_layer must be given exactly when teacher.outputs is 'embeddings'")
        classes = parse_str_list(data["classes"], "teacher.classes", allow_none=True) if "classes" in data else dataset_classes
        teacher = cls(spec=data["spec"], fingerprint=parse_typed(data["fingerprint"], "teacher.fingerprint", str),
                      num_classes=parse_int(data["num_classes"], "teacher.num_classes", minimum=1), outputs=outputs,
                      embedding_layer=None if layer is None else parse_typed(layer, "teacher.embedding_layer", str),
                      name=parse_typed(data.get("name", MAIN_TEACHER), "teacher.name", str), classes=classes,
                      preprocessing=_parse_preprocessing(data["preprocessing"]) if "preprocessing" in data else None)
        if teacher.classes is not None and len(teacher.classes) != teacher.num_classes:
            raise ManifestError(f"teacher.classes names {len(teacher.classes)} classes but teacher.num_classes is "
                                f"{teacher.num_classes}")
        return teacher


CONTENT_DIGESTS = "dataset/content.sha256"  # the sha256 of every sample's bytes, N x 32 bytes in index order


def content_fingerprint(digests: np.ndarray) -> str:
    """`dataset.content`: the fingerprint of the per-sample digests (the object's bytes)."""
    return "sha256:" + sha256_hex(np.ascontiguousarray(digests, dtype=np.uint8).tobytes())


@dataclass(frozen=True)
class DatasetInfo:
    """The manifest's `dataset`: its fingerprint (keys, file sizes, labels), size, class
    names (None when unlabelled), where it was read (informational) and `content`, the
    fingerprint of the sha256 of every sample's bytes (stored whole in CONTENT_DIGESTS),
    so a replay can check each image it decodes is the one the teacher saw. Archives
    made before kdpipe recorded content have no `content`."""

    fingerprint: str
    num_samples: int
    classes: tuple[str, ...] | None
    labelled: bool
    location: str
    content: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"fingerprint": self.fingerprint, "num_samples": self.num_samples,
                "classes": None if self.classes is None else list(self.classes), "labelled": self.labelled,
                "location": self.location}
        return data if self.content is None else data | {"content": self.content}

    @classmethod
    def from_dict(cls, data: Any) -> DatasetInfo:
        data = parse_object(data, "dataset", ("fingerprint", "num_samples", "classes", "labelled", "location"),
                            optional=("content",))
        if not isinstance(data["labelled"], bool):
            raise ManifestError(f"dataset.labelled must be true or false, got {data['labelled']!r}")
        content = data.get("content")
        if content is not None and not (isinstance(content, str) and content.startswith("sha256:")
                                        and SHA256.fullmatch(content[len("sha256:"):])):
            raise ManifestError(f"dataset.content must be 'sha256:' and 64 lowercase hex digits, got {content!r}")
        return cls(fingerprint=parse_typed(data["fingerprint"], "dataset.fingerprint", str),
                   num_samples=parse_int(data["num_samples"], "dataset.num_samples", minimum=1),
                   classes=parse_str_list(data["classes"], "dataset.classes", allow_none=True),
                   labelled=data["labelled"], location=parse_typed(data["location"], "dataset.location", str),
                   content=content)


@dataclass(frozen=True)
class FileEntry:
    """One object of a finished archive: its size and the sha256 of its bytes."""

    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def of(cls, data: bytes) -> FileEntry:
        return cls(len(data), sha256_hex(data))

    @classmethod
    def from_dict(cls, data: Any, key: str) -> FileEntry:
        data = parse_object(data, f"files[{key!r}]", ("bytes", "sha256"))
        sha = data["sha256"]
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise ManifestError(f"files[{key!r}].sha256 must be 64 lowercase hex digits, got {sha!r}")
        return cls(parse_int(data["bytes"], f"files[{key!r}].bytes"), sha)


@dataclass(frozen=True)
class ShardEntry:
    """One (epoch, shard) of a finished archive: its positions [start, stop) and the keys
    of its objects, sorted."""

    epoch: int
    shard: int
    start: int
    stop: int
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard": self.shard, "start": self.start, "stop": self.stop,
                "files": list(self.files)}

    @classmethod
    def from_dict(cls, data: Any, index: int) -> ShardEntry:
        where = f"shards[{index}]"
        data = parse_object(data, where, ("epoch", "shard", "start", "stop", "files"))
        numbers = {key: parse_int(data[key], f"{where}.{key}") for key in ("epoch", "shard", "start", "stop")}
        return cls(**numbers, files=parse_str_list(data["files"], f"{where}.files"))


@dataclass(frozen=True)
class Manifest:
    """What an archive holds. A plan (the manifest-to-be of an unfinished archive) has
    no `shards`, `files`, `total_bytes` or `manifest_fingerprint`; a finished archive's
    manifest has all four."""

    backend: str
    schema_version: int
    recipe: ViewRecipe
    teacher: TeacherInfo
    dataset: DatasetInfo
    codec: Codec
    layout: Layout
    libraries: dict
    shards: tuple[ShardEntry, ...] | None = None
    files: dict[str, FileEntry] | None = None
    total_bytes: int | None = None
    manifest_fingerprint: str | None = None
    features: tuple[FeatureCodec, ...] = ()

    @property
    def finished(self) -> bool:
        return self.manifest_fingerprint is not None

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every array stored per position, by name: (shape after positions, dtype). The
        logit codec's fields, each feature codec's and the view parameters."""
        views = self.layout.views_per_sample
        fields = self.codec.fields(views, self.layout.num_classes)
        for feature in self.features:
            fields |= feature.fields(views)
        return fields | {"view_params": ((views, len(self.layout.view_param_fields)), np.dtype(np.float32))}

    @property
    def projection_keys(self) -> tuple[str, ...]:
        """The archive's PCA projection objects, one per feature stored with `pca`."""
        return tuple(feature.projection_key for feature in self.features if feature.components is not None)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON form, exactly as kdpipe writes it (keys are sorted on writing)."""
        data = {
            "format": ARCHIVE_FORMAT,
            "schema_version": self.schema_version,
            "backend": self.backend,
            "recipe": self.recipe.to_dict(),
            "teacher": self.teacher.to_dict(),
            "dataset": self.dataset.to_dict(),
            "codec": self.codec.to_dict(),
            "layout": self.layout.to_dict(),
            "libraries": dict(self.libraries),
        }
        if self.features:
            data[FEATURES] = [feature.to_dict() for feature in self.features]
        if self.shards is not None:
            data["shards"] = [shard.to_dict() for shard in self.shards]
        if self.files is not None:
            data["files"] = {key: entry.to_dict() for key, entry in sorted(self.files.items())}
        if self.total_bytes is not None:
            data["total_bytes"] = self.total_bytes
        if self.manifest_fingerprint is not None:
            data[SEAL] = self.manifest_fingerprint
        return data

    @classmethod
    def plan(cls, backend: str, recipe: ViewRecipe, teacher: TeacherInfo, dataset: DatasetInfo, codec: Codec,
             positions_per_shard: int | None = None, schema_version: int | None = None,
             features: tuple[FeatureCodec, ...] = ()) -> Manifest:
        """The manifest-to-be of a new archive: everything but the shard list and checksums.
        The schema is the oldest that holds what is asked: 3 with `features`, else 2;
        `schema_version` 1 writes what kdpipe wrote before schema 2 (for tests and the
        benchmark that compares them); a top-k codec takes that schema's coding."""
        check_backend_name(backend)
        schema_version = schema_version or (SCHEMA_VERSION if features else LOGITS_SCHEMA_VERSION)
        if isinstance(codec, TopKCodec):
            codec = replace(codec, logprob_coding="absolute" if schema_version == 1 else "delta")
        views, classes, params = recipe.views_per_sample, teacher.num_classes, view_param_fields(recipe)
        outputs = classes + sum(int(np.prod(feature.shape)) for feature in features)  # float32 values computed per view
        layout = Layout.plan(recipe.epochs, dataset.num_samples, views, classes, params,
                             _bytes_per_position(codec, features, views, classes, len(params)), positions_per_shard,
                             buffer_bytes_per_position=views * outputs * 4)
        manifest = cls(backend=backend, schema_version=schema_version, recipe=recipe, teacher=teacher,
                       dataset=dataset, codec=codec, layout=layout, libraries=library_versions(), features=features)
        try:
            manifest._check_schema()
        except ManifestError as exc:
            raise ConfigError(str(exc)) from None
        return manifest

    @property
    def projected_bytes(self) -> int:
        """About how many bytes the archive stores, before compression: every position's
        fields in every epoch, its sample index (and, in schema 1, position index; 8 bytes
        each), and each sample's label and content digest (8 and 32 bytes)."""
        layout = self.layout
        indices = 2 if self.schema_version == 1 else 1
        per_position = _bytes_per_position(self.codec, self.features, layout.views_per_sample, layout.num_classes,
                                           len(layout.view_param_fields)) + indices * 8
        return layout.epochs * layout.num_samples * per_position + layout.num_samples * (8 + 32)

    def finish(self, shards: list[ShardEntry], files: dict[str, FileEntry]) -> Manifest:
        """The finished archive's manifest: this plan with its shards and objects, sealed."""
        done = replace(self, shards=tuple(shards), files=dict(sorted(files.items())),
                       total_bytes=sum(entry.bytes for entry in files.values()), manifest_fingerprint=None)
        return replace(done, manifest_fingerprint=seal(done.to_dict())[SEAL])

    @classmethod
    def from_dict(cls, data: Any, finished: bool = True) -> Manifest:
        """A manifest (or, with `finished` False, a plan) from its JSON form, refusing any
        field of the wrong type and any two fields that contradict each other."""
        keys = PLAN_KEYS + (MANIFEST_ONLY if finished else ())
        data = parse_object(data, "manifest", keys, optional=(FEATURES,))
        if data["format"] != ARCHIVE_FORMAT:
            raise ManifestError(f"format must be {ARCHIVE_FORMAT!r}, got {data['format']!r}")
        version = parse_schema_version(data["schema_version"])
        backend = data["backend"]
        if backend not in BACKENDS:
            raise ManifestError(f"backend {backend!r} is unknown to this kdpipe (it reads {', '.join(BACKENDS)}); "
                                "upgrade kdpipe")
        layout = Layout.from_dict(data["layout"])
        dataset = DatasetInfo.from_dict(data["dataset"])
        manifest = cls(
            backend=backend, schema_version=version, recipe=_parse_recipe(data["recipe"]),
            teacher=TeacherInfo.from_dict(data["teacher"], dataset.classes), dataset=dataset,
            codec=codec_from_dict(data["codec"], layout.num_classes), layout=layout,
            libraries=_parse_libraries(data["libraries"]),
            features=_parse_features(data.get(FEATURES), version),
        )
        manifest._check_parts()
        if not finished:
            return manifest
        files, shards = parse_typed(data["files"], "files", dict), parse_typed(data["shards"], "shards", list)
        manifest = replace(
            manifest,
            shards=tuple(ShardEntry.from_dict(entry, i) for i, entry in enumerate(shards)),
            files={key: FileEntry.from_dict(entry, key) for key, entry in files.items()},
            total_bytes=parse_int(data["total_bytes"], "total_bytes"),
            manifest_fingerprint=parse_typed(data[SEAL], SEAL, str),
        )
        manifest._check_shards()
        return manifest

    def _check_parts(self) -> None:
        """The sections agree: the layout is the recipe's and the teacher's, the dataset's
        size is the layout's, and an archive of embeddings is dense."""
        layout, recipe = self.layout, self.recipe
        agree = [
            ("layout.epochs", layout.epochs, "recipe.epochs", recipe.epochs),
            ("layout.views_per_sample", layout.views_per_sample, "recipe.views_per_sample", recipe.views_per_sample),
            ("layout.num_samples", layout.num_samples, "dataset.num_samples", self.dataset.num_samples),
            ("layout.num_classes", layout.num_classes, "teacher.num_classes", self.teacher.num_classes),
        ]
        for field, value, other, expected in agree:
            if value != expected:
                raise ManifestError(f"{field} {value} contradicts {other} {expected}")
        if layout.view_param_fields != view_param_fields(recipe):
            raise ManifestError(f"layout.view_param_fields {list(layout.view_param_fields)} are not those of the "
                                f"recipe {list(view_param_fields(recipe))} (recipe.mixup {recipe.mixup}, "
                                f"randaugment {recipe.randaugment}, random_erase {recipe.random_erase})")
        if self.teacher.outputs == "embeddings" and isinstance(self.codec, TopKCodec):
            raise ManifestError(f"codec.name {self.codec.name!r} contradicts teacher.outputs 'embeddings' "
                                "(embeddings are stored dense)")
        if (self.teacher.outputs == "features") != isinstance(self.codec, NoLogitsCodec):
            raise ManifestError(f"codec.name {self.codec.name!r} contradicts teacher.outputs {self.teacher.outputs!r} "
                                "(codec 'none' is exactly the codec of an archive of features alone)")
        if self.teacher.outputs == "features" and not self.features:
            raise ManifestError("teacher.outputs 'features' needs a non-empty features list")
        self._check_schema()

    def _check_schema(self) -> None:
        """Feature outputs need schema 3; a schema-1 archive has neither dense-int8 nor
        delta-coded log-probabilities; a later one codes top-k log-probabilities as deltas."""
        codec, version = self.codec, self.schema_version
        if self.features and version < 3:
            raise ManifestError(f"features needs schema_version 3 or later, not {version}")
        if version == 1 and isinstance(codec, Int8Codec):
            raise ManifestError(f"codec.name {codec.name!r} needs schema_version 2 or later, not 1")
        if isinstance(codec, TopKCodec) and (codec.logprob_coding == "delta") != (version > 1):
            raise ManifestError(f"codec.logprob_coding is given exactly from schema_version 2 on, "
                                f"and this manifest has schema_version {version}")

    def _check_shards(self) -> None:
        """`shards` lists every (epoch, shard) of the layout in order with its positions and
        the backend's objects, each of them in `files`, whose sizes add up to `total_bytes`."""
        units = list(self.layout.units())
        if len(self.shards) != len(units):
            raise ManifestError(f"shards lists {len(self.shards)} shards but the layout has {len(units)} "
                                f"({self.layout.epochs} epochs of {self.layout.shards_per_epoch})")
        backend = make_backend(self.backend, self.layout, self.fields(), self.schema_version)
        for i, (entry, (epoch, shard, start, stop)) in enumerate(zip(self.shards, units)):
            if (entry.epoch, entry.shard, entry.start, entry.stop) != (epoch, shard, start, stop):
                raise ManifestError(
                    f"shards[{i}] is epoch {entry.epoch}, shard {entry.shard}, positions {entry.start}-{entry.stop}; "
                    f"the layout puts epoch {epoch}, shard {shard}, positions {start}-{stop} there"
                )
            expected = tuple(sorted(backend.shard_files(epoch, shard)))
            if entry.files != expected:
                raise ManifestError(f"shards[{i}].files {list(entry.files)} are not the {self.backend} objects of "
                                    f"epoch {epoch}, shard {shard} {list(expected)}")
            unlisted = [key for key in entry.files if key not in self.files]
            if unlisted:
                raise ManifestError(f"shards[{i}].files names {unlisted[0]}, which files does not list")
        unlisted = [key for key in self.projection_keys if key not in self.files]
        if unlisted:
            raise ManifestError(f"files does not list {unlisted[0]}, the projection of a pca feature")
        content = self.files.get(CONTENT_DIGESTS)
        if (self.dataset.content is None) != (content is None):
            raise ManifestError(f"files lists {CONTENT_DIGESTS} exactly when dataset.content is given")
        if content is not None and content.bytes != 32 * self.dataset.num_samples:
            raise ManifestError(f"files[{CONTENT_DIGESTS!r}].bytes {content.bytes} is not 32 per sample "
                                f"({32 * self.dataset.num_samples})")
        total = sum(entry.bytes for entry in self.files.values())
        if self.total_bytes != total:
            raise ManifestError(f"total_bytes {self.total_bytes} is not the sum of the files' bytes ({total})")


def _bytes_per_position(codec: Codec, features: tuple[FeatureCodec, ...], views: int, classes: int, params: int) -> int:
    """The stored bytes of one position before compression: its views' codec fields,
    feature fields and view parameters."""
    fields = codec.fields(views, classes) | {"view_params": ((views, params), np.dtype(np.float32))}
    for feature in features:
        fields |= feature.fields(views)
    return sum(int(np.prod(tail)) * dtype.itemsize for tail, dtype in fields.values())


def _parse_features(data: Any, version: int) -> tuple[FeatureCodec, ...]:
    """`features` (None when absent): a non-empty list of feature outputs, from schema 3
    on, each module once."""
    if data is None:
        return ()
    features = tuple(FeatureCodec.from_dict(entry, i) for i, entry in enumerate(parse_typed(data, FEATURES, list)))
    if not features:
        raise ManifestError(f"{FEATURES} must list at least one feature output when given")
    modules = [feature.module for feature in features]
    if len(set(modules)) != len(modules):
        raise ManifestError(f"features lists module {next(m for m in modules if modules.count(m) > 1)!r} twice")
    return features


def parse_schema_version(data: Any) -> int:
    """An integer of at least 1 (a bool, a string or a float is the wrong type, not an old version)."""
    return parse_int(data, "schema_version", minimum=1)


def _parse_recipe(data: Any) -> ViewRecipe:
    if not isinstance(data, dict):
        raise ManifestError(f"recipe must be an object, got {data!r}")
    try:
        return ViewRecipe.from_dict(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ManifestError(f"recipe is not a valid view recipe: {exc}") from None


def _parse_preprocessing(data: Any) -> Preprocessing:
    parse_object(data, "teacher.preprocessing", ("mean", "std", "interpolation", "crop_pct", "input_size"))
    try:
        return Preprocessing.from_dict(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ManifestError(f"teacher.preprocessing is not valid: {exc}") from None


def _parse_libraries(data: Any) -> dict:
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ManifestError(f"libraries must map library names to version strings, got {data!r}")
    return data


def read_manifest(location: Location | str | os.PathLike, storage_options: dict | None = None) -> Manifest:
    """The manifest of a finished archive; a clear error for anything else."""
    if not isinstance(location, Location):
        location = Location(location, storage_options)
    data = location.read_if_present(MANIFEST)
    if data is None:
        if location.read_if_present(PLAN) is not None:
            raise ArchiveError(
                f"archive {location} is unfinished (no {MANIFEST}); re-run the cache-teacher command that made it to complete it"
            )
        if not location.exists():
            raise ArchiveError(f"archive {location} does not exist")
        raise ArchiveError(f"{location} is not a kdpipe archive (no {MANIFEST})")
    manifest = _parse_json(data, location, MANIFEST, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"{location}/{MANIFEST} is not a kdpipe archive manifest")
    try:
        version = parse_schema_version(manifest.get("schema_version"))
    except ManifestError as exc:
        raise ArchiveError(f"the manifest of archive {location}: {exc}") from None
    if version > SCHEMA_VERSION:
        raise ArchiveError(
            f"archive {location} has schema version {version}; this kdpipe reads up to {SCHEMA_VERSION}: upgrade kdpipe"
        )
    if SEAL not in manifest:
        raise ArchiveError(
            f"the manifest of archive {location} has no {SEAL} (written by a pre-release kdpipe, or edited); "
            "re-create the archive with cache-teacher --overwrite"
        )
    if seal(manifest)[SEAL] != manifest[SEAL]:
        raise ArchiveError(
            f"the manifest of archive {location} was changed after it was written (its {SEAL} does not match); "
            "fetch a fresh copy"
        )
    return parse_manifest(manifest, location)


def parse_manifest(data: Any, location: Location | str, finished: bool = True) -> Manifest:
    """`Manifest.from_dict`, with the archive named in its error."""
    try:
        return Manifest.from_dict(data, finished=finished)
    except ManifestError as exc:
        what = "manifest" if finished else "plan"
        raise ArchiveError(f"the {what} of archive {location}: {exc}") from None


def read_plan(location: Location) -> Manifest:
    """The plan of an unfinished archive."""
    return parse_manifest(read_json(location, PLAN, "plan"), location, finished=False)


def check_archive_matches(manifest: Manifest | dict, location: str, **expected: Any) -> None:
    """Refuse an archive whose fields differ from what the caller expects, naming the field.

    Keyword names are manifest sections with `__` for dots, e.g.
    `dataset__fingerprint=...`, `recipe={...}`, `teacher__fingerprint=...`; they are
    compared with the manifest's JSON form.
    """
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    for key, want in expected.items():
        path = key.split("__")
        have: Any = manifest
        for part in path:
            have = have.get(part) if isinstance(have, dict) else None
        where = first_difference(want, have, ".".join(path))
        if where is not None:
            raise ArchiveMismatchError(
                f"archive {location} does not match: {where} is {_short(_at(have, where, path))} in the archive "
                f"but {_short(_at(want, where, path))} here"
            )


def _at(value: Any, where: str, path: list[str]) -> Any:
    """The value at dotted `where` inside `value`, which sits at `path`."""
    rest = where[len(".".join(path)):].lstrip(".")
    for part in filter(None, rest.replace("[", ".").replace("]", "").split(".")):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return value
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
