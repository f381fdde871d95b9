"""The shape of an archive: how many views it holds and how they are cut into shards.

`Layout` is the manifest's `layout` section as a frozen dataclass. Both backends and
the writer and reader take their sizes from it, so none of them unpacks the manifest
by hand. `parse_*` helpers here are shared by every manifest section: a field of the
wrong type is refused with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import ArchiveError

# Aim for shards of about this many uncompressed bytes, and (zarr) chunks, the unit of
# decompression on read, of about this many.
TARGET_SHARD_BYTES = 16 << 20
TARGET_CHUNK_BYTES = 256 << 10
TARGET_BUFFER_BYTES = 256 << 20


Fields = dict[str, tuple[tuple[int, ...], np.dtype]]  # stored array name -> (shape after positions, dtype)


class ManifestError(ArchiveError):
    """A manifest (or plan) field is missing, of the wrong type, or contradicts another."""


def parse_int(data: Any, field: str, minimum: int = 0) -> int:
    """An integer field (not a bool, not a float) of at least `minimum`."""
    if not isinstance(data, int) or isinstance(data, bool):
        raise ManifestError(f"{field} must be an integer, got {data!r}")
    if data < minimum:
        raise ManifestError(f"{field} must be at least {minimum}, got {data}")
    return data


NOUNS = {str: "a string", list: "a list", dict: "an object"}


def parse_typed(data: Any, field: str, kind: type) -> Any:
    """`data` itself, if it is a `kind` (str, list or dict); otherwise the error naming `field`."""
    if not isinstance(data, kind):
        raise ManifestError(f"{field} must be {NOUNS[kind]}, got {data!r}")
    return data


def parse_object(data: Any, field: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A JSON object with exactly `keys` (plus any of `optional`)."""
    parse_typed(data, field, dict)
    missing = [key for key in keys if key not in data]
    if missing:
        raise ManifestError(f"{field}.{missing[0]} is missing")
    unknown = sorted(set(data) - set(keys) - set(optional))
    if unknown:
        raise ManifestError(f"{field}.{unknown[0]} is not a field of a kdpipe manifest (schema version 1 to 3)")
    return data


def parse_str_list(data: Any, field: str, allow_none: bool = False) -> tuple[str, ...] | None:
    if data is None and allow_none:
        return None
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ManifestError(f"{field} must be a list of strings{' or null' if allow_none else ''}, got {data!r}")
    return tuple(data)


LAYOUT_KEYS = ("epochs", "num_samples", "views_per_sample", "num_classes", "view_param_fields",
               "positions_per_shard", "positions_per_chunk")


@dataclass(frozen=True)
class Layout:
    """Epochs x positions x views x classes, and the positions per shard (the unit of
    writing, one writer each) and per chunk (zarr's unit of decompression)."""

    epochs: int
    num_samples: int
    views_per_sample: int
    num_classes: int
    view_param_fields: tuple[str, ...]
    positions_per_shard: int
    positions_per_chunk: int

    @property
    def shards_per_epoch(self) -> int:
        return -(-self.num_samples // self.positions_per_shard)

    @property
    def views(self) -> int:
        """Views in the whole archive."""
        return self.epochs * self.num_samples * self.views_per_sample

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Positions [start, stop) of shard `shard` of any epoch."""
        start = shard * self.positions_per_shard
        return start, min(start + self.positions_per_shard, self.num_samples)

    def units(self) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, shard, start, stop) of every shard, in training order."""
        for epoch in range(self.epochs):
            for shard in range(self.shards_per_epoch):
                yield epoch, shard, *self.shard_range(shard)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "num_samples": self.num_samples,
            "views_per_sample": self.views_per_sample,
            "num_classes": self.num_classes,
            "view_param_fields": list(self.view_param_fields),
            "positions_per_shard": self.positions_per_shard,
            "positions_per_chunk": self.positions_per_chunk,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Layout:
        """The layout of a manifest, refusing wrong types and chunks that do not divide shards."""
        data = parse_object(data, "layout", LAYOUT_KEYS)
        counts = {key: parse_int(data[key], f"layout.{key}", minimum=1) for key in LAYOUT_KEYS if key != "view_param_fields"}
        layout = cls(view_param_fields=parse_str_list(data["view_param_fields"], "layout.view_param_fields"), **counts)
        if layout.positions_per_shard % layout.positions_per_chunk:
            raise ManifestError(
                f"layout.positions_per_chunk {layout.positions_per_chunk} does not divide "
                f"layout.positions_per_shard {layout.positions_per_shard}"
            )
        if layout.positions_per_shard > -(-layout.num_samples // layout.positions_per_chunk) * layout.positions_per_chunk:
            raise ManifestError(
                f"layout.positions_per_shard {layout.positions_per_shard} exceeds layout.num_samples "
                f"{layout.num_samples} by more than a chunk"
            )
        return layout

    @classmethod
    def plan(cls, epochs: int, num_samples: int, views_per_sample: int, num_classes: int,
             view_param_fields: tuple[str, ...], bytes_per_position: int, positions_per_shard: int | None = None,
             buffer_bytes_per_position: int = 0) -> Layout:
        """The layout of a new archive: chunks divide shards, shards cover positions.

        A shard holds about TARGET_SHARD_BYTES stored, and the writer's float32 buffer of a
        shard (`buffer_bytes_per_position` each) at most TARGET_BUFFER_BYTES: a compact codec
        (top-k) would otherwise make shards of so many positions that their full-width
        logits fill the memory while they are computed. `positions_per_shard` overrides
        the shard size (rounded up to whole chunks).
        """
        chunk = max(1, min(num_samples, TARGET_CHUNK_BYTES // bytes_per_position))
        by_buffer = TARGET_BUFFER_BYTES // buffer_bytes_per_position if buffer_bytes_per_position else num_samples
        shard = positions_per_shard or max(chunk, min(TARGET_SHARD_BYTES // bytes_per_position, by_buffer))
        shard = min(shard, num_samples)
        chunk = min(chunk, shard)
        shard = -(-shard // chunk) * chunk  # a whole number of chunks
        return cls(epochs, num_samples, views_per_sample, num_classes, tuple(view_param_fields), shard, chunk)
