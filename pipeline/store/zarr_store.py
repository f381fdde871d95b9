"""The zarr v3 archive: sharded, compressed arrays in epoch order, one writer per shard.

Layout (docs/format.md is the full spec):
    logits        (E, N, V, C) float16|float32   pre-softmax teacher logits
    view_params   (E, N, V, P) float32           realised view parameters
    sample_index  (E, N) int64                   sample at each position of each epoch
    position_index(E, N) int64                   position of each sample in each epoch
    labels        (N,) int64                     label of each sample, -1 when unlabelled

A shard of `logits` and `view_params` covers one epoch and a run of positions; it is
written whole (zarr's local store renames it into place) and then committed by an
atomic marker file holding its checksums. `finish` writes the manifest last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..config import ViewRecipe, first_difference
from ..errors import ArchiveError
from ..views import epoch_order
from .manifest import MANIFEST, PLAN, job_identity, read_json, read_manifest, write_json_atomic

COMMITS = "commits"
SHARDED_ARRAYS = ("logits", "view_params")
# Aim for shards of about this many uncompressed logit bytes, and chunks (the unit of
# decompression on read) of about this many.
TARGET_SHARD_BYTES = 16 << 20
TARGET_CHUNK_BYTES = 256 << 10


def plan_layout(num_samples: int, views: int, classes: int, itemsize: int, positions_per_shard: int | None) -> dict:
    """Positions per shard and per chunk: chunks divide shards, shards cover positions."""
    per_position = views * classes * itemsize
    chunk = max(1, min(num_samples, TARGET_CHUNK_BYTES // per_position))
    shard = positions_per_shard or max(chunk, TARGET_SHARD_BYTES // per_position)
    shard = min(shard, num_samples)
    chunk = min(chunk, shard)
    shard = -(-shard // chunk) * chunk  # a whole number of chunks
    return {"positions_per_shard": shard, "positions_per_chunk": chunk}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}


def shard_key(array: str, epoch: int, shard: int) -> str:
    """The store key of one shard (zarr v3 default chunk keys, '/' separated)."""
    return f"{array}/c/{epoch}/{shard}/0/0"


class ZarrWriter:
    """Creates an archive or resumes an unfinished one with the same plan."""

    def __init__(self, path: str | os.PathLike, plan: dict, labels: np.ndarray, overwrite: bool = False):
        self.root = Path(path)
        self.plan = plan
        self.labels = np.asarray(labels, dtype=np.int64)
        layout = plan["layout"]
        self.epochs, self.num_samples = layout["epochs"], layout["num_samples"]
        self.shard_size = layout["positions_per_shard"]
        self.shards_per_epoch = -(-self.num_samples // self.shard_size)
        self._claim(overwrite)
        commits = self.root / COMMITS
        if not commits.is_dir() or not any(commits.iterdir()):
            self._create_arrays()  # nothing committed yet: (re)creating loses nothing
        self.group = zarr.open_group(str(self.root), mode="r+")

    def _claim(self, overwrite: bool) -> None:
        """Make `root` ours: new, replaced (only with overwrite), or an unfinished run of this plan."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise ArchiveError(f"{root} exists and is a file; choose another --out")
        is_archive = (root / MANIFEST).exists() or (root / PLAN).exists()
        if root.is_dir() and any(root.iterdir()) and not is_archive:
            raise ArchiveError(f"{root} exists and is not a kdpipe archive; choose another --out")
        if is_archive and overwrite:
            shutil.rmtree(root)
        elif (root / MANIFEST).exists():
            raise ArchiveError(f"archive {root} is already finished; pass --overwrite to replace it")
        elif (root / PLAN).exists():
            where = first_difference(job_identity(read_json(root / PLAN, "plan")), job_identity(self.plan))
            if where is not None:
                raise ArchiveError(
                    f"{root} holds an unfinished archive of a different job ({where} differs); "
                    "re-run the original command to finish it, or pass --overwrite to replace it"
                )
            return
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / PLAN, self.plan)

    def _create_arrays(self) -> None:
        layout, recipe = self.plan["layout"], ViewRecipe.from_dict(self.plan["recipe"])
        E, N, V, C = self.epochs, self.num_samples, layout["views_per_sample"], layout["num_classes"]
        P = len(layout["view_param_fields"])
        S, chunk = self.shard_size, layout["positions_per_chunk"]
        group = zarr.open_group(str(self.root), mode="a", zarr_format=3)
        common = {
            "overwrite": True,
            "fill_value": 0,
            "chunk_key_encoding": {"name": "default", "separator": "/"},
            "config": {"write_empty_chunks": True},
        }
        dtype = np.dtype(self.plan["codec"]["dtype"])
        group.create_array(
            "logits", shape=(E, N, V, C), dtype=dtype, shards=(1, S, V, C), chunks=(1, chunk, V, C),
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=dtype.itemsize), **common,
        )
        group.create_array(
            "view_params", shape=(E, N, V, P), dtype=np.float32, shards=(1, S, V, P), chunks=(1, chunk, V, P),
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=4), **common,
        )
        index_chunk = (1, min(N, 1 << 20))
        sample_index = group.create_array("sample_index", shape=(E, N), dtype=np.int64, chunks=index_chunk, **common)
        position_index = group.create_array("position_index", shape=(E, N), dtype=np.int64, chunks=index_chunk, **common)
        for epoch in range(E):
            order = epoch_order(recipe, epoch, N)
            position = np.empty_like(order)
            position[order] = np.arange(N, dtype=np.int64)
            sample_index[epoch] = order
            position_index[epoch] = position
        labels = group.create_array("labels", shape=(N,), dtype=np.int64, chunks=(min(N, 1 << 20),), **common)
        labels[...] = self.labels

    def pending_units(self) -> list[tuple[int, int, int, int]]:
        """(epoch, shard, start, stop) of every shard not yet committed, in order."""
        units = []
        for epoch in range(self.epochs):
            for shard, start in enumerate(range(0, self.num_samples, self.shard_size)):
                if not self._committed(epoch, shard):
                    units.append((epoch, shard, start, min(start + self.shard_size, self.num_samples)))
        return units

    def _marker(self, epoch: int, shard: int) -> Path:
        return self.root / COMMITS / f"{epoch}.{shard}.json"

    def _committed(self, epoch: int, shard: int) -> bool:
        marker = self._marker(epoch, shard)
        if not marker.is_file():
            return False
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return False
        return all((self.root / k).is_file() and (self.root / k).stat().st_size == v["bytes"] for k, v in files.items())

    def write_unit(self, epoch: int, shard: int, logits: np.ndarray, params: np.ndarray) -> None:
        """Write one whole shard of logits and view parameters, then commit it."""
        start = shard * self.shard_size
        stop = start + len(logits)
        self.group["logits"][epoch, start:stop] = logits
        self.group["view_params"][epoch, start:stop] = params
        files = {key: _file_entry(self.root / key) for key in (shard_key(a, epoch, shard) for a in SHARDED_ARRAYS)}
        (self.root / COMMITS).mkdir(exist_ok=True)
        write_json_atomic(
            self._marker(epoch, shard), {"epoch": epoch, "shard": shard, "start": start, "stop": stop, "files": files}
        )

    def finish(self) -> dict:
        """Check every shard is committed, checksum the rest, write the manifest last."""
        if self.pending_units():
            raise ArchiveError(f"archive {self.root} still has uncommitted shards")
        shards, files = [], {}
        for epoch in range(self.epochs):
            for shard in range(self.shards_per_epoch):
                marker = json.loads(self._marker(epoch, shard).read_text())
                shards.append({k: marker[k] for k in ("epoch", "shard", "start", "stop")} | {"files": sorted(marker["files"])})
                files.update(marker["files"])
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if not path.is_file() or key in files or key == PLAN or key.startswith(COMMITS + "/"):
                continue
            if path.name.startswith(".") or path.name.endswith(".partial"):
                path.unlink()  # a temporary file left by a killed writer
                continue
            files[key] = _file_entry(path)
        manifest = dict(self.plan)
        manifest["shards"] = shards
        manifest["files"] = dict(sorted(files.items()))
        manifest["total_bytes"] = sum(f["bytes"] for f in files.values())
        write_json_atomic(self.root / MANIFEST, manifest)
        shutil.rmtree(self.root / COMMITS)
        (self.root / PLAN).unlink()
        return manifest


