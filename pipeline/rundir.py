"""The run directory of train-student: what it holds and how each file is written.

    config.json     the resolved TrainSpec (paths absolute); a resumed run must match it
                    in all that defines its result (RESULT_NEUTRAL may change)
    options.yaml    the command's options as it ran (kdpipe train-student --config
                    options.yaml runs it again)
    checkpoint.pt   the state after the last finished epoch (--resume continues from it)
    student_best.pt the student of the epoch with the best val_top1 so far (with --val)
    student_ema.pt  the EMA of the student's weights, at the end (with --ema)
    metrics.jsonl   one line per finished epoch
    events.out.tfevents.*  the same metrics for TensorBoard, when it is installed (`monitor`)
    student.pt      the student at the end: its weights (the inner network's state_dict
                    under "model"), model spec, class names and preprocessing
                    (`train.student_file`)
    summary.json    written last: a run directory with it is finished
    run.lock        locked (flock) while a train-student works in the directory; removed
                    once the run is finished

Every file is written whole (temp file, fsync, rename), so a kill leaves the old file or
the new one and a resumed run never reads a torn one. One train-student at a time: a
second one on the same directory is refused while the first holds the lock (the kernel
releases it when that process ends, however it ends).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import TrainSpec, first_difference
from .errors import NO_SPACE, ConfigError, KdpipeError
from .monitor import ScalarLog
from .store import write_local_atomic

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
WEIGHTS = "student.pt"
BEST = "student_best.pt"
EMA = "student_ema.pt"
SUMMARY = "summary.json"
OPTIONS = "options.yaml"
LOCK = "run.lock"


# Options that change how a run goes, not what it computes: a resumed run may change them.
# (Paths need no entry: config.json records them resolved, so the same place compares equal.)
RESULT_NEUTRAL = ("workers", "local_cache")


def _result_defining(config: dict) -> dict:
    """What of a run's config.json a resumed run must agree with: every field but
    RESULT_NEUTRAL, read as a TrainSpec so that a field a newer kdpipe added compares as
    its default (a run started before the option existed ran with its default)."""
    spec = {key: value for key, value in config.items() if key != "inputs"}
    try:
        spec = TrainSpec.from_dict(spec).to_dict()
    except (KdpipeError, TypeError, ValueError, KeyError):
        pass  # compared as it is: the first difference is then named
    inputs = {"inputs": config["inputs"]} if "inputs" in config else {}
    return {key: value for key, value in (spec | inputs).items() if key not in RESULT_NEUTRAL}


class RunDir:
    """One run directory on this machine (rank 0 owns it)."""

    def __init__(self, out: str | Path):
        self.path = Path(out)
        self._lock_descriptor: int | None = None
        self._scalars = ScalarLog(self.path)  # TensorBoard's copy of the metrics, when it is installed

    def prepare(self, config: dict, resume: bool) -> dict | None:
        """Create the run directory, or check that a resumed one ran this config; take the
        directory's lock; returns the checkpoint to resume from, if any."""
        out = self.path
        if (out / SUMMARY).exists():
            raise ConfigError(f"{out} already holds a finished run; choose another --out")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out} exists and is a file; choose another --out")
        config_path = out / CONFIG
        if config_path.is_file() and config_path.stat().st_size == 0:
            config_path.unlink()  # left by a kdpipe killed while creating it (before writes were atomic)
        has_run = config_path.exists()
        if has_run and not resume:
            raise ConfigError(f"{out} holds an unfinished run; pass --resume to continue it, or choose another --out")
        if not has_run and out.exists() and any(p.name != LOCK for p in out.iterdir()):
            raise ConfigError(f"{out} exists, is not empty and holds no run; choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {out}: {exc.strerror or exc}; choose another --out") from None
        self._lock()
        try:
            if (out / SUMMARY).exists():  # finished while this process waited
                raise ConfigError(f"{out} already holds a finished run; choose another --out")
            if has_run:
                where = first_difference(_result_defining(self._read_config()), _result_defining(config))
                if where is not None:
                    raise ConfigError(f"cannot resume {out}: {where} differs from the run being resumed")
            self._write_json(CONFIG, config)
            return self._read_checkpoint() if resume and (out / CHECKPOINT).exists() else None
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        """Hold run.lock until this process ends: a second train-student on the directory
        would train every epoch again beside this one."""
        path = self.path / LOCK
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc.strerror or exc}; choose another --out") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            holder = path.read_text().strip() or "another process"
            raise ConfigError(f"{self.path} is in use by another train-student ({holder}); "
                              "wait for it to finish, or choose another --out") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._lock_descriptor = descriptor  # kept open, and so locked, until `release`

    def release(self) -> None:
        """Let the directory go (when the run ends, however it ends)."""
        descriptor, self._lock_descriptor = self._lock_descriptor, None
        if descriptor is not None:
            os.close(descriptor)
        self._scalars.close()

    def _read_config(self) -> dict:
        try:
            config = json.loads((self.path / CONFIG).read_text())
        except (OSError, ValueError) as exc:
            config = exc
        if not isinstance(config, dict):
            raise ConfigError(f"cannot resume {self.path}: its {CONFIG} is damaged (not a JSON object); "
                              "choose another --out to start afresh")
        return config

    def _read_checkpoint(self) -> dict:
        path = self.path / CHECKPOINT
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
            checkpoint = exc
        if not isinstance(checkpoint, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(checkpoint):
            raise ConfigError(f"cannot resume {self.path}: its {CHECKPOINT} is damaged; move it away to restart "
                              "the run from epoch 1, or choose another --out")
        return checkpoint

    def keep_metrics_until(self, epochs_done: int) -> None:
        """Drop metric lines of epochs that were not checkpointed (a resumed run redoes them)."""
        path = self.path / METRICS
        if not path.exists():
            return
        kept = []
        lines = path.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                epoch = json.loads(line)["epoch"]
            except (ValueError, TypeError, KeyError):
                if number == len(lines):
                    break  # a torn last line (written by hand, or by another tool): dropped
                raise ConfigError(f"cannot resume {self.path}: line {number} of {METRICS} is damaged; "
                                  "repair or remove it, then re-run with --resume") from None
            if epoch <= epochs_done:
                kept.append(line)
        self._write(METRICS, "".join(line + "\n" for line in kept).encode())

    def append_metrics(self, record: dict) -> None:
        """Add one epoch's line, rewriting the (small) file whole so no line is ever torn."""
        path = self.path / METRICS
        old = path.read_bytes() if path.exists() else b""
        self._write(METRICS, old + (json.dumps(record) + "\n").encode())
        self._scalars.append(record)

    def save_checkpoint(self, state: dict) -> None:
        self._save_torch(CHECKPOINT, state)

    def save_options(self, options: dict) -> None:
        import yaml

        self._write(OPTIONS, yaml.safe_dump(options, sort_keys=False).encode())

    def save_student(self, name: str, student: dict) -> None:
        """A student file (`train.student_file`) under `name`, replacing any before."""
        self._save_torch(name, student)

    def finish(self, student: dict, summary: dict, ema: dict | None = None) -> None:
        """The student file (and its EMA's), then the summary that marks the run finished."""
        if ema is not None:
            self._save_torch(EMA, ema)
        self._save_torch(WEIGHTS, student)
        self._write_json(SUMMARY, summary)
        (self.path / LOCK).unlink(missing_ok=True)  # a finished run needs no lock: nothing may train in it again

    def _save_torch(self, name: str, obj: Any) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self._write(name, buffer.getvalue())

    def _write_json(self, name: str, obj: Any) -> None:
        self._write(name, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def _write(self, name: str, data: bytes) -> None:
        path = self.path / name
        try:
            write_local_atomic(path, data)
        except OSError as exc:
            advice = "free some space, then re-run with --resume" if exc.errno in NO_SPACE else "choose another --out"
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; {advice}") from None
