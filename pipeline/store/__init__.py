"""Teacher archives: one writer and one reader over any backend (zarr, webdataset) and
any store (local folder, s3://, gs://, http(s)://).

Stages import only the names below; the submodules are the store's own business:
    archive    ArchiveWriter / ArchiveReader, the commit protocol, verification
    manifest   Manifest and its parts (typed, strictly parsed), plan and seal
    layout     Layout: the archive's shape and shards
    codecs     how logits become stored fields, one class per codec
    feature_codecs  how a named feature output becomes stored fields (pool, pca, dtype)
    backends   the Backend protocol and BACKENDS; zarr_store, wds_store implement it
    lease      the writer lease (one writer per archive)
    location   Location: every read and write, local or remote
"""

from .archive import (
    ArchiveReader,
    ArchiveWriter,
    UnfinishedArchive,
    added_teachers,
    file_entry,
    finished_archive_of,
    teacher_archive,
    unfinished_archive,
    verify_objects,
)
from .backends import BACKENDS, Backend, check_backend_name
from .codecs import (CODEC_NAMES, INT8_LEVELS, LOGPROB_STEP, Codec, DenseCodec, Int8Codec, NoLogitsCodec, TopKCodec,
                     check_codec_name, parse_codec)
from .feature_codecs import FEATURE_CODEC_NAMES, FeatureCodec, fit_projection, parse_output, projection_samples
from .layout import Layout, ManifestError
from .location import Location, write_local_atomic
from .manifest import (
    ARCHIVE_FORMAT,
    SCHEMA_VERSION,
    DatasetInfo,
    FileEntry,
    Manifest,
    ShardEntry,
    TeacherInfo,
    check_archive_matches,
    content_fingerprint,
    json_bytes,
    read_manifest,
    seal,
)

__all__ = [
    "ARCHIVE_FORMAT",
    "BACKENDS",
    "CODEC_NAMES",
    "INT8_LEVELS",
    "LOGPROB_STEP",
    "SCHEMA_VERSION",
    "ArchiveReader",
    "ArchiveWriter",
    "Backend",
    "Codec",
    "DatasetInfo",
    "DenseCodec",
    "FEATURE_CODEC_NAMES",
    "FeatureCodec",
    "FileEntry",
    "Int8Codec",
    "Layout",
    "Location",
    "Manifest",
    "ManifestError",
    "ShardEntry",
    "TeacherInfo",
    "NoLogitsCodec",
    "TopKCodec",
    "UnfinishedArchive",
    "added_teachers",
    "check_archive_matches",
    "check_backend_name",
    "check_codec_name",
    "content_fingerprint",
    "file_entry",
    "finished_archive_of",
    "fit_projection",
    "json_bytes",
    "parse_codec",
    "parse_output",
    "projection_samples",
    "read_manifest",
    "seal",
    "teacher_archive",
    "unfinished_archive",
    "verify_objects",
    "write_local_atomic",
]
