"""The archive writer and reader, shared by every backend (zarr, webdataset) and store.

An archive is a set of objects below a `Location`:

    plan.json            the manifest-to-be, while the archive is unfinished
    commits/static.json  checksums of the backend's static files, once written
    commits/E.S.json     checksums of shard S of epoch E, once its objects are written
    <backend objects>    zarr arrays, or tar shards
    manifest.json        written last: an archive without it is unfinished

A unit of work is one (epoch, shard): its objects are written whole (atomically), then
its commit marker. An epoch's own objects (zarr's index chunks) belong to its first
shard's unit, so nothing grows with the epochs before the teacher has run. A re-run skips committed units, so an interrupted job completes to
the same bytes. `finish` checks every object is present with its committed size,
writes the manifest with a sha256 per object, and removes the markers and the plan.

The reader verifies every object against the manifest's sha256 before first use (the
small ones on opening, each shard when a read first touches it): nothing is ever
trained on damaged bytes. With a local cache, verified objects are kept on disk by
content hash, so a remote archive is downloaded once per machine.

kdpipe never deletes what it did not write: `--overwrite` replaces only what a kdpipe
manifest or plan proves is an archive, and only the objects such an archive consists
of (`survey`); a location that holds anything else is refused before it is touched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..config import MAIN_TEACHER, first_difference, sha256_hex
from ..errors import ArchiveError, KdpipeError
from ..views import epoch_order
from .backends import make_backend
from .feature_codecs import projection_bytes, read_projection
from .layout import ManifestError
from .lease import LEASE, WriterLease, parse_lease, remove_dead_lease
from .location import Location, short_reason, temporary_target, write_local_atomic
from .manifest import (CONTENT_DIGESTS, MANIFEST, MANIFEST_ONLY, PLAN, PLAN_KEYS, FileEntry, Manifest, ShardEntry,
                       content_fingerprint, job_identity, json_bytes, read_json, read_manifest, read_plan)

COMMITS = "commits"
STATIC_MARKER = f"{COMMITS}/static.json"
TEACHERS = "teachers"  # further teachers of a finished archive, each a complete archive of its own
COMMIT_MARKER = re.compile(rf"{COMMITS}/(static|\d+\.\d+)\.json")


def file_entry(data: bytes) -> dict:
    """The manifest entry of an object: its size and sha256."""
    return FileEntry.of(data).to_dict()


@dataclass(frozen=True)
class Survey:
    """What a location holds: the objects of the kdpipe archive there, in the order to
    delete them (the manifests and plans that prove it is one come last, so an interrupted
    deletion can be resumed), and everything else, which kdpipe must never touch."""

    archive: Manifest | None  # the archive's manifest, else its plan; None when neither is there
    owned: tuple[str, ...]
    foreign: tuple[str, ...]
    owned_bytes: int


def survey(location: Location, sizes: dict[str, int]) -> Survey:
    """Sort the objects `sizes` lists (a listing of `location`) into those of the kdpipe
    archive there and the rest. An archive is proven only by a manifest or plan that
    parses as kdpipe's own; then its objects are those of its layout and backend (never
    merely what a manifest lists), its commit markers, the lease, the temporary files of
    kdpipe's atomic writes of those names, and the added teachers below `teachers/`, each
    an archive proven the same way. Without a manifest or plan, only a lease and the
    temporary files of a manifest, plan or lease (a run killed while starting) are kdpipe's.
    A manifest.json or plan.json that is not kdpipe's is refused, saying so."""
    manifest = _own_document(location, MANIFEST, finished=True) if MANIFEST in sizes else None
    plan = _own_document(location, PLAN, finished=False) if PLAN in sizes else None
    archive = manifest or plan
    backend = (make_backend(archive.backend, archive.layout, archive.fields(), archive.schema_version)
               if archive is not None else None)

    def named_like_ours(key: str) -> bool:
        if key in (MANIFEST, PLAN, LEASE):
            return True
        return archive is not None and (
            COMMIT_MARKER.fullmatch(key) is not None or backend.owns(key) or key in archive.projection_keys
            or (key == CONTENT_DIGESTS and archive.dataset.content is not None)
        )

    owned, foreign, teachers = [], [], {}
    for key, size in sizes.items():
        if archive is not None and key.startswith(f"{TEACHERS}/") and key.count("/") >= 2:
            _, name, rest = key.split("/", 2)
            teachers.setdefault(name, {})[rest] = size
        elif key == LEASE:  # a lease, or an empty one a writer killed while creating it left
            ours = size == 0 or parse_lease(location.read_if_present(LEASE)) is not None
            (owned if ours else foreign).append(key)
        else:
            target = temporary_target(key)
            (owned if named_like_ours(key if target is None else target) else foreign).append(key)
    for name, inner_sizes in sorted(teachers.items()):
        inner = survey(location.below(f"{TEACHERS}/{name}"), inner_sizes)
        owned += [f"{TEACHERS}/{name}/{key}" for key in inner.owned]
        foreign += [f"{TEACHERS}/{name}/{key}" for key in inner.foreign]
    owned.sort(key=_deletion_order)
    return Survey(archive, tuple(owned), tuple(sorted(foreign)), sum(sizes.get(key, 0) for key in owned))


