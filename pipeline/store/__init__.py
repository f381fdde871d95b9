"""Teacher archives: the manifest, and the zarr backend behind `open_writer` / `open_reader`."""

from .manifest import ARCHIVE_FORMAT, SCHEMA_VERSION, check_archive_matches, read_manifest
from .zarr_store import ZarrReader as ArchiveReader
from .zarr_store import ZarrWriter as ArchiveWriter

__all__ = [
    "ARCHIVE_FORMAT",
    "SCHEMA_VERSION",
    "ArchiveReader",
    "ArchiveWriter",
    "check_archive_matches",
    "read_manifest",
]
