"""Where an archive lives: a local folder or an fsspec URL (s3://, gs://, http(s)://, file://).

Every archive read and write goes through a `Location`, so both backends work on any
store the same way. Writes of whole objects are atomic: a local file is written beside
its name, fsynced and renamed into place; an object store shows a PUT only once it is
complete. Errors name the object and say what to do; nothing leaks a traceback.

Credentials and endpoints come the standard way (AWS_* variables, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS) or from `--storage-option KEY=VALUE`. fsspec caches one
filesystem per process and makes a fresh one in a forked child, so a DataLoader worker
that opens a Location gets its own connection pool.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import fsspec

from ..errors import ArchiveError, ConfigError

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

    def _fail(self, action: str, key: str, exc: BaseException) -> ArchiveError:
        where = f"{self.url}/{key}" if key else self.url
        return ArchiveError(f"cannot {action} {where}: {_reason(exc)}")

    def exists(self, key: str = "") -> bool:
        try:
            return self.fs.exists(self.path(key))
        except Exception as exc:  # noqa: BLE001 - remote stores raise many types
            raise self._fail("reach", key, exc) from None

    def read(self, key: str) -> bytes:
        """The bytes of `key`; an ArchiveError naming it when it is missing or unreachable."""
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise ArchiveError(f"{self.url}/{key} is missing") from None
        except Exception as exc:  # noqa: BLE001
            raise self._fail("read", key, exc) from None

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several small objects at once (concurrently on object stores)."""
        if not keys:
            return {}
        paths = [self.path(k) for k in keys]
        try:
            found = self.fs.cat(paths, on_error="return")
        except Exception as exc:  # noqa: BLE001
            raise self._fail("read", keys[0], exc) from None
        out = {}
        for key, path in zip(keys, paths):
            value = found.get(path)
            if isinstance(value, BaseException):
                if isinstance(value, FileNotFoundError):
                    raise ArchiveError(f"{self.url}/{key} is missing")
                raise self._fail("read", key, value)
            out[key] = value
        return out

    def write(self, key: str, data: bytes) -> None:
        """Write `key` whole and atomically."""
        if not self.writable:
            raise ConfigError(f"{self.url} is read-only (http); write archives to a local path, s3:// or gs://")
        path = self.path(key)
        try:
            if self.local:
                target = Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("write", key, exc) from None

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every object below `prefix` (recursively) with its size in bytes."""
        try:
            found = self.fs.find(self.path(prefix), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001
            raise self._fail("list", prefix, exc) from None
        root = self.root + "/"
        return {
            path[len(root):] if path.startswith(root) else path: int(info.get("size") or 0)
            for path, info in found.items()
            if info.get("type") != "directory"
        }

    def delete(self, key: str = "", recursive: bool = False) -> None:
        try:
            if self.fs.exists(self.path(key)):
                self.fs.rm(self.path(key), recursive=recursive)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("delete", key, exc) from None

    def is_file(self) -> bool:
        """Whether the root itself is a file (a mistaken --out)."""
        try:
            return self.fs.isfile(self.root)
        except Exception:  # noqa: BLE001
            return False