def _deletion_order(key: str) -> tuple:
    """Objects first, then the proofs that they are an archive's: the deepest first (an
    added teacher's before the archive's own), a plan before a manifest."""
    name = key.rsplit("/", 1)[-1]
    return (name in (PLAN, MANIFEST), -key.count("/"), name == MANIFEST, key)


def _own_document(location: Location, key: str, finished: bool) -> Manifest:
    """The manifest (or plan) `key` at `location`, when it is one this kdpipe can read; an
    error saying why not, and never advising --overwrite: what kdpipe cannot read, it
    cannot prove to be an archive, so it never replaces it."""
    data, document = location.read(key), None
    try:
        document = json.loads(data)
        return Manifest.from_dict(document, finished=finished)
    except (ValueError, TypeError, KeyError, AttributeError, ManifestError) as exc:
        reason = short_reason(exc)
    if isinstance(document, dict) and document and set(document) <= set(PLAN_KEYS + MANIFEST_ONLY):
        what = "an unfinished archive of a different job" if key == PLAN else "a kdpipe archive"
        raise ArchiveError(f"{location} holds {what} whose {key} this kdpipe cannot read ({reason}); kdpipe "
                           "replaces only archives it can read: move it away, or choose another --out")
    what = "manifest" if finished else "plan"
    raise ArchiveError(f"{location} is not a kdpipe archive: its {key} is not a kdpipe {what} ({reason}); "
                       "kdpipe replaces only its own archives, so choose another --out")


