"""Teacher archives: one writer and one reader over any backend (zarr, webdataset) and
any store (local folder, s3://, gs://, http(s)://)."""

from .archive import ArchiveReader, ArchiveWriter, plan_layout
from .codecs import CODEC_NAMES, Codec, DenseCodec, TopKCodec, parse_codec
from .location import Location, write_local_atomic
from .manifest import ARCHIVE_FORMAT, SCHEMA_VERSION, check_archive_matches, read_manifest

__all__ = [
    "ARCHIVE_FORMAT",
    "CODEC_NAMES",
    "SCHEMA_VERSION",
    "ArchiveReader",
    "ArchiveWriter",
    "Codec",
    "DenseCodec",
    "Location",
    "TopKCodec",
    "check_archive_matches",
    "parse_codec",
    "plan_layout",
    "read_manifest",
    "write_local_atomic",
]
