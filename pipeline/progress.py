"""Progress bars (rich, on stderr, off when stderr is not a terminal) and status lines."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from .distributed import ranks

console = Console(stderr=True, highlight=False)


class _ViewsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} views/s" if task.speed else "- views/s", style="progress.data.speed")


def views_progress() -> Progress:
    """A progress bar counting views, with views/s."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _ViewsPerSecond(),
        TimeRemainingColumn(), console=console, disable=not (sys.stderr.isatty() and ranks().main), transient=True,
    )


def say(message: str) -> None:
    """One status line on stderr (stdout stays free for results); from rank 0 only."""
    if not ranks().main:
        return
    console.print(message, soft_wrap=True, markup=False)
