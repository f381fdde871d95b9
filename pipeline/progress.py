"""Progress on stderr and status lines, from rank 0 only: a rich bar on a terminal, and
elsewhere (nohup, a cluster's job log) one plain line every KDPIPE_PROGRESS_INTERVAL
seconds, so a log shows that a long job is alive and how far it has got."""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from .distributed import ranks
from .errors import ConfigError

console = Console(stderr=True, highlight=False)

PROGRESS_INTERVAL = "KDPIPE_PROGRESS_INTERVAL"  # seconds between progress lines when stderr is not a terminal
DEFAULT_PROGRESS_INTERVAL = 30.0


class _ViewsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} views/s" if task.speed else "- views/s", style="progress.data.speed")


@dataclass
class _LineTask:
    """One task of `ProgressLines`: `done` views of `total` since `started` (monotonic seconds)."""

    description: str
    total: int
    started: float
    done: int = 0

    def line(self, now: float) -> str:
        """e.g. `cache-teacher: 1,234/10,000 views  812 views/s  ETA 0:00:11`: the speed
        is the mean since the task started, the ETA the views left at that speed."""
        speed = self.done / (now - self.started) if now > self.started else 0.0
        eta = str(timedelta(seconds=round((self.total - self.done) / speed))) if speed > 0 else "-"
        return f"{self.description}: {self.done:,}/{self.total:,} views  {speed:,.0f} views/s  ETA {eta}"


class ProgressLines:
    """The progress of view-counting tasks as plain lines on stderr, one every `interval`
    seconds at most (the first one interval after the start): for logs, where a bar
    draws nothing. It offers the calls of rich's Progress that the stages make
    (add_task, advance, remove_task), so a stage need not care which of the two it got."""

    def __init__(self, interval: float):
        self.interval = interval
        self._tasks: dict[int, _LineTask] = {}
        self._ids = itertools.count()
        self._last_line = time.monotonic()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc_info) -> None:
        """Nothing to take down: unlike a bar, printed lines stay as they are."""

    def add_task(self, description: str, total: int) -> int:
        task = next(self._ids)
        self._tasks[task] = _LineTask(description, total, time.monotonic())
        return task

    def advance(self, task: int, count: int) -> None:
        self._tasks[task].done += count
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            say(self._tasks[task].line(now))

    def remove_task(self, task: int) -> None:
        del self._tasks[task]


def progress_interval() -> float:
    """Seconds between progress lines: $KDPIPE_PROGRESS_INTERVAL, else 30."""
    text = os.environ.get(PROGRESS_INTERVAL)
    if text is None:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        interval = float(text)
    except ValueError:
        interval = -1.0
    if not interval >= 0:
        raise ConfigError(f"{PROGRESS_INTERVAL} must be a number of seconds (0 or more), got {text!r}")
    return interval


def views_progress() -> Progress | ProgressLines:
    """The progress of tasks counting views, with views/s and the time left: a bar on a
    terminal, plain lines when stderr is a file or a pipe, nothing on ranks other than 0."""
    if not ranks().main:
        return Progress(disable=True)
    if not sys.stderr.isatty():
        return ProgressLines(progress_interval())
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _ViewsPerSecond(),
        TimeRemainingColumn(), console=console, transient=True,
    )


def say(message: str) -> None:
    """One status line on stderr (stdout stays free for results); from rank 0 only."""
    if not ranks().main:
        return
    console.print(message, soft_wrap=True, markup=False)
