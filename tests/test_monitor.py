"""Watching runs: progress lines in logs, TensorBoard event files, `kdpipe report`."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.rundir import RunDir

from .conftest import assert_user_error, cli_json, run_cli

TRAIN = ("train-student", "--data", "synthetic:40:4:16", "--val", "synthetic:16:4:16", "--student", "kdpipe:mlp",
         "--mode", "supervised", "--batch-size", 10, "--workers", 0)
PROGRESS_LINE = re.compile(r"^(cache-teacher|epoch \d/2): ([\d,]+)/([\d,]+) views  [\d,]+ views/s  ETA (\d+:\d\d:\d\d|-)$")


def progress_lines(stderr: str) -> list[re.Match]:
    return [match for match in map(PROGRESS_LINE.match, stderr.splitlines()) if match]


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """In a log (CliRunner's stderr is no terminal) both stages say how far they are, at
    most every KDPIPE_PROGRESS_INTERVAL seconds: here 0, a line per batch."""
    monkeypatch.setenv("KDPIPE_PROGRESS_INTERVAL", "0")
    cache = ("cache-teacher", "--data", "synthetic:24:3:16", "--teacher", "kdpipe:cnn", "--size", 16,
             "--views-per-sample", 2, "--batch-size", 8, "--workers", 0)
    result = run_cli(*cache, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr)
    assert [(m[1], m[2], m[3]) for m in lines] == [("cache-teacher", "16", "48"), ("cache-teacher", "32", "48"),
                                                   ("cache-teacher", "48", "48")]
    assert lines[-1][4] == "0:00:00"  # nothing left
    result = run_cli(*TRAIN, "--epochs", 2, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert [(m[1], m[2]) for m in progress_lines(result.stderr)] == [
        (f"epoch {epoch}/2", f"{done}") for epoch in (1, 2) for done in (10, 20, 30, 40)]
    monkeypatch.setenv("KDPIPE_PROGRESS_INTERVAL", "soon")
    assert_user_error(run_cli(*cache, "--out", tmp_path / "b"), "KDPIPE_PROGRESS_INTERVAL", "'soon'")


def test_tensorboard_logs_each_epoch_once_across_a_resume(tmp_path, monkeypatch):
    """The event file beside metrics.jsonl holds each metric per epoch, as metrics.jsonl
    does, after a run killed between an epoch's metrics and its checkpoint was resumed
    (the epoch is trained again; TensorBoard shows it once)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save, saved = RunDir.save_checkpoint, []

    def killed_before_the_second(self, state):
        if saved:
            raise KeyboardInterrupt  # epoch 2's metrics are written, its checkpoint is not
        save(self, state)
        saved.append(state["epoch"])

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", killed_before_the_second)
        assert run_cli(*TRAIN, "--epochs", 3, "--out", tmp_path / "run").exit_code == 130
    cli_json(*TRAIN, "--epochs", 3, "--out", tmp_path / "run", "--resume")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 2  # one per train-student
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(metrics[0]) - {"epoch"}
    for key in ("loss", "val_top1", "val_top5", "views_per_sec"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6)


def test_without_tensorboard_a_run_directory_gets_no_event_file(tmp_path, monkeypatch):
    from pipeline import monitor

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails, as when not installed
    monitor._summary_writer.cache_clear()
    try:
        log = monitor.ScalarLog(tmp_path)
        log.append({"epoch": 1, "loss": 0.5})
        log.close()
    finally:
        monitor._summary_writer.cache_clear()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    """Two finished 2-epoch runs that differ in their learning rate."""
    folder = tmp_path_factory.mktemp("runs")
    runs = [folder / "slow-lr", folder / "fast-lr"]
    for run, lr in zip(runs, (1e-4, 3e-2)):
        result = run_cli(*TRAIN, "--epochs", 2, "--lr", lr, "--out", run)
        assert result.exit_code == 0, result.output
        assert not progress_lines(result.stderr)  # a short run in a log: no progress line at the default 30 s
    return runs


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """Pixels within a little of `rgb` (lines are antialiased)."""
    return int((np.abs(image.astype(int) - rgb).max(-1) <= 24).sum())


def test_report_draws_each_run_in_its_colour_and_tables_its_final_figures(two_runs, tmp_path):
    result = run_cli("report", *two_runs, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(tmp_path / "report" / "report.png").convert("RGB"))
    assert image.shape[0] >= 300 and image.shape[1] >= 900  # three panels side by side: loss, top-1, top-5
    assert (image.min(-1) < 240).mean() > 0.03  # drawn on, not blank
    assert len(np.unique(image.astype(np.int32) @ [65536, 256, 1])) > 50  # distinct colours
    blue, orange = colour_pixels(image, (31, 119, 180)), colour_pixels(image, (255, 127, 14))  # matplotlib's C0, C1
    assert blue > 150 and orange > 150, (blue, orange)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "![figures per epoch](report.png)" in table
    for run in two_runs:
        final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {run.name} |")]
        assert f"| supervised | `kdpipe:mlp` | 2 | {final['val_top1']:.4g} |" in row
    assert table.count("\n| ") == 3 and result.stdout.strip() in table  # the header and a row per run


def test_report_shows_the_ema_and_teacher_figures_of_an_unfinished_run(two_runs, tmp_path):
    """A run still training (no summary.json), whose metrics have the EMA student's top-1
    and the agreement with the teacher, gets their columns, its epochs as "2 of 5"."""
    run = tmp_path / "ema-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"mode": "cached", "epochs": 5, "student": {"name": "kdpipe:mlp"}}))
    lines = [{"epoch": e, "loss": 1.0 / e, "val_top1": 50.0 + e, "val_top1_ema": 49.0 + e, "val_agreement": 60.0 + e,
              "val_kl": 0.5 / e} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli("report", run, two_runs[0], "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    header, _, row, _ = result.stdout.strip().splitlines()
    assert "EMA val top-1 %" in header and "agreement %" in header and "KL" in header
    assert row.startswith("| ema-run | cached | `kdpipe:mlp` | 2 of 5 | 52 | 51 |")
    assert Image.open(tmp_path / "report" / "report.png").size[1] > 500  # five panels: two rows


def test_report_refuses_what_is_not_a_run_directory(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "starting").mkdir()
    (tmp_path / "starting" / "config.json").write_text("{}")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n{"epo')
    for path, fragment in (("nowhere", "is not a folder"), ("file.txt", "is not a folder"),
                           ("empty", "not a train-student run directory"), ("starting", "no finished epoch yet"),
                           ("torn", "line 2 of")):
        assert_user_error(run_cli("report", tmp_path / path, "--out", tmp_path / "report"), fragment)
    assert not (tmp_path / "report").exists()
