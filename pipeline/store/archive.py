"""The archive writer and reader, shared by every backend (zarr, webdataset) and store.

An archive is a set of objects below a `Location`:

    plan.json            the manifest-to-be, while the archive is unfinished
    commits/static.json  checksums of the backend's static files, once written
    commits/E.S.json     checksums of shard S of epoch E, once its objects are written
    <backend objects>    zarr arrays, or tar shards
    manifest.json        written last: an archive without it is unfinished

A unit of work is one (epoch, shard): its objects are written whole (atomically), then
its commit marker. A re-run skips committed units, so an interrupted job completes to
the same bytes. `finish` checks every object is present with its committed size,
writes the manifest with a sha256 per object, and removes the markers and the plan.

The reader verifies every object against the manifest's sha256 before first use (the
small ones on opening, each shard when a read first touches it): nothing is ever
trained on damaged bytes. With a local cache, verified objects are kept on disk by
content hash, so a remote archive is downloaded once per machine.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import ViewRecipe, first_difference, sha256_hex
from ..errors import ArchiveError
from ..views import epoch_order
from .codecs import Codec, codec_from_manifest
from .location import Location
from .manifest import MANIFEST, PLAN, job_identity, json_bytes, read_json, read_manifest, seal

COMMITS = "commits"
STATIC_MARKER = f"{COMMITS}/static.json"
LEASE = "writer.json"  # who is writing an unfinished archive
TEACHERS = "teachers"  # further teachers of a finished archive, each a complete archive of its own
LEASE_SECONDS = 600  # a lease from another host not renewed for this long is abandoned
# Aim for shards of about this many uncompressed bytes, and (zarr) chunks, the unit of
# decompression on read, of about this many.
TARGET_SHARD_BYTES = 16 << 20
TARGET_CHUNK_BYTES = 256 << 10
TARGET_BUFFER_BYTES = 256 << 20


def plan_layout(num_samples: int, bytes_per_position: int, positions_per_shard: int | None,
                buffer_bytes_per_position: int = 0) -> dict:
    """Positions per shard and per chunk: chunks divide shards, shards cover positions.

    A shard holds about TARGET_SHARD_BYTES stored, and the writer's float32 buffer of a
    shard (`buffer_bytes_per_position` each) at most TARGET_BUFFER_BYTES: a compact codec
    (top-k) would otherwise make shards of so many positions that their full-width
    logits fill the memory while they are computed.
    """
    chunk = max(1, min(num_samples, TARGET_CHUNK_BYTES // bytes_per_position))
    by_buffer = TARGET_BUFFER_BYTES // buffer_bytes_per_position if buffer_bytes_per_position else num_samples
    shard = positions_per_shard or max(chunk, min(TARGET_SHARD_BYTES // bytes_per_position, by_buffer))
    shard = min(shard, num_samples)
    chunk = min(chunk, shard)
    shard = -(-shard // chunk) * chunk  # a whole number of chunks
    return {"positions_per_shard": shard, "positions_per_chunk": chunk}


def file_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": sha256_hex(data)}


def _backend(manifest: dict, codec: Codec):
    from .wds_store import WebDatasetBackend
    from .zarr_store import ZarrBackend

    backends = {"zarr": ZarrBackend, "webdataset": WebDatasetBackend}
    name = manifest.get("backend", "zarr")
    if name not in backends:
        raise ArchiveError(f"archive backend {name!r} is unknown to this kdpipe; upgrade kdpipe")
    return backends[name](manifest, codec)


class WriterLease:
    """One writer per archive at a time: `writer.json` names the process that holds the
    archive (host, pid, a random owner id) and when it last committed a shard.

    A second cache-teacher on the same archive refuses while the holder lives. The
    holder counts as gone when it ran on this host and its pid is dead (killed, crashed),
    or, from another host, when it has not renewed the lease for LEASE_SECONDS.
    """

    def __init__(self, location: Location):
        self.location = location
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.time(), "renewed": time.time()}

    def acquire(self) -> None:
        for _ in range(3):
            if self.location.create_exclusive(LEASE, json_bytes(self.record)):
                return
            current = self.location.read_if_present(LEASE)
            holder = _parse_lease(current)
            if holder is not None and _alive(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
                raise ArchiveError(
                    f"archive {self.location} is being written by another cache-teacher (pid {holder['pid']} on "
                    f"{holder['host']}, since {since}); wait for it to finish, then re-run to check it"
                )
            if self.location.read_if_present(LEASE) == current:  # abandoned: take it over
                self.location.delete(LEASE)
        raise ArchiveError(f"archive {self.location}: could not take over the writer lease; re-run the command")

    def renew(self) -> None:
        """Refresh the lease after a commit; stop if another process has taken it."""
        holder = _parse_lease(self.location.read_if_present(LEASE))
        if holder is None or holder["owner"] != self.record["owner"]:
            raise ArchiveError(
                f"archive {self.location}: another cache-teacher took over this archive; "
                "this run stops (its committed shards stay)"
            )
        self.record["renewed"] = time.time()
        self.location.write(LEASE, json_bytes(self.record))

    @contextmanager
    def kept(self, every: float = LEASE_SECONDS / 5) -> Iterator[None]:
        """Renew the lease every `every` seconds while the block runs: rank 0, waiting for
        the other ranks' shards, commits none of its own. Raises on exit if the lease was lost."""
        stop, failed = threading.Event(), []

        def renew() -> None:
            while not stop.wait(every):
                try:
                    self.renew()
                except Exception as exc:  # lost, or the store failed after its retries
                    failed.append(exc)
                    return

        thread = threading.Thread(target=renew, name="kdpipe-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if failed:
            raise failed[0]

    def release(self) -> None:
        holder = _parse_lease(self.location.read_if_present(LEASE))
        if holder is not None and holder["owner"] == self.record["owner"]:
            self.location.delete(LEASE)


def _parse_lease(data: bytes | None) -> dict | None:
    try:
        record = json.loads(data) if data is not None else None
        return record if record and {"owner", "host", "pid", "since", "renewed"} <= set(record) else None
    except ValueError:
        return None


def _alive(holder: dict) -> bool:
    if holder["host"] == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - holder["renewed"] < LEASE_SECONDS


class ArchiveWriter:
    """Creates an archive, or resumes an unfinished one with the same plan. Holds the
    archive's writer lease from creation until `finish` (or `release`).

    Under torch.distributed, rank 0 creates the writer that holds the lease; the other
    ranks join it (`lead=False`) once it exists, and only write their shards: they
    neither take the lease nor write the plan, the static objects or the manifest.
    """

    def __init__(self, location: Location, plan: dict, labels: np.ndarray, overwrite: bool = False, lead: bool = True):
        self.location = location
        self.plan = plan
        self.codec = codec_from_manifest(plan)
        self.backend = _backend(plan, self.codec)
        layout = plan["layout"]
        self.epochs, self.num_samples = layout["epochs"], layout["num_samples"]
        self.shard_size = layout["positions_per_shard"]
        self.shards_per_epoch = -(-self.num_samples // self.shard_size)
        self.recipe = ViewRecipe.from_dict(plan["recipe"])
        self._orders: dict[int, np.ndarray] = {}
        self.labels = np.asarray(labels, dtype=np.int64)
        self.lease: WriterLease | None = None
        if not lead:
            return
        self._check_target(overwrite)
        self.lease = WriterLease(location)
        self.lease.acquire()
        try:
            self._claim(overwrite)
            self._write_static()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the lease (the committed shards stay; a re-run resumes)."""
        if self.lease is not None:
            self.lease.release()

    def _write_static(self) -> None:
        location = self.location
        if not location.exists(STATIC_MARKER):
            entries = {}
            for key, data in self.backend.static_files(self.labels, self.order):
                location.write(key, data)
                entries[key] = file_entry(data)
            location.write(STATIC_MARKER, json_bytes({"files": entries}))

    def _check_target(self, overwrite: bool) -> None:
        """Refuse a location that is a file or a folder of other things, before touching it."""
        location = self.location
        if location.is_file():
            raise ArchiveError(f"{location} exists and is a file; choose another --out")
        foreign = [key for key in location.sizes()
                   if key != LEASE and not key.rsplit("/", 1)[-1].startswith(".")]  # not a lease or temp file
        if foreign and not (location.exists(MANIFEST) or location.exists(PLAN)):
            raise ArchiveError(f"{location} exists and is not a kdpipe archive; choose another --out")

    def _claim(self, overwrite: bool) -> None:
        """Make the location ours: new, replaced (only with overwrite), or an unfinished run of this plan."""
        location = self.location
        has_manifest, has_plan = location.exists(MANIFEST), location.exists(PLAN)
        if (has_manifest or has_plan) and overwrite:
            for key in location.sizes():
                if key != LEASE:
                    location.delete(key)
        elif has_manifest:
            raise ArchiveError(f"archive {location} is already finished; pass --overwrite to replace it")
        elif has_plan:
            where = first_difference(job_identity(read_json(location, PLAN, "plan")), job_identity(self.plan))
            if where is not None:
                raise ArchiveError(
                    f"{location} holds an unfinished archive of a different job ({where} differs); "
                    "re-run the original command to finish it, or pass --overwrite to replace it"
                )
            return
        location.write(PLAN, json_bytes(self.plan))

    def order(self, epoch: int) -> np.ndarray:
        """The sample index at each position of `epoch`."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.recipe, epoch, self.num_samples)}
        return self._orders[epoch]

    def _marker(self, epoch: int, shard: int) -> str:
        return f"{COMMITS}/{epoch}.{shard}.json"

    def units(self) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, shard, start, stop) of every unit, in training order."""
        for epoch in range(self.epochs):
            for shard, start in enumerate(range(0, self.num_samples, self.shard_size)):
                yield epoch, shard, start, min(start + self.shard_size, self.num_samples)

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

    def write_unit(self, epoch: int, shard: int, logits: np.ndarray, params: np.ndarray) -> None:
        """Encode and write one whole shard of logits (float32) and view parameters, then commit it."""
        start = shard * self.shard_size
        stop = start + len(logits)
        fields = self.codec.encode(logits)
        samples = self.order(epoch)[start:stop]
        objects = self.backend.encode(epoch, shard, start, fields, params, samples, self.labels[samples])
        for key, data in objects.items():
            self.location.write(key, data)
        marker = {"epoch": epoch, "shard": shard, "start": start, "stop": stop,
                  "files": {key: file_entry(data) for key, data in objects.items()}}
        self.location.write(self._marker(epoch, shard), json_bytes(marker))
        if self.lease is not None:
            self.lease.renew()

    def finish(self) -> dict:
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
            shards.append({"epoch": epoch, "shard": shard, "start": start, "stop": stop, "files": sorted(marker["files"])})
            files.update(marker["files"])
        for key, entry in static.items():
            if sizes.get(key) != entry["bytes"]:
                raise ArchiveError(f"archive {self.location} lost {key}; re-run with --overwrite")
        for key in sizes:
            if key not in files and key not in (PLAN, LEASE) and not key.startswith(f"{COMMITS}/"):
                self.location.delete(key)  # a temporary file left by a killed writer
        manifest = dict(self.plan)
        manifest["shards"] = shards
        manifest["files"] = dict(sorted(files.items()))
        manifest["total_bytes"] = sum(f["bytes"] for f in files.values())
        manifest = seal(manifest)
        self.location.write(MANIFEST, json_bytes(manifest))
        finish_cleanup(self.location)
        self.release()
        return manifest


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
    holder = _parse_lease(location.read_if_present(LEASE))
    if holder is not None and not _alive(holder):
        location.delete(LEASE)


class VerifiedObjects:
    """Fetches an archive's objects, each checked against the manifest's sha256; with a
    local cache, verified copies are kept on disk by content hash."""

    def __init__(self, location: Location, manifest: dict, local_cache: str | os.PathLike | None = None):
        self.location, self.files = location, manifest["files"]
        self.local_cache = Path(local_cache) if local_cache else None

    def __call__(self, key: str) -> bytes:
        entry = self.files.get(key)
        if entry is None:
            raise ArchiveError(f"archive {self.location} is damaged: its manifest does not list {key}")
        cached = self.local_cache / entry["sha256"][:2] / entry["sha256"] if self.local_cache else None
        if cached is not None and cached.is_file():
            data = cached.read_bytes()
            if sha256_hex(data) == entry["sha256"]:
                return data
        data = self.location.read(key)
        if len(data) != entry["bytes"]:
            raise ArchiveError(
                f"archive {self.location} is damaged: {key} has {len(data)} bytes, not {entry['bytes']}; fetch a fresh copy"
            )
        if sha256_hex(data) != entry["sha256"]:
            raise ArchiveError(f"archive {self.location} is damaged: {key} fails its checksum; fetch a fresh copy")
        if cached is not None:
            Location(cached.parent).write(cached.name, data)
        return data

    def problems(self) -> list[str]:
        """Every object's problem (missing, wrong size, wrong checksum); empty when sound."""
        problems = []
        for key in self.files:
            try:
                self(key)
            except ArchiveError as exc:
                problems.append(str(exc))
        return problems


class ArchiveReader:
    """Reads a finished archive: logits in training order, verified before use.

    Reads the manifest and the small objects when made, shards on demand; open a reader
    in the process that uses it (a DataLoader worker opens its own).
    """

    def __init__(self, location: Location | str | os.PathLike, storage_options: dict | None = None,
                 local_cache: str | os.PathLike | None = None):
        self.location = location if isinstance(location, Location) else Location(location, storage_options)
        self.manifest = read_manifest(self.location)
        layout = self.manifest["layout"]
        self.epochs, self.num_samples = layout["epochs"], layout["num_samples"]
        self.views, self.num_classes = layout["views_per_sample"], layout["num_classes"]
        self.shard_size = layout["positions_per_shard"]
        self.fetch = VerifiedObjects(self.location, self.manifest, local_cache)
        self.codec = codec_from_manifest(self.manifest)
        self.backend = _backend(self.manifest, self.codec)
        self._shard: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None
        self.backend.open(self.fetch)

    def _load_shard(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        if self._shard is None or self._shard[0] != (epoch, shard):
            self._shard = None  # free the previous shard before decoding the next
            self._shard = ((epoch, shard), self.backend.decode(epoch, shard))
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

    def read(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits (float32, decoded), view parameters and sample indices of positions [start, stop)."""
        fields = self.read_fields(epoch, start, stop)
        return self.codec.decode(fields), fields["view_params"], fields["sample_index"]