def _size(count: int) -> str:
    """A byte count for people: 1.5 GB."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


class ArchiveWriter:
    """Creates an archive, or resumes an unfinished one with the same plan. Holds the
    archive's writer lease from creation until `finish` (or `release`).

    Under torch.distributed, rank 0 creates the writer that holds the lease; the other
    ranks join it (`lead=False`) once it exists, and only write their shards: they
    neither take the lease nor write the plan, the static objects or the manifest.
    """

    def __init__(self, location: Location, plan: Manifest, labels: np.ndarray, overwrite: bool = False,
                 lead: bool = True, content_digests: np.ndarray | None = None,
                 fit_projections: Callable[[], dict[str, np.ndarray]] | None = None):
        """`fit_projections` gives the PCA projection of each feature stored with `pca`, by
        module; it is called only when the archive's static objects are first written (a
        resumed archive keeps the projections it was begun with: `projections`)."""
        self.location = location
        self.plan = plan
        self.content_digests = content_digests  # (N, 32) uint8, stored when the plan records dataset.content
        if (plan.dataset.content is None) != (content_digests is None) or (
                content_digests is not None and content_fingerprint(content_digests) != plan.dataset.content):
            raise ArchiveError("internal: the content digests given are not those the plan records")
        self.layout = plan.layout
        self.codec = plan.codec
        self.backend = make_backend(plan.backend, plan.layout, plan.fields(), plan.schema_version)
        self.shards_per_epoch = plan.layout.shards_per_epoch
        self.projections: dict[str, np.ndarray] = {}
        self._orders: dict[int, np.ndarray] = {}
        self.labels = np.asarray(labels, dtype=np.int64)
        self.lease: WriterLease | None = None
        if lead:
            self._check_target()
            self.lease = WriterLease(location)
            self.lease.acquire()
            try:
                self._claim(overwrite)
                self._write_static(fit_projections)
            except BaseException:
                self.abandon()
                raise
        self.projections = {feature.module: read_projection(location.read(feature.projection_key), feature)
                            for feature in plan.features if feature.components is not None}

    def release(self) -> None:
        """Give up the lease (the committed shards stay; a re-run resumes)."""
        if self.lease is not None:
            self.lease.release()

    def abandon(self) -> None:
        """Give up the lease after a failure, never hiding it: when the store refuses this
        too (a folder made read-only, a store gone), the failure that stopped the run is
        the one to report. The lease stays behind; a re-run takes it over once its holder
        is known to be gone (this host: at once; another: after LEASE_SECONDS)."""
        try:
            self.release()
        except KdpipeError:
            pass

    def _write_static(self, fit_projections: Callable[[], dict[str, np.ndarray]] | None) -> None:
        location = self.location
        if not location.exists(STATIC_MARKER):
            entries = {}
            static = self.backend.static_files(self.labels)
            if self.content_digests is not None:
                static = itertools.chain(static, [(CONTENT_DIGESTS, self.content_digests.astype(np.uint8).tobytes())])
            if self.plan.projection_keys:
                fitted = fit_projections()
                static = itertools.chain(static, [(feature.projection_key, projection_bytes(fitted[feature.module]))
                                                  for feature in self.plan.features if feature.components is not None])
            for key, data in static:
                location.write(key, data)
                entries[key] = file_entry(data)
            location.write(STATIC_MARKER, json_bytes({"files": entries}))

    def _check_target(self) -> None:
        """Refuse, before touching it, a location that is a file, that holds anything but
        kdpipe's own objects, or whose disk cannot hold the archive."""
        location = self.location
        if location.is_file():
            raise ArchiveError(f"{location} exists and is a file; choose another --out")
        found = self._survey()
        self._check_space(found)

    def _survey(self) -> Survey:
        """What the location holds; an error naming the first object that is not kdpipe's."""
        location = self.location
        found = survey(location, location.sizes())
        if found.foreign and found.archive is None:
            raise ArchiveError(f"{location} is not a kdpipe archive and not empty (it holds {found.foreign[0]}); "
                               "kdpipe writes only into an empty folder or its own archive: choose another --out")
        if found.foreign:
            raise ArchiveError(f"{location} holds {found.foreign[0]}, which is not part of its kdpipe archive; kdpipe "
                               "never touches what it did not write: move it away, or choose another --out")
        return found

    def _check_space(self, found: Survey) -> None:
        """Refuse a job whose archive cannot fit on its local disk, before anything is
        written (a typo in --epochs must not fill the disk). The estimate is the stored
        fields before compression; the archive's objects already there count as written."""
        if not self.location.local:
            return  # an object store's free space cannot be known
        needed = self.plan.projected_bytes - found.owned_bytes
        folder = Path(self.location.root)
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if needed > free:
            layout = self.layout
            raise ArchiveError(
                f"archive {self.location} needs about {_size(needed)} ({layout.epochs} epochs x {layout.num_samples} "
                f"samples x {layout.views_per_sample} views, before compression) but {folder} has {_size(free)} free; "
                "lower --epochs or --views-per-sample, choose a smaller --codec, or another --out"
            )

    def _claim(self, overwrite: bool) -> None:
        """Make the location ours: new, replaced (only with overwrite, and only the
        archive's own objects), or an unfinished run of this plan."""
        location = self.location
        found = self._survey()  # again: the lease now keeps other writers out
        has_manifest, has_plan = MANIFEST in found.owned, PLAN in found.owned
        if (has_manifest or has_plan) and overwrite:
            for key in found.owned:
                if key != LEASE:
                    location.delete(key)
        elif has_manifest:
            raise ArchiveError(f"archive {location} is already finished; pass --overwrite to replace it")
        elif has_plan:
            where = first_difference(job_identity(read_json(location, PLAN, "plan")), job_identity(self.plan.to_dict()))
            if where is not None:
                raise ArchiveError(
                    f"{location} holds an unfinished archive of a different job ({where} differs); "
                    "re-run the original command to finish it, or pass --overwrite to replace it"
                )
            return
        location.write(PLAN, json_bytes(self.plan.to_dict()))

    def order(self, epoch: int) -> np.ndarray:
        """The sample index at each position of `epoch`."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.plan.recipe, epoch, self.layout.num_samples)}
        return self._orders[epoch]

    def _marker(self, epoch: int, shard: int) -> str:
        return f"{COMMITS}/{epoch}.{shard}.json"

    def units(self) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, shard, start, stop) of every unit, in training order."""
        return self.layout.units()

    def _commits(self, sizes: dict[str, int]) -> dict[tuple[int, int], dict]:
        """The commit markers whose objects are all present with their committed sizes
        (`sizes`: a listing of the archive)."""
        markers = [k for k in sizes if k.startswith(f"{COMMITS}/") and k != STATIC_MARKER and k.endswith(".json")]
        committed = {}
        for key, data in self.location.read_many(markers).items():
            try:
                marker = json.loads(data)
                files = marker["files"]
            except (ValueError, KeyError, TypeError):
                continue  # a damaged marker: the unit is redone
            if all(sizes.get(k) == v["bytes"] for k, v in files.items()):
                committed[(marker["epoch"], marker["shard"])] = marker
        return committed

    def pending_units(self) -> list[tuple[int, int, int, int]]:
        """(epoch, shard, start, stop) of every unit not yet committed, in order."""
        committed = self._commits(self.location.sizes())
        return [unit for unit in self.units() if unit[:2] not in committed]

    def write_unit(self, epoch: int, shard: int, logits: np.ndarray, params: np.ndarray,
                   features: dict[str, np.ndarray] | None = None) -> None:
        """Encode and write one whole shard of logits (float32), view parameters and the
        feature outputs of the plan by module (float32), then commit it."""
        start = shard * self.layout.positions_per_shard
        stop = start + len(logits)
        fields = self.codec.encode(logits)
        for feature in self.plan.features:
            fields |= feature.encode(features[feature.module], self.projections.get(feature.module))
        samples = self.order(epoch)[start:stop]
        objects = self.backend.encode(epoch, shard, start, fields, params, samples, self.labels[samples])
        if shard == 0:  # the epoch's own objects are committed with its first shard
            objects = self.backend.epoch_files(epoch, self.order(epoch)) | objects
        for key, data in objects.items():
            self.location.write(key, data)
        marker = {"epoch": epoch, "shard": shard, "start": start, "stop": stop,
                  "files": {key: file_entry(data) for key, data in objects.items()}}
        self.location.write(self._marker(epoch, shard), json_bytes(marker))
        if self.lease is not None:
            self.lease.renew()

    def finish(self) -> Manifest:
        """Check every unit is committed and present, then write the manifest last."""
        sizes = self.location.sizes()
        committed = self._commits(sizes)
        missing = [unit for unit in self.units() if unit[:2] not in committed]
        if missing:
            raise ArchiveError(f"archive {self.location} still has {len(missing)} uncommitted shard(s)")
        static = json.loads(self.location.read(STATIC_MARKER))["files"]
        files = dict(static)
        shards = []
        for epoch, shard, start, stop in self.units():
            marker = committed[(epoch, shard)]
            shards.append(ShardEntry(epoch, shard, start, stop, tuple(sorted(self.backend.shard_files(epoch, shard)))))
            files.update(marker["files"])
        for key, entry in static.items():
            if sizes.get(key) != entry["bytes"]:
                raise ArchiveError(f"archive {self.location} lost {key}; re-run with --overwrite")
        for key in sizes:
            target = temporary_target(key)
            if target is not None and (target in files or target in (MANIFEST, PLAN, LEASE)
                                       or COMMIT_MARKER.fullmatch(target)):
                self.location.delete(key)  # left by a killed write; nothing but kdpipe's own is deleted
        manifest = self.plan.finish(shards, {key: FileEntry(entry["bytes"], entry["sha256"]) for key, entry in files.items()})
        self.location.write(MANIFEST, json_bytes(manifest.to_dict()))
        finish_cleanup(self.location)
        self.release()
        return manifest