class ZarrReader:
    """Reads a finished archive: contiguous slabs of logits in training order.

    Every file is checked against the manifest's sha256 before its first use (the small
    ones on opening, each shard when a read first touches it), so nothing is ever
    trained on damaged bytes.
    """

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.shard_size = self.manifest["layout"]["positions_per_shard"]
        self._verified: set[str] = set()
        chunked = tuple(f"{name}/c/" for name in (*SHARDED_ARRAYS, "sample_index", "position_index"))
        self._verify(key for key in self.manifest["files"] if not key.startswith(chunked))
        try:
            group = zarr.open_group(str(self.root), mode="r")
            self.logits = group["logits"]
            self.view_params = group["view_params"]
            self.sample_index = group["sample_index"]
            self.labels = group["labels"]
        except Exception as exc:  # zarr raises several types for a damaged store
            raise ArchiveError(f"cannot open archive {self.root}: {exc}") from None
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _verify(self, keys) -> None:
        for key in keys:
            if key in self._verified:
                continue
            entry, path = self.manifest["files"][key], self.root / key
            if not path.is_file():
                raise ArchiveError(f"archive {self.root} is damaged: {key} is missing; fetch a fresh copy")
            if path.stat().st_size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
                raise ArchiveError(f"archive {self.root} is damaged: {key} fails its checksum; fetch a fresh copy")
            self._verified.add(key)

    def order(self, epoch: int) -> np.ndarray:
        """The stored sample index at each position of `epoch`."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            prefix = f"sample_index/c/{epoch}/"
            self._verify(key for key in self.manifest["files"] if key.startswith(prefix))
            self._epoch_order = (epoch, self.sample_index[epoch])
        return self._epoch_order[1]

    def read(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits (float32), view parameters and sample indices of positions [start, stop)."""
        for shard in range(start // self.shard_size, (stop - 1) // self.shard_size + 1):
            self._verify(shard_key(array, epoch, shard) for array in SHARDED_ARRAYS)
        try:
            logits = self.logits[epoch, start:stop]
            params = self.view_params[epoch, start:stop]
        except Exception as exc:  # decoding errors of a store changed after it was verified
            raise ArchiveError(f"cannot read archive {self.root} at epoch {epoch}, positions {start}-{stop - 1}: {exc}") from None
        return logits.astype(np.float32, copy=False), params, self.order(epoch)[start:stop]
