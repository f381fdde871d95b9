"""The WebDataset backend: tar shards in training order, for streaming and shipping.

Shard S of epoch E is `shards/eEEEEE-sSSSSS.tar.gz`, a gzip-compressed tar (a bare tar
pads every small record to 1 KiB); it holds one tar member per record,
`eEEEEE-pPPPPPPPPP.npy`, in position order. A record is one numpy structured scalar:

    epoch, position, sample, label   int64
    view_params                      float32 (V, P)
    <codec fields>                   e.g. logits float16 (V, C)

Members are written with mtime 0, uid/gid 0 and no user names, and the gzip header has
mtime 0 and no file name, so identical content gives identical bytes (and checksums). Stock `webdataset.WebDataset(urls).decode()`
yields each record as `sample["npy"]`.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zlib
from typing import Callable, Iterator, Mapping

import numpy as np

from ..errors import ArchiveError
from .layout import Fields, Layout

META_FIELDS = ("epoch", "position", "sample", "label")


SHARD_KEY = re.compile(r"shards/e(?P<epoch>\d{6})-s(?P<shard>\d{5})\.tar\.gz")


def shard_key(epoch: int, shard: int) -> str:
    return f"shards/e{epoch:06d}-s{shard:05d}.tar.gz"


def member_name(epoch: int, position: int) -> str:
    return f"e{epoch:06d}-p{position:09d}.npy"


def _npy_header(dtype: np.dtype) -> bytes:
    """The .npy header of one scalar record (identical for every record of an archive)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros((), dtype=dtype), allow_pickle=False)
    return buffer.getvalue()[: -dtype.itemsize]


class WebDatasetBackend:
    """The `Backend` of gzip tar shards (see pipeline.store.backends)."""

    name = "webdataset"

    def __init__(self, layout: Layout, fields: Fields, schema_version: int, files: Mapping[str, dict]):
        self.layout = layout  # the record is the same in every schema version; the fields say what it holds
        record = [(name, "<i8") for name in META_FIELDS]
        record.append(("view_params", "<f4", fields["view_params"][0]))
        for name, (tail, dtype) in fields.items():
            if name != "view_params":
                record.append((name, dtype.newbyteorder("<"), tail))
        self.dtype = np.dtype(record)
        self.header = _npy_header(self.dtype)

    def static_files(self, labels: np.ndarray) -> Iterator[tuple[str, bytes]]:
        return iter(())  # every record carries its own keys and label

    def epoch_files(self, epoch: int, sample_index: np.ndarray) -> dict[str, bytes]:
        return {}  # every record carries its sample index

    def owns(self, key: str) -> bool:
        match = SHARD_KEY.fullmatch(key)
        return (match is not None and int(match["epoch"]) < self.layout.epochs
                and int(match["shard"]) < self.layout.shards_per_epoch)

    def encode(self, epoch: int, shard: int, start: int, fields: dict[str, np.ndarray], params: np.ndarray,
               sample_index: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
        records = np.zeros(len(params), dtype=self.dtype)
        records["epoch"] = epoch
        records["position"] = np.arange(start, start + len(params))
        records["sample"] = sample_index
        records["label"] = labels
        records["view_params"] = params
        for name, values in fields.items():
            records[name] = values
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for record in records:
                data = self.header + record.tobytes()
                info = tarfile.TarInfo(member_name(epoch, int(record["position"])))
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
        return {shard_key(epoch, shard): gzip.compress(out.getvalue(), compresslevel=6, mtime=0)}

    def shard_files(self, epoch: int, shard: int) -> list[str]:
        return [shard_key(epoch, shard)]

    def open(self, fetch: Callable[[str], bytes]) -> None:
        self._fetch = fetch

    def decode(self, epoch: int, shard: int, skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """The records of one shard as arrays (but the fields in `skip`), after checking
        each member's name and layout."""
        key = shard_key(epoch, shard)
        try:
            data = gzip.decompress(self._fetch(key))
        except (OSError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{key} is not a readable gzip file: {exc}") from None
        start, stop = self.layout.shard_range(shard)
        count = stop - start
        payloads = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for expected, info in zip(range(start, start + count), tar):
                    if info.name != member_name(epoch, expected):
                        raise ArchiveError(f"{key} holds {info.name} where {member_name(epoch, expected)} belongs")
                    payloads.append(data[info.offset_data: info.offset_data + info.size])
        except tarfile.TarError as exc:
            raise ArchiveError(f"{key} is not a readable tar file: {exc}") from None
        header = len(self.header)
        if len(payloads) != count or any(p[:header] != self.header or len(p) != header + self.dtype.itemsize for p in payloads):
            raise ArchiveError(f"{key} does not hold {count} records of this archive's layout")
        records = np.frombuffer(b"".join(p[header:] for p in payloads), dtype=self.dtype)
        if (records["epoch"] != epoch).any() or (records["position"] != np.arange(start, start + count)).any():
            raise ArchiveError(f"{key} holds records of other epochs or positions")
        # writable copies of each field with plain strides (a field of a record array is
        # strided, and ascontiguousarray keeps a one-record field's record-sized stride)
        out = {name: records[name].copy() for name in self.dtype.names if name not in META_FIELDS and name not in skip}
        out["sample_index"] = records["sample"].copy()
        out["label"] = records["label"].copy()
        return out
