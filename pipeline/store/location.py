"""Where an archive lives: a local folder or an fsspec URL (s3://, gs://, http(s)://, file://).

Every archive read and write goes through a `Location`, so both backends work on any
store the same way. Writes of whole objects are atomic: a local file is written beside
its name, fsynced and renamed into place; an object store shows a PUT only once it is
complete. A remote operation that fails for a reason other than "missing" or
"forbidden" is retried with exponential backoff (0.25 s, doubling, 5 tries in all), on
top of whatever retries the store library makes itself. Errors name the object and say
what to do; nothing leaks a traceback.

Credentials and endpoints come the standard way (AWS_* variables, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS) or from `--storage-option KEY=VALUE`. fsspec caches one
filesystem per process and makes a fresh one in a forked child, so a DataLoader worker
that opens a Location gets its own connection pool.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import fsspec

from ..errors import NO_SPACE, ArchiveError, ConfigError, KdpipeError

T = TypeVar("T")
RETRIES = 4  # further tries of a failed remote operation
RETRY_DELAY = 0.25  # seconds before the first retry, doubled before each next one

READ_WRITE_SCHEMES = ("file", "local", "s3", "s3a", "gs", "gcs", "memory")
READ_ONLY_SCHEMES = ("http", "https")
PACKAGE_FOR_SCHEME = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}

# The store libraries log their retries and fallbacks (gcsfs with whole tracebacks). With
# no logging configured, Python would print those records on stderr, around the one-line
# error that a failure becomes; a NullHandler keeps them for whoever configures logging.
for _library in ("fsspec", "s3fs", "gcsfs"):
    logging.getLogger(_library).addHandler(logging.NullHandler())


def is_local(url: str | os.PathLike) -> bool:
    return fsspec.utils.get_protocol(str(url)) in ("file", "local")


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a storage exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Location:
    """The root of an archive: keys are '/'-separated paths below it."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = str(url).rstrip("/") or "/"
        protocol = fsspec.utils.get_protocol(self.url)
        if protocol not in READ_WRITE_SCHEMES + READ_ONLY_SCHEMES:
            raise ConfigError(
                f"unknown URL scheme {protocol}:// in {self.url}; use a local path, file://, s3://, gs:// or http(s)://"
            )
        self.local = protocol in ("file", "local")
        self.writable = protocol not in READ_ONLY_SCHEMES
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError:
            package = PACKAGE_FOR_SCHEME.get(protocol, protocol)
            raise ConfigError(f"{protocol}:// needs the {package} package: pip install 'kdpipe[remote]'") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad storage options for {self.url}: {_reason(exc)}") from None
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def path(self, key: str) -> str:
        """The filesystem path of `key` (for local locations, a path on disk)."""
        return f"{self.root}/{key}" if key else self.root

    def _call(self, action: str, key: str, call: Callable[[], T]) -> T:
        """Run one store operation. A remote failure other than "missing" or "forbidden"
        may be transient (a dropped connection, a 5xx), so it is retried with exponential
        backoff before it becomes one ArchiveError naming the object."""
        for attempt in range(RETRIES + 1):
            try:
                return call()
            except (FileNotFoundError, PermissionError, KdpipeError):
                raise
            except Exception as exc:  # noqa: BLE001 - remote stores raise many types
                if self.local or attempt == RETRIES:
                    where = f"{self.url}/{key}" if key else self.url
                    tries = "" if self.local else f" (after {RETRIES + 1} tries)"
                    advice = ""
                    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                        advice = "; free some space and re-run the same command (committed shards are kept)"
                    raise ArchiveError(f"cannot {action} {where}{tries}: {_reason(exc)}{advice}") from None
                time.sleep(RETRY_DELAY * 2**attempt)
        raise AssertionError("unreachable")

    def _denied(self, action: str, key: str, exc: PermissionError) -> ArchiveError:
        return ArchiveError(f"cannot {action} {self.url}/{key}: permission denied ({_reason(exc)}); check the credentials")

    def exists(self, key: str = "") -> bool:
        try:
            return self._call("reach", key, lambda: self.fs.exists(self.path(key)))
        except PermissionError as exc:
            raise self._denied("reach", key, exc) from None

    def read(self, key: str) -> bytes:
        """The bytes of `key`; an ArchiveError naming it when it is missing or unreachable."""
        data = self.read_if_present(key)
        if data is None:
            raise ArchiveError(f"{self.url}/{key} is missing")
        return data

    def read_if_present(self, key: str) -> bytes | None:
        """The bytes of `key`, or None when it does not exist (other failures are errors:
        some stores answer an existence check with "no" when they are merely down)."""
        try:
            return self._call("read", key, lambda: self.fs.cat_file(self.path(key)))
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise self._denied("read", key, exc) from None

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several small objects at once (concurrently on object stores); any that fail
        are read again one by one, with retries."""
        paths = [self.path(k) for k in keys]
        found = self._call("read", keys[0], lambda: self.fs.cat(paths, on_error="return")) if keys else {}
        return {
            key: value if isinstance(value := found.get(path), bytes) else self.read(key)
            for key, path in zip(keys, paths)
        }

    def write(self, key: str, data: bytes) -> None:
        """Write `key` whole and atomically."""
        if not self.writable:
            raise ConfigError(f"{self.url} is read-only (http); write archives to a local path, s3:// or gs://")
        try:
            if self.local:
                self._call("write", key, lambda: write_local_atomic(Path(self.path(key)), data))
            else:
                self._call("write", key, lambda: self.fs.pipe_file(self.path(key), data))
        except (FileNotFoundError, PermissionError) as exc:
            raise ArchiveError(f"cannot write {self.url}/{key}: {_reason(exc)}") from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; False if it does. Atomic on a local
        disk (O_EXCL); on object stores, a write followed by a read-back, so the later of
        two racing writers is the one that keeps the object."""
        if self.local:
            path = Path(self.path(key))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            except OSError as exc:
                raise ArchiveError(f"cannot write {self.url}/{key}: {_reason(exc)}") from None
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.read_if_present(key) is not None:
            return False
        self.write(key, data)
        time.sleep(0.5)  # let a racing writer's PUT land, then see whose object stayed
        return self.read_if_present(key) == data

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every object below `prefix` (recursively) with its size in bytes."""
        try:
            found = self._call("list", prefix, lambda: self.fs.find(self.path(prefix), detail=True))
        except FileNotFoundError:
            return {}
        except PermissionError as exc:
            raise self._denied("list", prefix, exc) from None
        root = self.root + "/"
        return {
            path[len(root):] if path.startswith(root) else path: int(info.get("size") or 0)
            for path, info in found.items()
            if info.get("type") != "directory"
        }

    def delete(self, key: str = "", recursive: bool = False) -> None:
        def remove():
            if self.fs.exists(self.path(key)):
                self.fs.rm(self.path(key), recursive=recursive)

        try:
            self._call("delete", key, remove)
        except (FileNotFoundError, PermissionError) as exc:
            raise ArchiveError(f"cannot delete {self.url}/{key}: {_reason(exc)}") from None

    def is_file(self) -> bool:
        """Whether the root itself is a file (a mistaken --out)."""
        try:
            return self.fs.isfile(self.root)
        except Exception:  # noqa: BLE001
            return False


def write_local_atomic(target: Path, data: bytes) -> None:
    """Write beside `target`, fsync, rename into place: a kill or a failure leaves the
    old file or the new one, never a torn one, and no temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
