"""The backend interface: how an archive's views become stored objects, and back.

A backend turns one shard of encoded fields into whole objects (bytes by key) and a
verified shard's objects back into arrays; the archive writer and reader do all the
I/O, checksums and commit bookkeeping around it. `BACKENDS` names every backend this
kdpipe implements; config validation, the CLI and the tests all use it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np

from ..errors import ConfigError
from .layout import Fields, Layout, ManifestError

BACKENDS = ("zarr", "webdataset")  # the first is the default


class Backend(Protocol):
    """What the zarr and webdataset backends implement, each built from
    `(layout, fields, schema_version, files)`: `fields` are the arrays stored per
    position (`Manifest.fields`), `files` a finished archive's objects (empty when writing)."""

    name: str

    def static_files(self, labels: np.ndarray) -> Iterator[tuple[str, bytes]]:
        """The objects written once when an archive is created (metadata, labels): their
        size does not grow with the epochs."""
        ...

    def epoch_files(self, epoch: int, sample_index: np.ndarray) -> dict[str, bytes]:
        """The objects of one epoch as a whole (zarr: its sample index chunk, and in
        schema 1 its position index chunk), given the sample at each position; written
        and committed with the epoch's first shard, so nothing is written per epoch
        ahead of the teacher."""
        ...

    def owns(self, key: str) -> bool:
        """Whether `key` names an object this backend writes for an archive of its layout
        (what `cache-teacher --overwrite` may delete)."""
        ...

    def encode(self, epoch: int, shard: int, start: int, fields: dict[str, np.ndarray], params: np.ndarray,
               sample_index: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
        """The objects of one whole shard (positions [start, start + n) of `epoch`)."""
        ...

    def shard_files(self, epoch: int, shard: int) -> list[str]:
        """The keys of the objects `encode` writes for one shard."""
        ...

    def open(self, fetch: Callable[[str], bytes]) -> None:
        """Prepare to decode; `fetch(key)` returns an object's verified bytes."""
        ...

    def decode(self, epoch: int, shard: int, skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """Every stored array of one shard but those named in `skip` (zarr then fetches
        less), plus `sample_index` and `label` per position."""
        ...


def check_backend_name(name: str) -> None:
    """Refuse a `--format` this kdpipe does not write."""
    if name not in BACKENDS:
        raise ConfigError(f"--format must be one of {', '.join(BACKENDS)}, got {name!r}")


def make_backend(name: str, layout: Layout, fields: Fields, schema_version: int, files: dict | None = None) -> Backend:
    """The backend called `name` for an archive of `layout`, per-position `fields` and schema version."""
    if name == "zarr":
        from .zarr_store import ZarrBackend

        return ZarrBackend(layout, fields, schema_version, files or {})
    if name == "webdataset":
        from .wds_store import WebDatasetBackend

        return WebDatasetBackend(layout, fields, schema_version, files or {})
    raise ManifestError(f"backend {name!r} is unknown to this kdpipe (it reads {', '.join(BACKENDS)}); upgrade kdpipe")
