"""The errors a user can cause. The CLI prints their message on one line and exits 2."""

import errno

# errnos of a full disk, a quota, a file-size limit: the user frees space and re-runs
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception (its type's name when it says nothing), to
    quote in a one-line error."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


class KdpipeError(Exception):
    """Base class of every error that is the user's to fix (bad input, mismatched archive)."""

    def __init__(self, message: str):
        # torch's DataLoader re-raises a worker's exception as `ExcType(text)`, where text is
        # the worker's whole traceback; keep only the original one-line message.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class ConfigError(KdpipeError):
    """An option or spec is invalid."""


class DataError(KdpipeError):
    """A data source is missing, empty or unreadable."""


class ModelError(KdpipeError):
    """A model cannot be built, or its weights do not fit it."""


class ArchiveError(KdpipeError):
    """An archive is missing, unfinished, damaged or already exists."""


class ArchiveMismatchError(ArchiveError):
    """An archive was made for another dataset, recipe or teacher than the one asked for."""


class TrainingError(KdpipeError):
    """Training cannot go on (for example a non-finite loss)."""
