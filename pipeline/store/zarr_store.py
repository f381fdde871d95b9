"""The zarr v3 backend: sharded, compressed arrays in epoch order (the default format).

Arrays (docs/format.md is the full spec):
    <codec fields>  (E, N, ...)     e.g. logits (E, N, V, C) float16, or topk_* arrays
    view_params     (E, N, V, P) float32   realised view parameters
    sample_index    (E, N) int64           sample at each position of each epoch
    position_index  (E, N) int64           schema 1 only: the inverse of sample_index (never read)
    labels          (N,) int64             label of each sample, -1 when unlabelled

Schema 2 also compresses more tightly, each array losslessly as zarr's own codecs
allow: the view parameters column by column (a `transpose` codec puts each column's
values for a chunk's positions side by side) and bit-shuffled, the top-k indices and
the index arrays bit-shuffled (their high bits are mostly zero). A stock zarr reader
undoes all of it; `_compression` says which array gets what.

A shard of every per-view array covers one epoch and a run of positions. The index
arrays' chunks of an epoch are written with that epoch's first shard, so an archive of
many epochs writes nothing per epoch before the teacher has run. Shards are
encoded by zarr in memory and handed to the archive writer as bytes, so the store
(local disk, s3://, gs://) only ever sees whole objects, and the reader decodes
verified bytes the same way. The result is an ordinary zarr v3 group: any zarr
reader opens it.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, TransposeCodec
from zarr.storage import MemoryStore

from ..errors import ArchiveError
from .layout import Fields, Layout

SCHEMA1_INDEX_ARRAYS = ("sample_index", "position_index")
BITSHUFFLED = ("topk_indices", "view_params")  # schema 2: mostly-zero high bits, or float columns of few values
COLUMNS_TOGETHER = ("view_params",)  # schema 2: stored column by column within a chunk


def _blosc(dtype: np.dtype, shuffle: str = "shuffle") -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=dtype.itemsize)


def _compression(name: str, dtype: np.dtype, ndim: int, schema_version: int) -> dict:
    """The `filters` and `compressors` of array `name` (of `ndim` dimensions) in an
    archive of `schema_version`: blosc-zstd with byte shuffle for every per-view array in
    schema 1; in schema 2 bit shuffle for BITSHUFFLED, with each chunk's positions made
    the last (fastest) dimension for COLUMNS_TOGETHER."""
    if schema_version == 1:
        return {"compressors": _blosc(dtype)}
    filters = [TransposeCodec(order=(0, *range(2, ndim), 1))] if name in COLUMNS_TOGETHER else []
    return {"filters": filters, "compressors": _blosc(dtype, "bitshuffle" if name in BITSHUFFLED else "shuffle")}


def _index_compression(schema_version: int) -> dict:
    """The index arrays' and labels' compression: zarr's default (zstd) in schema 1,
    bit-shuffled blosc-zstd from schema 2 (their int64 values have mostly-zero high bits)."""
    return {} if schema_version == 1 else {"compressors": _blosc(np.dtype(np.int64), "bitshuffle")}


def _never_stored(dtype: np.dtype):
    """A fill value no real shard consists of: zarr writes no object for a shard that is
    all fill value, and every shard must exist (NaN logits are refused at caching time,
    no top-k index or log-probability field is all at its dtype's maximum, and every
    dense-int8 view holds -127 unless all its logits are equal, when it holds 0)."""
    return float("nan") if dtype.kind == "f" else int(np.iinfo(dtype).max)


CHUNK_KEY = re.compile(r"(?P<array>[^/]+)/c/(?P<epoch>\d+)/(?P<shard>\d+)(/0)*")


def shard_key(array: str, epoch: int, shard: int, ndim: int) -> str:
    """The store key of one shard (zarr v3 default chunk keys, '/' separated)."""
    return f"{array}/c/{epoch}/{shard}" + "/0" * (ndim - 2)


class ZarrBackend:
    """The `Backend` of zarr v3 groups (see pipeline.store.backends)."""

    name = "zarr"

    def __init__(self, layout: Layout, fields: Fields, schema_version: int, files: Mapping[str, dict]):
        self.layout = layout
        self.schema_version = schema_version
        self.index_arrays = SCHEMA1_INDEX_ARRAYS if schema_version == 1 else ("sample_index",)
        self.epochs, self.num_samples = layout.epochs, layout.num_samples
        self.shard_size, self.chunk = layout.positions_per_shard, layout.positions_per_chunk
        self.fields = fields
        self._files = files  # a finished archive's objects
        self._store: dict = {}
        self._staging: zarr.Group | None = None

    def _create(self, store: dict) -> zarr.Group:
        """The archive's arrays, created in a memory store (metadata only, no chunks)."""
        E, N = self.epochs, self.num_samples
        group = zarr.open_group(MemoryStore(store), mode="w", zarr_format=3)
        common = {"fill_value": 0, "chunk_key_encoding": {"name": "default", "separator": "/"},
                  "config": {"write_empty_chunks": True}}
        for name, (tail, dtype) in self.fields.items():
            group.create_array(
                name, shape=(E, N, *tail), dtype=dtype, shards=(1, self.shard_size, *tail),
                chunks=(1, self.chunk, *tail), **_compression(name, dtype, 2 + len(tail), self.schema_version),
                **(common | {"fill_value": _never_stored(dtype)}),
            )
        indices = common | _index_compression(self.schema_version)
        for name in self.index_arrays:
            group.create_array(name, shape=(E, N), dtype=np.int64, chunks=(1, N), **indices)
        group.create_array("labels", shape=(N,), dtype=np.int64, chunks=(N,), **indices)
        return group

    def static_files(self, labels: np.ndarray) -> Iterator[tuple[str, bytes]]:
        """The metadata of every array and the labels chunk."""
        store: dict = {}
        group = self._create(store)
        group["labels"][...] = labels
        for key in sorted(store):
            yield key, store.pop(key).to_bytes()

    def epoch_files(self, epoch: int, sample_index: np.ndarray) -> dict[str, bytes]:
        """The chunk of `sample_index` for `epoch` (and in schema 1 of `position_index`;
        those zarr stores: an all-zero chunk, N = 1, is not), given the sample at each position."""
        if self._staging is None:
            self._staging = self._create(self._store)
        self._staging["sample_index"][epoch] = sample_index
        if self.schema_version == 1:
            position_index = np.empty_like(sample_index)
            position_index[sample_index] = np.arange(self.num_samples, dtype=np.int64)
            self._staging["position_index"][epoch] = position_index
        keys = [f"{name}/c/{epoch}/0" for name in self.index_arrays]
        return {key: self._store.pop(key).to_bytes() for key in keys if key in self._store}

    def owns(self, key: str) -> bool:
        """Whether `key` is an object of a zarr archive of this layout: group or array
        metadata, the labels chunk, an epoch's index chunk, or a shard of a per-view array."""
        arrays = (*self.fields, *self.index_arrays, "labels")
        if key in ("zarr.json", "labels/c/0") or key in {f"{name}/zarr.json" for name in arrays}:
            return True
        match = CHUNK_KEY.fullmatch(key)
        if match is None or int(match["epoch"]) >= self.epochs:
            return False
        name, epoch, shard = match["array"], int(match["epoch"]), int(match["shard"])
        if name in self.index_arrays:
            return key == f"{name}/c/{epoch}/0"
        return (name in self.fields and shard < self.layout.shards_per_epoch
                and key == shard_key(name, epoch, shard, len(self.fields[name][0]) + 2))

    def encode(self, epoch: int, shard: int, start: int, fields: dict[str, np.ndarray], params: np.ndarray,
               sample_index: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
        """The shard objects of positions [start, start + n) of `epoch`, as bytes (the
        index chunks are `epoch_files`, the labels a static file)."""
        if self._staging is None:
            self._staging = self._create(self._store)
        stop = start + len(params)
        out = {}
        for name, values in (fields | {"view_params": params}).items():
            array = self._staging[name]
            array[epoch, start:stop] = values
            key = shard_key(name, epoch, shard, array.ndim)
            if key not in self._store:
                raise ArchiveError(f"zarr wrote no object for {key}: every value equals the fill value")
            out[key] = self._store.pop(key).to_bytes()
        return out

    def shard_files(self, epoch: int, shard: int) -> list[str]:
        return [shard_key(name, epoch, shard, len(tail) + 2) for name, (tail, _) in self.fields.items()]

    def open(self, fetch: Callable[[str], bytes]) -> None:
        """Load the (verified) metadata and labels; shards and indices come on demand."""
        self._fetch = fetch
        self._prototype = default_buffer_prototype()
        for key in self._files:
            if key.endswith("zarr.json") or key.startswith("labels/c/"):
                self._put(key)  # a labels chunk the manifest does not list is all zeros (one class)
        try:
            self._group = zarr.open_group(MemoryStore(self._store), mode="r", zarr_format=3)
            self._labels = self._group["labels"][...]
        except Exception as exc:  # noqa: BLE001 - zarr raises several types for damaged metadata
            raise ArchiveError(f"cannot open the zarr arrays of the archive: {exc}") from None
        self._epoch = -1

    def _put(self, key: str) -> None:
        self._store[key] = self._prototype.buffer.from_bytes(self._fetch(key))

    def _put_static(self, key: str) -> None:
        """Load a chunk of an index array. zarr writes no object for a chunk that is all
        fill value (0), and the manifest lists every object that was written: an unlisted
        chunk is all zeros, which for a position index means a single sample; any other
        unlisted chunk is refused by the fetch as damage."""
        if key in self._files or self.num_samples != 1:
            self._put(key)

    def decode(self, epoch: int, shard: int, skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """Every stored array of one shard but those in `skip`, plus each position's
        sample index and label."""
        start, stop = self.layout.shard_range(shard)
        if epoch != self._epoch:
            for key in [k for k in self._store if k.startswith("sample_index/c/")]:
                del self._store[key]
            self._put_static(f"sample_index/c/{epoch}/0")
            self._epoch = epoch
        names = [name for name in self.fields if name not in skip]
        keys = [shard_key(name, epoch, shard, len(self.fields[name][0]) + 2) for name in names]
        for key in keys:
            self._put(key)
        try:
            out = {name: self._group[name][epoch, start:stop] for name in names}
            out["sample_index"] = self._group["sample_index"][epoch, start:stop]
        except Exception as exc:  # noqa: BLE001 - a decoding error of verified bytes
            raise ArchiveError(f"cannot decode epoch {epoch}, positions {start}-{stop - 1}: {exc}") from None
        finally:
            for key in keys:
                self._store.pop(key, None)
        out["label"] = self._labels[out["sample_index"]]
        return out