def teacher_archive(cache: str, name: str) -> str:
    """Where teacher `name` of the archive at URL or path `cache` lives: the archive itself
    for the main teacher, teachers/NAME inside it for an added one."""
    return cache if name == MAIN_TEACHER else f"{cache.rstrip('/')}/{TEACHERS}/{name}"


def added_teachers(location: Location) -> list[str]:
    """The names of the teachers added to a finished archive, sorted (each is a complete
    archive at teachers/NAME; a teacher still being added is not listed)."""
    keys = location.sizes(TEACHERS)
    return sorted({key.split("/")[1] for key in keys if key.count("/") == 2 and key.endswith("/manifest.json")})


def finish_cleanup(location: Location) -> None:
    """Remove what only an unfinished archive has, once its manifest is written: the
    plan, the commit markers, and the lease of a writer that died before releasing it."""
    location.delete(COMMITS, recursive=True)
    location.delete(PLAN)
    remove_dead_lease(location)


def finished_archive_of(location: Location, plan: Manifest) -> Manifest | None:
    """The manifest of the finished archive at `location` when `plan` is its very job
    (cleaning up what a run killed just after writing it left behind); None when there is
    no finished archive; an error when it was made by a different job."""
    if not location.exists(MANIFEST):
        return None
    manifest = read_manifest(location)
    where = first_difference(job_identity(plan.to_dict()), job_identity(manifest.to_dict()))
    if where is not None:
        raise ArchiveError(
            f"archive {location} already exists for a different job ({where} differs); "
            "pass --overwrite to replace it, or choose another --out"
        )
    finish_cleanup(location)  # a run killed just after writing the manifest left these
    return manifest


