"""Where an archive lives: a local folder or an fsspec URL (s3://, gs://, http(s)://, file://).

Every archive read and write goes through a `Location`, so both backends work on any
store the same way. Writes of whole objects are atomic: a local file is written beside
its name, fsynced and renamed into place; an object store shows a PUT only once it is
complete. A remote operation that fails for a reason other than "missing" or
"forbidden" is retried with exponential backoff (0.25 s, doubling, 5 tries in all).

A store that stops answering must not stall a run: every remote request has a connect
and a read timeout, and kdpipe's retries are the only ones (the store libraries' own
retry loops are set to one attempt unless the storage options say otherwise), so an
operation ends within `remote_operation_bound()` seconds, then fails with one line
naming the object and the endpoint. Errors say what to do; nothing leaks a traceback.

Credentials and endpoints come the standard way (AWS_* variables, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS) or from `--storage-option KEY=VALUE`. fsspec caches one
filesystem per process and makes a fresh one in a forked child, so a DataLoader worker
that opens a Location gets its own connection pool.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import fsspec

from ..errors import NO_SPACE, ArchiveError, ConfigError, KdpipeError

T = TypeVar("T")
RETRIES = 4  # further tries of a failed remote operation
RETRY_DELAY = 0.25  # seconds before the first retry, doubled before each next one
CONNECT_TIMEOUT = 10.0  # seconds to open a connection to a remote store
READ_TIMEOUT = 30.0  # seconds a remote store may stay silent while kdpipe waits for its answer

# write_local_atomic's temporary files: `.NAME.tmp-PID-XXXXXXXX` beside the file NAME
TEMPORARY_FILE = re.compile(r"\.(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}")

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


def remote_operation_bound() -> float:
    """The most seconds one remote operation takes before it fails: every try waits at
    most a connect and a read timeout, and the tries are separated by the backoff delays."""
    backoff = sum(RETRY_DELAY * 2**attempt for attempt in range(RETRIES))
    return (RETRIES + 1) * (CONNECT_TIMEOUT + READ_TIMEOUT) + backoff


def temporary_target(key: str) -> str | None:
    """The key that `key` was to become when it is a temporary file of an atomic local
    write (`dir/.NAME.tmp-PID-XXXXXXXX` -> `dir/NAME`); None for any other key."""
    folder, _, name = key.rpartition("/")
    match = TEMPORARY_FILE.fullmatch(name)
    if match is None:
        return None
    return f"{folder}/{match['name']}" if folder else match["name"]


def _nested(options: dict, key: str, url: str) -> dict:
    """The dict at `options[key]`, created when absent; an error when it is not a dict."""
    value = options.setdefault(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"bad storage options for {url}: {key} must be a mapping, got {value!r}")
    return value


def with_timeouts(protocol: str, options: dict, url: str) -> dict:
    """`options` with kdpipe's connect and read timeouts, and the store library's own
    retries turned down to one attempt, wherever the user's options set none: kdpipe's
    retries (RETRIES) are then the only ones, so the time until an error is bounded."""
    options = copy.deepcopy(options)
    if protocol in ("s3", "s3a"):  # botocore's Config, through s3fs
        config = _nested(options, "config_kwargs", url)
        config.setdefault("connect_timeout", CONNECT_TIMEOUT)
        config.setdefault("read_timeout", READ_TIMEOUT)
        config.setdefault("retries", {"total_max_attempts": 1})
    elif protocol in ("gs", "gcs"):  # gcsfs: one timeout per request
        options.setdefault("timeout", CONNECT_TIMEOUT + READ_TIMEOUT)
    elif protocol in ("http", "https"):  # aiohttp, through fsspec's HTTPFileSystem
        import aiohttp

        client = _nested(options, "client_kwargs", url)
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                           sock_read=READ_TIMEOUT))
    return options


def _endpoint(protocol: str, options: dict, url: str) -> str:
    """Where a remote store is reached, for error messages: the endpoint URL the options
    give, else the store's own."""
    client = options.get("client_kwargs")
    given = options.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, dict) else None)
    if given:
        return str(given)
    if protocol in ("http", "https"):
        return "/".join(url.split("/")[:3])
    if protocol in ("s3", "s3a"):
        return os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")
    return "https://storage.googleapis.com"


def short_reason(exc: BaseException) -> str:
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
        options = storage_options or {}
        self.endpoint = None if self.local or protocol == "memory" else _endpoint(protocol, options, self.url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **with_timeouts(protocol, options, self.url))
        except ImportError:
            package = PACKAGE_FOR_SCHEME.get(protocol, protocol)
            raise ConfigError(f"{protocol}:// needs the {package} package: pip install 'kdpipe[remote]'") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad storage options for {self.url}: {short_reason(exc)}") from None
        if protocol in ("s3", "s3a"):
            self.fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option): kdpipe retries
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def below(self, prefix: str) -> Location:
        """The location of the objects below `prefix`, on the same store and filesystem."""
        inner = copy.copy(self)
        inner.url, inner.root = f"{self.url}/{prefix}", self.path(prefix)
        return inner

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
                    tries += f" via {self.endpoint}" if self.endpoint else ""
                    raise ArchiveError(f"cannot {action} {where}{tries}: {short_reason(exc)}{_advice(exc)}") from None
                time.sleep(RETRY_DELAY * 2**attempt)
        raise AssertionError("unreachable")

    def _denied(self, action: str, key: str, exc: PermissionError) -> ArchiveError:
        return ArchiveError(f"cannot {action} {self.url}/{key}: permission denied ({short_reason(exc)}); check the credentials")

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
        """Several small objects at once (concurrently on object stores). A failure of the
        store retries the whole batch, so the batch takes no longer than one operation;
        a missing or forbidden object is then read alone, for its own error."""
        paths = [self.path(k) for k in keys]

        def fetch() -> dict:
            found = self.fs.cat(paths, on_error="return")
            failed = [value for value in found.values()
                      if isinstance(value, Exception) and not isinstance(value, (FileNotFoundError, PermissionError))]
            if failed:
                raise failed[0]
            return found

        found = self._call("read", keys[0], fetch) if keys else {}
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
            raise ArchiveError(f"cannot write {self.url}/{key}: {short_reason(exc)}") from None

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
                raise ArchiveError(f"cannot write {self.url}/{key}: {short_reason(exc)}") from None
            try:
                with os.fdopen(descriptor, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:  # a full disk: name the file, and leave no empty one behind
                path.unlink(missing_ok=True)
                raise ArchiveError(f"cannot write {self.url}/{key}: {short_reason(exc)}{_advice(exc)}") from None
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
            raise ArchiveError(f"cannot delete {self.url}/{key}: {short_reason(exc)}") from None

    def is_file(self) -> bool:
        """Whether the root itself is a file (a mistaken --out)."""
        try:
            return self.fs.isfile(self.root)
        except Exception:  # noqa: BLE001
            return False


def _advice(exc: BaseException) -> str:
    """What to do after a failed write: on a full disk, free space and re-run."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return "; free some space and re-run the same command (committed shards are kept)"
    return ""


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
