"""`kdpipe report`: one picture and one table of train-student runs, from their run
directories alone, so runs can be compared side by side after (or while) they train.

For each run it reads metrics.jsonl (a line per finished epoch: a run still training
is shown up to its last one), config.json and, once the run is finished, summary.json;
into the output folder it writes

    report.png   a panel per figure per epoch (train loss, val top-1 with the EMA
                 student's dotted beside it, val top-5, top-1 agreement with the
                 teacher, KL(teacher || student)), each run one line of its own
                 colour and dash in every panel; panels no run has are left out
    report.md    the runs' final figures as a markdown table, under the picture
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DataError
from .rundir import CONFIG, METRICS, SUMMARY

PLOT, TABLE = "report.png", "report.md"
# (metrics key, panel title), in the order the panels are drawn
PANELS = (
    ("loss", "train loss"),
    ("val_top1", "val top-1 %"),
    ("val_top5", "val top-5 %"),
    ("val_agreement", "top-1 agreement with the teacher %"),
    ("val_kl", "KL(teacher || student)"),
)
EMA_KEY = "val_top1_ema"  # drawn dotted in the val_top1 panel
# (metrics key, column header) of the final figures in report.md
COLUMNS = (
    ("val_top1", "val top-1 %"),
    (EMA_KEY, "EMA val top-1 %"),
    ("val_top5", "val top-5 %"),
    ("val_agreement", "agreement %"),
    ("val_kl", "KL"),
    ("loss", "train loss"),
)
DASHES = ("-", "--", "-.", ":")  # with the colour, tells apart runs whose lines coincide (cached and online KD)
LOG_EPOCHS = 10  # runs whose lengths differ this many times or more share a log-scale epoch axis
MARKED_EPOCHS = 30  # a run of up to this many epochs has a dot at each


@dataclass(frozen=True)
class RunRecord:
    """What a report shows of one run directory."""

    name: str
    metrics: list[dict]
    config: dict
    summary: dict | None  # None while the run is unfinished

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The epochs at which `key` has a number, and those numbers."""
        points = [(m["epoch"], m[key]) for m in self.metrics
                  if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        return [epoch for epoch, _ in points], [value for _, value in points]


def read_run(path: Path, name: str) -> RunRecord:
    """The run directory at `path`, checked: a folder holding a train-student run with
    at least one finished epoch, whose files are JSON."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give run directories (train-student's --out)")
    if not (path / METRICS).exists():
        if not (path / CONFIG).exists():
            raise ConfigError(f"{path} is not a train-student run directory (it has no {METRICS} or {CONFIG})")
        raise DataError(f"{path} has no finished epoch yet ({METRICS} is missing); report it after its first epoch")
    metrics = []
    for number, line in enumerate((path / METRICS).read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            record["epoch"] = int(record["epoch"])
        except (ValueError, TypeError, KeyError):
            raise DataError(f"line {number} of {path / METRICS} is damaged (not a JSON object with an epoch)") from None
        metrics.append(record)
    if not metrics:
        raise DataError(f"{path} has no finished epoch yet ({METRICS} is empty); report it after its first epoch")
    return RunRecord(name, metrics, _read_json(path / CONFIG) or {}, _read_json(path / SUMMARY))


def _read_json(path: Path) -> dict | None:
    """A JSON object file of a run directory; None when it is not there."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise DataError(f"{path} is damaged (not a JSON object)")
    return value


def write_report(run_dirs: list[str], out: str) -> dict:
    """Read the run directories, write report.png and report.md into `out` (replacing
    those two files) and return their paths and the table."""
    paths = [Path(run_dir) for run_dir in run_dirs]
    names = [path.resolve().name for path in paths]
    if len(set(names)) < len(names):  # e.g. a/seed0 and b/seed0: the legend needs the whole path
        names = [str(path) for path in paths]
    runs = [read_run(path, name) for path, name in zip(paths, names)]
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the report folder {folder}: {exc.strerror or exc}; choose another --out") from None
    plot_runs(runs, folder / PLOT)
    table = format_table(runs)
    (folder / TABLE).write_text(f"# kdpipe report\n\n![figures per epoch]({PLOT})\n\n{table}\n")
    return {"plot": str(folder / PLOT), "table": str(folder / TABLE), "markdown": table}


def plot_runs(runs: list[RunRecord], path: Path) -> None:
    """One figure, a panel per figure some run has, a line per run (see the module's
    docstring), saved as a PNG. Drawn on matplotlib's Agg canvas, without pyplot: no
    display is needed and no global figure state is left behind."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(key, title) for key, title in PANELS if any(run.series(key)[0] for run in runs)]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.3 * rows + 0.5), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    lengths = [run.metrics[-1]["epoch"] for run in runs]
    log_epochs = max(lengths) >= LOG_EPOCHS * min(lengths)
    emas = any(run.series(EMA_KEY)[0] for run in runs)
    for axis, (key, title) in zip(axes, panels):
        for index, run in enumerate(runs):
            style = {"color": f"C{index % 10}", "linestyle": DASHES[index % len(DASHES)]}
            epochs, values = run.series(key)
            marker = "o" if len(epochs) <= MARKED_EPOCHS else None  # dots show single epochs; hundreds blur
            axis.plot(epochs, values, marker=marker, markersize=3, linewidth=1.8, label=run.name, **style)
            if key == "val_top1" and emas:
                axis.plot(*run.series(EMA_KEY), color=style["color"], linestyle=":", linewidth=1.2)
        axis.set_title(f"{title} (dotted: EMA)" if key == "val_top1" and emas else title, fontsize=10)
        axis.set_xlabel("epoch (log scale)" if log_epochs else "epoch", fontsize=9)
        if log_epochs:
            axis.set_xscale("log")
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        axis.grid(alpha=0.3)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 4), fontsize=9, frameon=False)
    figure.savefig(path)


def format_table(runs: list[RunRecord]) -> str:
    """The final figures of each run (its last epoch's) as a markdown table; a column
    only for figures some run has. `epochs` reads "3 of 10" while a run is unfinished."""
    columns = [(key, header) for key, header in COLUMNS if any(run.series(key)[0] for run in runs)]
    lines = ["| run | mode | student | epochs | " + " | ".join(header for _, header in columns) + " | views/s | wall s |",
             "|---|---|---|---:|" + "---:|" * (len(columns) + 2)]
    for run in runs:
        last, summary, config = run.metrics[-1], run.summary or {}, run.config
        epochs = f"{last['epoch']}" if run.summary else f"{last['epoch']} of {config.get('epochs', '?')}"
        student = summary.get("student") or (config.get("student") or {}).get("name", "?")
        figures = [_number(run.series(key)[1][-1] if run.series(key)[1] else None) for key, _ in columns]
        cells = [run.name, str(config.get("mode", "?")), f"`{student}`", epochs, *figures,
                 _number(summary.get("views_per_sec"), "{:,.0f}"), _number(summary.get("wall_seconds"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None, form: str = "{:.4g}") -> str:
    return "–" if value is None else form.format(value)
