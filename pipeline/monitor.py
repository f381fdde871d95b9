"""TensorBoard event files beside a run's metrics.jsonl, so `tensorboard --logdir RUNS`
follows training live: each metrics line becomes one scalar per number, at step = its
epoch. Written only when the `tensorboard` package is installed (`pip install
'kdpipe[tensorboard]'`); without it, nothing is written and nothing is said."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any


@functools.cache
def _summary_writer() -> type | None:
    """torch's SummaryWriter, or None when the tensorboard package is missing (its import
    fails then). Imported on first use: most commands never log a scalar."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class ScalarLog:
    """The event file of one run directory, opened at the first record this process
    writes. That record's epoch is the purge step: TensorBoard hides the events of that
    epoch and later that an interrupted run wrote before it was killed, so a resumed run
    shows each epoch once, as metrics.jsonl does."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._writer: Any = None

    def append(self, record: dict) -> None:
        """Log every number of one metrics record except `epoch` itself, which is the step."""
        writer_class = _summary_writer()
        if writer_class is None:
            return
        epoch = record["epoch"]
        if self._writer is None:
            self._writer = writer_class(str(self.folder), purge_step=epoch)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, epoch)
        self._writer.flush()  # on disk now: a killed run keeps every epoch it logged

    def close(self) -> None:
        """Close the event file. A failure to flush it (a full disk) is not raised: it
        would hide the error that ended the run, and metrics.jsonl reports its own."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