@dataclass(frozen=True)
class UnfinishedArchive:
    """An archive that has a plan but no manifest yet, and how far its writing got."""

    plan: Manifest
    shards_committed: int

    @property
    def shards_total(self) -> int:
        return self.plan.layout.epochs * self.plan.layout.shards_per_epoch


def unfinished_archive(location: Location) -> UnfinishedArchive | None:
    """The plan and committed shard count of an unfinished archive at `location`; None
    when it is finished or holds no plan."""
    if location.exists(MANIFEST) or not location.exists(PLAN):
        return None
    committed = sum(1 for key in location.sizes(COMMITS) if key != STATIC_MARKER and key.endswith(".json"))
    return UnfinishedArchive(read_plan(location), committed)


UNWRITABLE_CACHES: set[Path] = set()  # local caches that refused a copy in this process: warned about once


class VerifiedObjects:
    """Fetches an archive's objects, each checked against the manifest's sha256; with a
    local cache, verified copies are kept on disk by content hash."""

    def __init__(self, location: Location, manifest: Manifest, local_cache: str | os.PathLike | None = None):
        self.location, self.files = location, manifest.files
        self.local_cache = Path(local_cache) if local_cache and Path(local_cache) not in UNWRITABLE_CACHES else None

    def __call__(self, key: str) -> bytes:
        entry = self.files.get(key)
        if entry is None:
            raise ArchiveError(f"archive {self.location} is damaged: its manifest does not list {key}")
        cached = self.local_cache / entry.sha256[:2] / entry.sha256 if self.local_cache else None
        if cached is not None and cached.is_file():
            data = cached.read_bytes()
            if sha256_hex(data) == entry.sha256:
                return data
        data = self.location.read(key)
        if len(data) != entry.bytes:
            raise ArchiveError(
                f"archive {self.location} is damaged: {key} has {len(data)} bytes, not {entry.bytes}; fetch a fresh copy"
            )
        if sha256_hex(data) != entry.sha256:
            raise ArchiveError(f"archive {self.location} is damaged: {key} fails its checksum; fetch a fresh copy")
        if cached is not None:
            self._keep(cached, data)
        return data

    def _keep(self, cached: Path, data: bytes) -> None:
        """Keep a verified copy in the local cache. A cache that cannot take it (a full
        disk, a read-only folder) costs only speed, never the run: warn once (per process)
        and go on reading from the archive, without the cache."""
        try:
            write_local_atomic(cached, data)
        except OSError as exc:
            if self.local_cache not in UNWRITABLE_CACHES:
                print(f"warning: cannot write {cached} ({short_reason(exc)}); going on without --local-cache "
                      f"{self.local_cache}", file=sys.stderr)
            UNWRITABLE_CACHES.add(self.local_cache)
            self.local_cache = None

    def problems(self) -> list[str]:
        """Every object's problem (missing, wrong size, wrong checksum); empty when sound."""
        problems = []
        for key in self.files:
            try:
                self(key)
            except ArchiveError as exc:
                problems.append(str(exc))
        return problems


