"""The writer lease: one cache-teacher process writes an unfinished archive at a time.

`writer.json` at the archive's root names the holder (host, pid, a random owner id)
and when it last committed a shard. It is created exclusively before anything else is
written, renewed after every commit, and deleted when the writer finishes or stops.
Two processes writing parts of one zarr shard silently lose rows, so a second writer
refuses while the holder lives, and takes the archive over once the holder is gone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from ..errors import ArchiveError
from .location import Location
from .manifest import json_bytes

LEASE = "writer.json"  # who is writing an unfinished archive
LEASE_SECONDS = 600  # a lease from another host not renewed for this long is abandoned
LEASE_FIELDS = frozenset({"owner", "host", "pid", "since", "renewed"})


class WriterLease:
    """One writer per archive at a time: `writer.json` names the process that holds the
    archive (host, pid, a random owner id) and when it last committed a shard.

    A second cache-teacher on the same archive refuses while the holder lives. The
    holder counts as gone when it ran on this host and its pid is dead (killed, crashed),
    or, from another host, when it has not renewed the lease for LEASE_SECONDS.
    """

    def __init__(self, location: Location):
        self.location = location
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.time(), "renewed": time.time()}

    def acquire(self) -> None:
        for _ in range(3):
            if self.location.create_exclusive(LEASE, json_bytes(self.record)):
                return
            current = self.location.read_if_present(LEASE)
            holder = parse_lease(current)
            if holder is not None and holder_alive(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
                raise ArchiveError(
                    f"archive {self.location} is being written by another cache-teacher (pid {holder['pid']} on "
                    f"{holder['host']}, since {since}); wait for it to finish, then re-run to check it"
                )
            if self.location.read_if_present(LEASE) == current:  # abandoned: take it over
                self.location.delete(LEASE)
        raise ArchiveError(f"archive {self.location}: could not take over the writer lease; re-run the command")

    def renew(self) -> None:
        """Refresh the lease after a commit; stop if another process has taken it."""
        holder = parse_lease(self.location.read_if_present(LEASE))
        if holder is None or holder["owner"] != self.record["owner"]:
            raise ArchiveError(
                f"archive {self.location}: another cache-teacher took over this archive; "
                "this run stops (its committed shards stay)"
            )
        self.record["renewed"] = time.time()
        self.location.write(LEASE, json_bytes(self.record))

    @contextmanager
    def kept(self, every: float = LEASE_SECONDS / 5) -> Iterator[None]:
        """Renew the lease every `every` seconds while the block runs: rank 0, waiting for
        the other ranks' shards, commits none of its own. Raises on exit if the lease was lost."""
        stop, failed = threading.Event(), []

        def renew() -> None:
            while not stop.wait(every):
                try:
                    self.renew()
                except Exception as exc:  # lost, or the store failed after its retries
                    failed.append(exc)
                    return

        thread = threading.Thread(target=renew, name="kdpipe-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if failed:
            raise failed[0]

    def release(self) -> None:
        holder = parse_lease(self.location.read_if_present(LEASE))
        if holder is not None and holder["owner"] == self.record["owner"]:
            self.location.delete(LEASE)


def parse_lease(data: bytes | None) -> dict | None:
    """The lease record in `data`, or None when there is none or it is not a lease."""
    try:
        record = json.loads(data) if data is not None else None
        return record if isinstance(record, dict) and LEASE_FIELDS <= set(record) else None
    except ValueError:
        return None


def holder_alive(holder: dict) -> bool:
    """Whether the process named by a lease record may still be writing: its pid exists
    on this host, or (another host) it renewed the lease less than LEASE_SECONDS ago."""
    if holder["host"] == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - holder["renewed"] < LEASE_SECONDS


def remove_dead_lease(location: Location) -> None:
    """Delete the lease of a writer that died before releasing it (a live one stays)."""
    holder = parse_lease(location.read_if_present(LEASE))
    if holder is not None and not holder_alive(holder):
        location.delete(LEASE)
