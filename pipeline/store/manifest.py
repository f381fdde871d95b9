"""The archive manifest: what an archive holds, written last, checked on every read.

An archive without `manifest.json` is unfinished. `plan.json` holds the manifest-to-be
of an unfinished archive, so a re-run can tell whether it is completing the same job.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import first_difference, fingerprint
from ..errors import ArchiveError, ArchiveMismatchError
from .location import Location

ARCHIVE_FORMAT = "kdpipe-archive"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the stored bytes."""
    import numcodecs
    import numpy
    import torch
    import torchvision
    import zarr

    from .. import __version__

    return {
        "kdpipe": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": numpy.__version__,
    }


# Manifest fields that only a finished archive has, and fields that record where things
# were found rather than what they are: neither decides whether two runs are the same job.
MANIFEST_ONLY = ("shards", "files", "total_bytes", "manifest_fingerprint")
SEAL = "manifest_fingerprint"
INFORMATIONAL = (("dataset", "location"), ("teacher", "spec", "weights"))


def seal(manifest: dict) -> dict:
    """The manifest with its own fingerprint (over every other field) added, so an edit
    by hand or a damaged copy is caught when it is read."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return body | {SEAL: fingerprint(body)}


def job_identity(plan: dict) -> dict:
    """The part of a plan or manifest that defines the job: two runs with equal identities
    write identical archives."""
    identity = json.loads(json.dumps({k: v for k, v in plan.items() if k not in MANIFEST_ONLY}))
    for *parents, leaf in INFORMATIONAL:
        node = identity
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return identity


def json_bytes(obj: Any) -> bytes:
    """The stored form of a JSON document: indented, keys sorted, newline-terminated."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _parse_json(data: bytes, location: Location, key: str, what: str) -> dict:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ArchiveError(f"the {what} {location}/{key} is not valid JSON ({exc}); fetch a fresh copy") from None


def read_json(location: Location, key: str, what: str) -> dict:
    return _parse_json(location.read(key), location, key, what)


def read_manifest(location: Location | str | os.PathLike, storage_options: dict | None = None) -> dict:
    """The manifest of a finished archive; a clear error for anything else."""
    if not isinstance(location, Location):
        location = Location(location, storage_options)
    data = location.read_if_present(MANIFEST)
    if data is None:
        if location.read_if_present(PLAN) is not None:
            raise ArchiveError(
                f"archive {location} is unfinished (no {MANIFEST}); re-run the cache-teacher command that made it to complete it"
            )
        if not location.exists():
            raise ArchiveError(f"archive {location} does not exist")
        raise ArchiveError(f"{location} is not a kdpipe archive (no {MANIFEST})")
    manifest = _parse_json(data, location, MANIFEST, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"{location}/{MANIFEST} is not a kdpipe archive manifest")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ArchiveError(
            f"archive {location} has schema version {version}; this kdpipe reads up to {SCHEMA_VERSION}: upgrade kdpipe"
        )
    if SEAL not in manifest:
        raise ArchiveError(
            f"the manifest of archive {location} has no {SEAL} (written by a pre-release kdpipe, or edited); "
            "re-create the archive with cache-teacher --overwrite"
        )
    if seal(manifest)[SEAL] != manifest[SEAL]:
        raise ArchiveError(
            f"the manifest of archive {location} was changed after it was written (its {SEAL} does not match); "
            "fetch a fresh copy"
        )
    return manifest


def check_archive_matches(manifest: dict, location: str, **expected: Any) -> None:
    """Refuse an archive whose fields differ from what the caller expects, naming the field.

    Keyword names are manifest sections with `__` for dots, e.g.
    `dataset__fingerprint=...`, `recipe={...}`, `teacher__fingerprint=...`.
    """
    for key, want in expected.items():
        path = key.split("__")
        have: Any = manifest
        for part in path:
            have = have.get(part) if isinstance(have, dict) else None
        where = first_difference(want, have, ".".join(path))
        if where is not None:
            raise ArchiveMismatchError(
                f"archive {location} does not match: {where} is {_short(_at(have, where, path))} in the archive "
                f"but {_short(_at(want, where, path))} here"
            )


def _at(value: Any, where: str, path: list[str]) -> Any:
    """The value at dotted `where` inside `value`, which sits at `path`."""
    rest = where[len(".".join(path)):].lstrip(".")
    for part in filter(None, rest.replace("[", ".").replace("]", "").split(".")):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return value
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