def verify_objects(location: Location, manifest: Manifest) -> list[str]:
    """Every object's problem (missing, wrong size, wrong checksum) in the archive at
    `location`; empty when it is sound."""
    return VerifiedObjects(location, manifest).problems()


class ArchiveReader:
    """Reads a finished archive: logits in training order, verified before use.

    Reads the manifest and the small objects when made, shards on demand; open a reader
    in the process that uses it (a DataLoader worker opens its own).
    """

    def __init__(self, location: Location | str | os.PathLike, storage_options: dict | None = None,
                 local_cache: str | os.PathLike | None = None):
        self.location = location if isinstance(location, Location) else Location(location, storage_options)
        self.manifest = read_manifest(self.location)
        self.layout = layout = self.manifest.layout
        self.epochs, self.num_samples = layout.epochs, layout.num_samples
        self.views, self.num_classes = layout.views_per_sample, layout.num_classes
        self.shard_size = layout.positions_per_shard
        self.fetch = VerifiedObjects(self.location, self.manifest, local_cache)
        self.codec = self.manifest.codec
        self.features = {feature.module: feature for feature in self.manifest.features}
        self.backend = make_backend(self.manifest.backend, layout, self.manifest.fields(), self.manifest.schema_version,
                                    self.manifest.files)
        self._shard: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None
        self._content: np.ndarray | None = None
        self._skip = frozenset()
        self.backend.open(self.fetch)
        self.projections = {}
        for feature in self.manifest.features:
            if feature.components is not None:
                try:
                    self.projections[feature.module] = read_projection(self.fetch(feature.projection_key), feature)
                except ManifestError as exc:
                    raise ArchiveError(f"archive {self.location} is damaged: {exc}") from None

    def read_only_features(self, modules: tuple[str, ...]) -> None:
        """Read only these of the archive's features from now on (each shard decodes and,
        with zarr, fetches nothing of the others)."""
        self._skip = frozenset(name for feature in self.manifest.features if feature.module not in modules
                               for name in feature.fields(1))
        self._shard = None

    def _load_shard(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        if self._shard is None or self._shard[0] != (epoch, shard):
            self._shard = None  # free the previous shard before decoding the next
            self._shard = ((epoch, shard), self.backend.decode(epoch, shard, self._skip))
        return self._shard[1]

    def read_fields(self, epoch: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """The stored arrays of positions [start, stop) of `epoch`: the codec's fields,
        `view_params`, `sample_index` and `label`."""
        if not (0 <= epoch < self.epochs and 0 <= start < stop <= self.num_samples):
            raise ArchiveError(f"archive {self.location} has no positions {start}-{stop - 1} in epoch {epoch}")
        parts = []
        for shard in range(start // self.shard_size, (stop - 1) // self.shard_size + 1):
            base = shard * self.shard_size
            arrays = self._load_shard(epoch, shard)
            rows = slice(max(start, base) - base, min(stop, base + self.shard_size) - base)
            parts.append({name: array[rows] for name, array in arrays.items()})
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def content_digests(self) -> np.ndarray | None:
        """(N, 32) uint8: the sha256 of every sample's bytes when cached, by sample index;
        None for an archive made before kdpipe recorded content."""
        if self.manifest.dataset.content is None:
            return None
        if self._content is None:
            self._content = np.frombuffer(self.fetch(CONTENT_DIGESTS), dtype=np.uint8).reshape(-1, 32)
        return self._content

    def read(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits (float32, decoded), view parameters and sample indices of positions [start, stop)."""
        fields = self.read_fields(epoch, start, stop)
        return self.codec.decode(fields), fields["view_params"], fields["sample_index"]

    def decode_feature(self, module: str, fields: dict[str, np.ndarray]) -> np.ndarray:
        """The float32 outputs (positions, V, *decoded shape) of feature `module` in `fields`
        (what `read_fields` gave)."""
        return self.features[module].decode(fields, self.projections.get(module))
