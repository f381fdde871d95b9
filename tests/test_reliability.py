"""Reliability: kdpipe never loses finished work and never trains on damaged data.

Each test pins one promise of docs/reliability.md: SIGKILL at random moments, a full
disk, a read-only place, hostile images, a tampered archive, a flaky or dead object
store. Every failure must be one line on stderr starting with "error:", exit code 2,
no traceback, and nothing half-written may look finished.

The SIGKILL tests kill cache-teacher `KDPIPE_KILL_REPEATS` times per archive format
(default: 5 for zarr, 2 for webdataset) and train-student half as often. The full check:

    KDPIPE_KILL_REPEATS=20 pytest tests/test_reliability.py -k kill
"""

from __future__ import annotations

import functools
import gc
import hashlib
import http.client
import http.server
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import ImageFolder, ValDataset
from pipeline.errors import ArchiveError
from pipeline.store import BACKENDS, location, read_manifest
from pipeline.store.lease import WriterLease
from pipeline.store.manifest import MANIFEST_ONLY, SCHEMA_VERSION, json_bytes, seal

from . import forkserver
from .conftest import (
    BUCKET, KEY, SECRET, Finished, archive_files, assert_same_weights, assert_user_error, cli_json, run_cli,
    run_kdpipe, spawn_kdpipe, subprocess_env, weights, write_image_folder,
)

# SIGKILLs per test: KDPIPE_KILL_REPEATS for zarr (default 5); for webdataset the same
# when the variable is set, else 2; for train-student half of it.
KILL_REPEATS = int(os.environ.get("KDPIPE_KILL_REPEATS", "5"))
KILLS = {"zarr": KILL_REPEATS, "webdataset": KILL_REPEATS if "KDPIPE_KILL_REPEATS" in os.environ else 2,
         "train-student": max(1, KILL_REPEATS // 2)}

# The job every cache-teacher test here runs: 18 images, 3 epochs of 2 views, shards of
# 4 positions (5 per epoch, 15 in all) written in batches of 2, so a shard takes two
# teacher batches and a kill can land between them. The paced teacher takes 0.1 s per
# batch, so the compute is a good share of a run (the rest is Python starting up).
EPOCHS, SAMPLES, VIEWS, SHARD = 3, 18, 2, 4
TOTAL_VIEWS = EPOCHS * SAMPLES * VIEWS
CACHE_ARGS = ["--teacher", "tests.toy_models:paced_teacher", "--epochs", str(EPOCHS), "--views-per-sample", str(VIEWS),
              "--size", "16", "--shard-size", str(SHARD), "--batch-size", "2", "--workers", "0"]
# train-student on that data, supervised, with a student that takes 0.1 s per step.
# with the training recipe's options and RandAugment and erasing on, which a resumed run must restore too
# (the EMA, the schedule) or redraw alike (the views)
TRAIN_ARGS = ["--student", "tests.toy_models:slow_student", "--mode", "supervised", "--epochs", "5",
              "--batch-size", "4", "--size", "16", "--workers", "0", "--ema", "0.9", "--accumulate", "2",
              "--warmup-epochs", "1", "--label-smoothing", "0.1", "--clip-norm", "0.5", "--randaugment", "2,9",
              "--random-erase", "0.5"]


# --- helpers -------------------------------------------------------------------------


def leftover_temporaries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*.tmp*"))


def cache_command(data: Path, out: Path, format: str = "zarr") -> list[str]:
    return ["cache-teacher", "--data", str(data), "--out", str(out), "--format", format, *CACHE_ARGS]


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--data", str(data), "--out", str(out), *TRAIN_ARGS, *extra]


def run_child(command: list[str], limit_file_size: int | None = None, env: dict | None = None) -> Finished:
    """Run kdpipe in a process of its own; with `limit_file_size`, no file it writes may
    grow past that many bytes (a write past it fails with EFBIG, as on a full disk)."""
    prepare = None if limit_file_size is None else functools.partial(forkserver.limit_file_size, limit_file_size)
    return run_kdpipe(*command, env=env, prepare=prepare)


def dead_pid() -> int:
    """The pid of a process that has exited (what a SIGKILLed writer leaves in its lease)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def stale_lease(pid: int) -> bytes:
    now = time.time()
    return json_bytes({"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid, "since": now,
                       "renewed": now})


@dataclass
class Reference:
    """An uninterrupted run: its files and, when it ran in a fresh process (`timed`), how
    long it took from start to exit and (for cache-teacher) to start up, until plan.json
    appeared: the kill tests spread their kill moments over that runtime."""

    root: Path
    files: dict[str, bytes]
    seconds: float | None = None
    startup: float | None = None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("reliability") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted cache-teacher archive of the job, per format, made once: in-process,
    or with `timed` in a fresh process, as the kill tests run it (whose runtime spreads
    their kill moments). A fresh process made after an in-process run must give its bytes."""
    made: dict[str, Reference] = {}

    def get(format: str, timed: bool = False) -> Reference:
        known = made.get(format)
        if known is not None and (known.seconds is not None or not timed):
            return known
        out = tmp_path_factory.mktemp(f"reference-{format}") / "archive"
        if timed:
            started = time.monotonic()
            child = spawn_kdpipe(*cache_command(data, out, format))
            while not (out / "plan.json").exists() and child.poll() is None:
                time.sleep(0.01)
            startup = time.monotonic() - started
            _, stderr = child.communicate(timeout=180)
            assert child.returncode == 0, stderr
            made[format] = Reference(out, archive_files(out), time.monotonic() - started, startup)
        else:
            cli_json(*cache_command(data, out, format))
            made[format] = Reference(out, archive_files(out))
        assert known is None or made[format].files == known.files
        return made[format]

    return get


@pytest.fixture(scope="module")
def train_reference(data, tmp_path_factory):
    """The uninterrupted train-student run of TRAIN_ARGS, made once: in-process, or with
    `timed` in a fresh process, as the kill test runs it. Both train the same weights."""
    made: list[Reference] = []

    def get(timed: bool = False) -> Reference:
        if made and (made[-1].seconds is not None or not timed):
            return made[-1]
        out = tmp_path_factory.mktemp("train-reference") / "run"
        started = time.monotonic()
        if timed:
            result = run_child(train_command(data, out))
            assert result.exit_code == 0, result.output
        else:
            cli_json(*train_command(data, out))
        made.append(Reference(out, {}, time.monotonic() - started if timed else None))
        if len(made) > 1:
            assert_same_weights(out, weights(made[0].root))
        return made[-1]

    return get


# --- SIGKILL at random moments -----------------------------------------------------------


def committed_views(out: Path, reference: Reference) -> int:
    """The views an interrupted archive holds for good, after checking that nothing
    half-written looks finished: no manifest unless every object it lists is in place,
    and every commit marker's objects present with their recorded sizes (and bytes)."""
    reference_manifest = json.loads(reference.files["manifest.json"])
    if (out / "manifest.json").exists():
        # the manifest is written last: everything it lists is there, as in the reference
        assert (out / "manifest.json").read_bytes() == reference.files["manifest.json"]
        for key in reference_manifest["files"]:
            assert (out / key).read_bytes() == reference.files[key], key
        return TOTAL_VIEWS
    with pytest.raises(ArchiveError, match="unfinished|does not exist|not a kdpipe archive"):
        read_manifest(out)
    views = 0
    for marker_path in sorted((out / "commits").glob("*.json")) if (out / "commits").is_dir() else []:
        marker = json.loads(marker_path.read_text())  # markers are written whole, never torn
        for key, entry in marker["files"].items():
            assert (out / key).stat().st_size == entry["bytes"], f"{marker_path.name}: {key}"
            assert entry == reference_manifest["files"][key], f"{marker_path.name}: {key}"
            assert hashlib.sha256((out / key).read_bytes()).hexdigest() == entry["sha256"], key
        if marker_path.name != "static.json":
            views += (marker["stop"] - marker["start"]) * VIEWS
    return views


def kill_moments(count: int, seed: str):
    """An endless seeded stream of moments to kill a run at, as fractions of its expected
    runtime: each batch of `count` has one moment in each equal slice of it, shuffled, so
    kills land all over a run (startup, mid-shard, finish), not by chance in one part."""
    rng = random.Random(seed)
    while True:
        batch = [(slot + rng.random()) / count for slot in range(count)]
        rng.shuffle(batch)
        yield from batch


@pytest.mark.slow
@pytest.mark.parametrize("format", BACKENDS)
def test_kill_at_random_moments_then_resume_gives_the_uninterrupted_archive(format, data, reference, tmp_path):
    """cache-teacher is SIGKILLed KILLS[format] times, at seeded random moments over
    the runtime of an uninterrupted run, and re-run after each kill. After every kill
    nothing half-written looks finished and every committed shard is intact; the run that
    completes computes only what was not committed, and the archive equals the
    uninterrupted one byte for byte. A run's kill moment is drawn over its expected
    runtime: the reference run's startup plus its compute time scaled by the share of
    views still to compute. A chain ends with a run that is not killed: one that ended
    before its kill moment, or the no-op re-run after a kill that came once the manifest
    was written (both checked the same way); the next kill starts a fresh archive."""
    ref = reference(format, timed=True)
    moments = kill_moments(KILLS[format], f"kill-{format}")
    chain, kills, out = 0, 0, tmp_path / "chain-0"
    landed = {"no new commit (startup or first shard)": 0, "after new commits": 0, "after the manifest": 0,
              "missed (the run had ended)": 0}
    while True:
        before = committed_views(out, ref) if out.exists() else 0
        child = spawn_kdpipe(*cache_command(data, out, format))
        expected = ref.startup + (ref.seconds - ref.startup) * (TOTAL_VIEWS - before) / TOTAL_VIEWS
        # no kill once the manifest is there: that run is the no-op that completes the chain
        finished = (out / "manifest.json").exists()
        moment = next(moments) * expected if kills < KILLS[format] and not finished else None
        try:
            stdout, stderr = child.communicate(timeout=moment if moment is not None else 180)
        except subprocess.TimeoutExpired:
            child.kill()  # SIGKILL
            child.communicate()
            kills += 1
            after = committed_views(out, ref)
            assert after >= before  # a kill never takes committed work away
            landed["after the manifest" if (out / "manifest.json").exists() else "after new commits"
                   if after > before else "no new commit (startup or first shard)"] += 1
            continue
        assert child.returncode == 0, stderr
        assert json.loads(stdout.splitlines()[-1])["computed_views"] == TOTAL_VIEWS - before
        assert archive_files(out) == ref.files
        if moment is not None:
            landed["missed (the run had ended)"] += 1
        if kills >= KILLS[format]:
            break
        chain += 1
        out = tmp_path / f"chain-{chain}"
    print(f"\n{format}: {kills} kills, uninterrupted run {ref.seconds:.1f} s ({ref.startup:.1f} s startup), "
          f"{chain + 1} chain(s): {landed}")
    if kills >= 3:
        assert landed["after new commits"] >= 1, f"no kill landed mid-run: {landed}"


def test_kill_after_the_manifest_before_cleanup_is_completed(data, reference, tmp_path):
    """A writer killed after writing manifest.json but before removing its plan, commit
    markers and lease: the re-run is a no-op that leaves exactly the uninterrupted archive."""
    ref = reference("zarr")
    out = tmp_path / "archive"
    shutil.copytree(ref.root, out)
    manifest = json.loads(ref.files["manifest.json"])
    (out / "plan.json").write_bytes(json_bytes({k: v for k, v in manifest.items() if k not in MANIFEST_ONLY}))
    (out / "commits").mkdir()
    (out / "commits" / "0.0.json").write_text("{}")
    (out / "writer.json").write_bytes(stale_lease(dead_pid()))
    result = cli_json("cache-teacher", "--data", data, "--out", out, *CACHE_ARGS)
    assert result["computed_views"] == 0
    assert archive_files(out) == ref.files


def test_kill_while_writing_the_plan_is_resumed(data, reference, tmp_path):
    """A writer killed after taking the lease, while writing plan.json (its temporary file
    not yet renamed into place): the re-run takes the lease over and writes the
    uninterrupted archive."""
    ref = reference("zarr")
    out = tmp_path / "archive"
    out.mkdir()
    pid = dead_pid()
    (out / "writer.json").write_bytes(stale_lease(pid))
    plan = json.loads(ref.files["manifest.json"])
    plan_bytes = json_bytes({k: v for k, v in plan.items() if k not in MANIFEST_ONLY})
    (out / f".plan.json.tmp-{pid}-0123abcd").write_bytes(plan_bytes[: len(plan_bytes) // 2])
    result = run_cli("cache-teacher", "--data", data, "--out", out, *CACHE_ARGS)
    assert result.exit_code == 0, result.output
    assert archive_files(out) == ref.files


def test_a_lease_kept_while_waiting_is_renewed_and_a_lost_one_is_reported(tmp_path):
    """Rank 0 waiting at the final barrier commits nothing, so it renews its lease on a
    timer: the record's time moves on; if another writer took the archive over meanwhile,
    leaving the wait raises instead of writing a manifest."""
    place = location.Location(str(tmp_path / "archive"))
    lease = WriterLease(place)
    lease.acquire()
    first = json.loads(place.read("writer.json"))["renewed"]
    with lease.kept(every=0.05):
        time.sleep(0.4)
    assert json.loads(place.read("writer.json"))["renewed"] > first

    place.write("writer.json", stale_lease(os.getpid()))  # another owner's record
    with pytest.raises(ArchiveError, match="another cache-teacher took over"):
        with lease.kept(every=0.05):
            time.sleep(0.4)


@pytest.mark.slow
def test_ctrl_c_releases_the_lease_and_the_re_run_completes(data, reference, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit 130 with one line saying to re-run, no traceback, the
    lease released and no manifest; the re-run completes to the uninterrupted archive."""
    ref = reference("zarr")
    out = tmp_path / "archive"
    # 0.4 s a teacher batch: the run lasts 12 s after its first commit, so the signal lands
    # mid-run even on a loaded machine
    # A shell starts background jobs with SIGINT ignored, and a child inherits that: give
    # this one Python's own disposition, so that Ctrl-C is a KeyboardInterrupt as in a terminal.
    child = spawn_kdpipe(*cache_command(data, out), env=subprocess_env() | {"KDPIPE_TEST_PACE": "0.4"},
                         prepare=forkserver.default_sigint)
    deadline = time.monotonic() + 120
    while not list(out.glob("commits/*.*.json")) and time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted; re-run the same command")
    assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists() and not (out / "writer.json").exists()
    kept = committed_views(out, ref)
    again = cli_json("cache-teacher", "--data", data, "--out", out, *CACHE_ARGS)
    assert again["computed_views"] == TOTAL_VIEWS - kept
    assert archive_files(out) == ref.files


def run_state(out: Path) -> str:
    """What a killed train-student left: its files and the epochs in its checkpoint and metrics."""
    if not out.exists():
        return "no run directory"
    names = sorted(p.name for p in out.iterdir())
    checkpoint = out / "checkpoint.pt"
    epoch = torch.load(checkpoint, weights_only=False)["epoch"] + 1 if checkpoint.exists() else None
    lines = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else None
    return f"{names}, checkpoint after epoch {epoch}, {lines} metrics lines"


@pytest.mark.slow
def test_train_student_killed_at_random_moments_resumes_to_the_same_weights(data, train_reference, tmp_path):
    """train-student (supervised, 5 epochs) SIGKILLed KILLS["train-student"] times at
    seeded random moments over its uninterrupted runtime, re-run with --resume after each:
    every run that finishes has exactly the weights of the uninterrupted run and one
    metrics line per epoch; student.pt, when it exists, is never anything else."""
    repeats = KILLS["train-student"]
    moments = kill_moments(repeats, "kill-train")
    ref = train_reference(timed=True)
    expected = weights(ref.root)
    chain, kills, out, history = 0, 0, tmp_path / "chain-0", []
    while True:
        child = spawn_kdpipe(*train_command(data, out, "--resume"))
        moment = next(moments) * ref.seconds if kills < repeats else None
        try:
            _, stderr = child.communicate(timeout=moment if moment is not None else 180)
            assert child.returncode == 0, stderr
            history.append(f"finished (moment {moment})")
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            kills += 1
            history.append(f"killed at {moment:.2f} s: {run_state(out)}")
            if (out / "student.pt").exists():  # written whole, and only once training is done
                got = weights(out)
                assert all(torch.equal(got[name], expected[name]) for name in expected), \
                    f"student.pt differs from the uninterrupted run's after: {history}"
            if not (out / "summary.json").exists():  # else it was killed on its way out
                continue
        got = weights(out)
        assert all(torch.equal(got[name], expected[name]) for name in expected), \
            f"weights differ from the uninterrupted run's after: {history}"
        epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2, 3, 4, 5]
        if kills >= repeats:
            break
        chain += 1
        out, history = tmp_path / f"chain-{chain}", []


def test_train_student_killed_while_creating_its_config_resumes(data, train_reference, tmp_path):
    """A kill between creating config.json and writing it leaves the file empty; the
    same command with --resume then trains the run from the start."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(b"")
    result = run_cli("train-student", "--data", data, "--out", out, *TRAIN_ARGS, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_weights(out, weights(train_reference().root))


def test_an_unfinished_run_is_continued_only_with_resume(data, train_reference, tmp_path):
    """What a kill after a checkpoint leaves (config, checkpoint, metrics; no student.pt,
    no summary): the same command without --resume is refused in one line naming --resume
    and changes nothing; with --resume it ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    cli_json("train-student", "--data", data, "--out", out, *TRAIN_ARGS)
    (out / "student.pt").unlink()
    (out / "summary.json").unlink()
    before = archive_files(out)
    assert_user_error(run_cli("train-student", "--data", data, "--out", out, *TRAIN_ARGS), "--resume")
    assert archive_files(out) == before
    cli_json("train-student", "--data", data, "--out", out, *TRAIN_ARGS, "--resume")
    reference = train_reference().root
    assert_same_weights(out, weights(reference))
    ema = [torch.load(run / "student_ema.pt", weights_only=True)["model"] for run in (out, reference)]
    assert all(torch.equal(ema[0][name], ema[1][name]) for name in ema[1])


def test_non_finite_loss_stops_training_in_one_line(data, tmp_path):
    """A teacher whose logits turn NaN, run live: the first step's loss is NaN, and
    train-student stops with one line naming the epoch and step; no weights are saved."""
    result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--mode", "online",
                     "--teacher", "tests.toy_models:nan_teacher", "--out", tmp_path / "run", "--epochs", 1,
                     "--size", 16, "--workers", 0)
    assert_user_error(result, "the loss became nan at epoch 1, step 1")
    assert not (tmp_path / "run" / "student.pt").exists() and not (tmp_path / "run" / "summary.json").exists()


# --- a full disk -------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_at_the_manifest_keeps_every_shard(data, reference, tmp_path):
    """Every file may grow only to one byte less than the manifest (RLIMIT_FSIZE): all
    shards commit, the manifest write fails with EFBIG. One line names manifest.json and
    says to free space; no manifest, no temporary file is left; the re-run computes
    nothing and writes the uninterrupted archive."""
    ref = reference("zarr")
    out = tmp_path / "archive"
    result = run_child(cache_command(data, out), limit_file_size=len(ref.files["manifest.json"]) - 1)
    assert_user_error(result, f"{out}/manifest.json", "free some space")
    assert not (out / "manifest.json").exists()
    assert leftover_temporaries(out) == []
    again = cli_json("cache-teacher", "--data", data, "--out", out, *CACHE_ARGS)
    assert again["computed_views"] == 0  # every shard written before the disk filled was kept
    assert archive_files(out) == ref.files


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_committed_shards(data, reference, tmp_path):
    """The disk fills after 7 teacher batches (webdataset; the paced teacher's test hook
    drops the file-size limit to 0): one line naming the object, advice to free space; the
    shards committed before stay and are not recomputed; the re-run writes the
    uninterrupted archive."""
    ref = reference("webdataset")
    out = tmp_path / "archive"
    env = subprocess_env() | {"KDPIPE_TEST_DISK_FULL_AFTER": "7"}
    result = run_child(cache_command(data, out, "webdataset"), env=env)
    assert_user_error(result, f"cannot write {out}/", "File too large", "free some space")
    assert not (out / "manifest.json").exists()
    assert leftover_temporaries(out) == []
    kept = committed_views(out, ref)
    assert 0 < kept < TOTAL_VIEWS
    again = cli_json("cache-teacher", "--data", data, "--out", out, "--format", "webdataset", *CACHE_ARGS)
    assert again["computed_views"] == TOTAL_VIEWS - kept
    assert archive_files(out) == ref.files


@pytest.mark.slow
def test_disk_full_while_train_student_saves_its_checkpoint(data, tmp_path):
    """train-student whose checkpoint cannot be written (files limited to 2 KiB): one line,
    exit 2, no final weights, no temporary checkpoint left; --resume without the limit
    finishes with the weights of an uninterrupted run."""
    args = ["--student", "kdpipe:mlp", "--mode", "supervised", "--epochs", "2", "--batch-size", "4", "--size", "16",
            "--workers", "0"]
    cli_json("train-student", "--data", data, "--out", tmp_path / "straight", *args)
    out = tmp_path / "run"
    result = run_child(["train-student", "--data", str(data), "--out", str(out), *args], limit_file_size=2048)
    assert_user_error(result, "checkpoint.pt")
    assert "free" in result.stderr
    assert not (out / "student.pt").exists() and not (out / "summary.json").exists()
    assert leftover_temporaries(out) == []
    cli_json("train-student", "--data", data, "--out", out, *args, "--resume")
    assert_same_weights(out, weights(tmp_path / "straight"))


# --- places that cannot be written -------------------------------------------------------

READ_ONLY = ["/proc/kdpipe-readonly/a", "/sys/kdpipe-readonly/a"] + (["chmod 555"] if os.geteuid() != 0 else [])


@pytest.mark.parametrize("place", READ_ONLY)
@pytest.mark.parametrize("command", ["cache-teacher", "train-student"])
def test_read_only_output_is_one_line(command, place, data, tmp_path):
    """--out where nothing can be created (/proc, /sys; a 0o555 folder when not root)."""
    if place == "chmod 555":
        (tmp_path / "locked").mkdir()
        (tmp_path / "locked").chmod(0o555)
        place = str(tmp_path / "locked" / "a")
    if command == "cache-teacher":
        result = run_cli("cache-teacher", "--data", data, "--teacher", "tests.toy_models:tiny_cnn", "--out", place,
                         "--epochs", 1, "--size", 16, "--workers", 0)
    else:
        result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--mode", "supervised",
                         "--out", place, "--epochs", 1, "--size", 16, "--workers", 0)
    assert_user_error(result, str(Path(place).parent))  # the folder that could not be made


@pytest.mark.parametrize("option", ["cache-teacher --out", "train-student --cache", "train-student --out"])
def test_unknown_url_scheme_is_refused(option, data, tmp_path, monkeypatch):
    """foo:// is no place kdpipe knows: refused in one line (naming it an unknown URL scheme
    where an archive is read or written; a run directory is local), and nothing is created
    (not even a local folder named 'foo:')."""
    monkeypatch.chdir(tmp_path)
    if option == "cache-teacher --out":
        result = run_cli("cache-teacher", "--data", data, "--teacher", "tests.toy_models:tiny_cnn", "--out", "foo://x",
                         "--epochs", 1, "--workers", 0)
    elif option == "train-student --cache":
        result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--cache", "foo://x",
                         "--out", "run", "--epochs", 1, "--workers", 0)
    else:
        result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--mode", "supervised",
                         "--out", "foo://x", "--epochs", 1, "--workers", 0)
    assert_user_error(result, "foo://", *(["unknown URL scheme"] if option != "train-student --out" else []))
    assert list(tmp_path.iterdir()) == []


# --- hostile images ----------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _noise(height: int = 32, width: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


HOSTILE = {
    # name: (file name, bytes)
    "truncated PNG": ("cut.png", lambda: _encoded(_noise(), "PNG")[:1500]),
    "truncated JPEG": ("cut.jpg", lambda: _encoded(_noise(64, 64), "JPEG")[:2000]),
    "garbage with an image extension": ("noise.jpg", lambda: np.random.default_rng(1).bytes(3000)),
    "zero bytes": ("empty.png", lambda: b""),
    # a valid PNG header claiming 40000 x 40000 pixels (1.6 G): PIL refuses it on opening,
    # before any pixel is allocated
    "decompression bomb": ("bomb.png", lambda: b"\x89PNG\r\n\x1a\n"
                           + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                           + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")),
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_image_is_named_in_one_line(kind, workers, tmp_path, monkeypatch):
    """A bad file among good images: cache-teacher and supervised train-student stop with
    one line naming the file; no archive looks finished, no student is saved."""
    # In-process only: a failed run's DataLoader workers are reaped when its iterator is
    # collected, which waits MP_STATUS_CHECK_INTERVAL (5 s) for each; a kdpipe process
    # exits at once. Shorten the wait, and reap them here rather than in a later test.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    data = write_image_folder(tmp_path / "data", per_class=3)
    name, make = HOSTILE[kind]
    bad = data / "dog" / name
    bad.write_bytes(make())
    result = run_cli("cache-teacher", "--data", data, "--teacher", "tests.toy_models:tiny_cnn", "--out",
                     tmp_path / "archive", "--size", 16, "--workers", workers)
    assert_user_error(result, "cannot read image", str(bad))
    assert not (tmp_path / "archive" / "manifest.json").exists()
    result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--mode", "supervised",
                     "--out", tmp_path / "run", "--epochs", 1, "--size", 16, "--workers", workers)
    assert_user_error(result, "cannot read image", str(bad))
    assert not (tmp_path / "run" / "student.pt").exists() and not (tmp_path / "run" / "summary.json").exists()
    gc.collect()


@pytest.mark.slow
def test_a_run_that_fails_in_its_workers_ends_its_process(tmp_path):
    """The same in a real process, with DataLoader workers: one line, exit 2, and the
    process ends at once (no worker is left for the interpreter's exit to wait on)."""
    data = write_image_folder(tmp_path / "data", per_class=3)
    bad = data / "dog" / "cut.png"
    bad.write_bytes(HOSTILE["truncated PNG"][1]())
    for command in (["cache-teacher", "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "archive"],
                    ["train-student", "--student", "kdpipe:mlp", "--mode", "supervised", "--out", tmp_path / "run",
                     "--epochs", 1]):
        result = run_kdpipe(*command, "--data", data, "--size", 16, "--workers", 2, timeout=60)
        assert_user_error(result, "cannot read image", str(bad))


def write_unusual_images(root: Path) -> Path:
    """Images that are odd but sound, two classes of them."""
    for c, folder in enumerate(("a", "b")):
        (root / folder).mkdir(parents=True)
        rgb = _noise(24, 20, seed=c)
        rgb.convert("CMYK").save(root / folder / "cmyk.jpg")
        gradient = np.linspace(0, 65535, 24 * 20).reshape(24, 20).astype(np.uint16)
        Image.fromarray(gradient if c == 0 else gradient[::-1]).save(root / folder / "gray16.png")
        rgb.convert("P").save(root / folder / "palette.png", transparency=0)
        rgb.convert("LA").save(root / folder / "la.png")
        _noise(1, 1, seed=c).save(root / folder / "one-pixel.png")
        _noise(1, 64, seed=c).save(root / folder / "one-row.png")
    return root


def test_unusual_but_sound_images_just_work(tmp_path):
    """CMYK JPEG, 16-bit grayscale, palette with transparency, LA, 1x1 and 1x64 images:
    cache-teacher and train-student (cached, in workers) succeed on them."""
    data = write_unusual_images(tmp_path / "data")
    folder = ImageFolder(data)
    modes = {path.name: Image.open(path).mode for path in folder.paths}
    assert {modes["cmyk.jpg"], modes["gray16.png"], modes["palette.png"], modes["la.png"]} == {"CMYK", "I;16", "P", "LA"}
    # the 16-bit gradient keeps its spread (PIL's own conversion to RGB would clip it to white)
    gray16 = next(i for i, path in enumerate(folder.paths) if path.name == "gray16.png")
    view, _ = ValDataset(folder, 16)[gray16]
    assert float(view.min()) < 0.1 and float(view.max()) > 0.9 and 0.3 < float(view.mean()) < 0.7
    assert len(view.unique()) > 50
    cli_json("cache-teacher", "--data", data, "--teacher", "tests.toy_models:tiny_cnn", "--out", tmp_path / "archive",
             "--epochs", 2, "--views-per-sample", 2, "--size", 16, "--workers", 0)
    summary = cli_json("train-student", "--data", data, "--student", "kdpipe:mlp", "--cache", tmp_path / "archive",
                       "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 4, "--workers", 2)
    assert summary["mode"] == "cached" and (tmp_path / "run" / "student.pt").exists()


# --- a damaged or tampered archive -------------------------------------------------------


@pytest.fixture
def archive_copy(reference, tmp_path) -> Path:
    out = tmp_path / "archive"
    shutil.copytree(reference("zarr").root, out)
    return out


def _every_reader(data: Path, archive: Path, tmp_path: Path):
    """train-student, inspect and verify on `archive`."""
    yield run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--cache", archive,
                  "--out", tmp_path / "run", "--epochs", 1, "--workers", 0)
    yield run_cli("inspect", archive)
    yield run_cli("verify", archive)


def test_hand_edited_manifest_is_refused_by_every_reader(data, archive_copy, tmp_path):
    manifest = json.loads((archive_copy / "manifest.json").read_text())
    manifest["recipe"]["scale"] = [0.5, 1.0]
    (archive_copy / "manifest.json").write_bytes(json_bytes(manifest))
    for result in _every_reader(data, archive_copy, tmp_path):
        assert_user_error(result, str(archive_copy), "was changed after it was written")
    assert not (tmp_path / "run").exists()


def test_manifest_of_a_newer_schema_is_refused_by_every_reader(data, archive_copy, tmp_path):
    manifest = json.loads((archive_copy / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (archive_copy / "manifest.json").write_bytes(json_bytes(seal(manifest)))  # as a newer kdpipe would write it
    for result in _every_reader(data, archive_copy, tmp_path):
        assert_user_error(result, f"schema version {SCHEMA_VERSION + 1}", "upgrade kdpipe")
    assert not (tmp_path / "run").exists()


def test_forged_manifest_is_caught_by_the_view_check(data, archive_copy, tmp_path):
    """A manifest edited *and* re-sealed (its fingerprint recomputed) to claim another crop
    scale: the per-batch check of the stored view parameters still refuses it."""
    manifest = json.loads((archive_copy / "manifest.json").read_text())
    manifest["recipe"]["scale"] = [0.5, 1.0]
    (archive_copy / "manifest.json").write_bytes(json_bytes(seal(manifest)))
    result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--cache", archive_copy,
                     "--out", tmp_path / "run", "--epochs", 1, "--workers", 0)
    assert_user_error(result, "recorded other view parameters", "epoch 0")
    assert not (tmp_path / "run" / "student.pt").exists()


# --- a flaky or dead object store ----------------------------------------------------------

# Error answers the proxy gives in place of the store's.
ERROR_ANSWERS = {"503": (503, "SlowDown", "Please reduce your request rate."),
                 "500": (500, "InternalError", "We encountered an internal error. Please try again.")}


class FailingProxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy in front of the S3 server that fails some requests.

    Every `fail_every`-th request fails, taking turns through `failures`: "503" and "500"
    answer 503 SlowDown and 500 InternalError (the request never reaches the store);
    "drop" forwards the request, then closes the connection without an answer (the store
    acted, the client never heard). On top, every `outage_every`-th request starts an
    outage: for `outage_seconds` every request gets 500 InternalError, which neither
    botocore (with one attempt) nor s3fs retries, so only kdpipe's retries get through it.
    fail_every = 1 fails every request."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    fail_every = 3
    failures = ("503",)
    outage_every, outage_seconds = 0, 0.0
    lock = threading.Lock()
    requests = failed = outages = 0
    down_until = 0.0

    def log_message(self, *args) -> None:
        pass

    def _failure(self) -> str | None:
        cls = type(self)
        with cls.lock:
            cls.requests += 1
            failure = None
            if cls.outage_every and cls.requests % cls.outage_every == 0:
                cls.down_until, cls.outages = time.monotonic() + cls.outage_seconds, cls.outages + 1
            if time.monotonic() < cls.down_until:
                failure = "500"
            elif cls.requests % cls.fail_every == 0:
                failure = cls.failures[cls.failed % len(cls.failures)]
            cls.failed += failure is not None
            return failure

    def _proxy(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        failure = self._failure()
        if failure in ERROR_ANSWERS:
            status, code, message = ERROR_ANSWERS[failure]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        upstream = http.client.HTTPConnection(*type(self).upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        upstream.close()
        if failure == "drop":  # the store did it, the answer is lost
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


@pytest.fixture
def failing_proxy(s3_endpoint):
    """Start a FailingProxy in front of the S3 server: call it with FailingProxy's class
    attributes, get (its class, for the counters; storage options that reach S3 through it)."""
    servers = []

    def start(**behaviour):
        host, port = s3_endpoint.removeprefix("http://").split(":")
        handler = type("Proxy", (FailingProxy,), {"upstream": (host, int(port)), "lock": threading.Lock()} | behaviour)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        options = ["--storage-option", f"endpoint_url=http://127.0.0.1:{server.server_address[1]}",
                   "--storage-option", f"key={KEY}", "--storage-option", f"secret={SECRET}",
                   # one try per botocore call: the retries left are s3fs's (5) and kdpipe's (5)
                   "--storage-option", "config_kwargs.retries.total_max_attempts=1"]
        return handler, options

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# A small job: 2 epochs of 18 samples in shards of 9, float32, so nothing is rounded.
REMOTE_CACHE = ("--teacher", "tests.toy_models:tiny_cnn", "--epochs", 2, "--views-per-sample", 2, "--size", 16,
                "--shard-size", 9, "--codec", "dense-fp32", "--workers", 0)
REMOTE_TRAIN = ("--student", "kdpipe:mlp", "--epochs", 2, "--batch-size", 6, "--workers", 2)
FLAKY = {"fail_every": 8, "failures": ("503", "drop", "500"), "outage_every": 90, "outage_seconds": 0.6}


@pytest.mark.slow
def test_flaky_store_gives_the_local_archive_and_student(data, tmp_path, failing_proxy, s3, monkeypatch):
    """Every eighth request to S3 fails, in turn with a 503 SlowDown, a connection dropped
    after the store acted, and a 500 InternalError; and every 90 requests the store is out
    for 0.6 s. cache-teacher writes exactly the bytes of a local run, and train-student
    (the archive opened in forked workers) trains exactly the local run's student. Without
    kdpipe's own retries an outage is fatal: they are what gets the runs through."""
    cli_json("cache-teacher", "--data", data, "--out", tmp_path / "local", *REMOTE_CACHE)
    cli_json("train-student", "--data", data, "--cache", tmp_path / "local", "--out", tmp_path / "local-run",
             *REMOTE_TRAIN)
    proxy, options = failing_proxy(**FLAKY)
    url = f"s3://{BUCKET}/flaky-{uuid.uuid4().hex[:8]}/archive"
    started = time.monotonic()
    cli_json("cache-teacher", "--data", data, "--out", url, *REMOTE_CACHE, *options)
    stored = {path[len(url) - len("s3://") + 1:]: s3.cat_file(path) for path in s3.find(url)}
    assert stored == archive_files(tmp_path / "local")
    cli_json("train-student", "--data", data, "--cache", url, "--out", tmp_path / "remote-run", *REMOTE_TRAIN, *options)
    assert_same_weights(tmp_path / "remote-run", weights(tmp_path / "local-run"))
    assert proxy.failed >= 15 and proxy.outages >= 1, f"{proxy.failed} of {proxy.requests} failed, {proxy.outages} outages"
    print(f"\nflaky store: {proxy.failed} of {proxy.requests} requests failed, {proxy.outages} outages; "
          f"{time.monotonic() - started:.1f} s")

    # the control: the same store with kdpipe's retries off fails at the first outage
    monkeypatch.setattr(location, "RETRIES", 0)
    proxy, options = failing_proxy(**FLAKY)
    result = run_cli("cache-teacher", "--data", data, "--out", url + "-again", *REMOTE_CACHE, *options)
    assert_user_error(result, url + "-again", "after 1 tries")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["cache-teacher", "train-student"])
def test_dead_store_is_one_line_naming_the_url_in_bounded_time(command, data, tmp_path, failing_proxy, s3):
    """Every request fails with 503: one line naming the URL and the tries, exit 2,
    within 30 s; nothing is written to the store, nothing trained."""
    proxy, options = failing_proxy(fail_every=1)
    url = f"s3://{BUCKET}/dead-{uuid.uuid4().hex[:8]}/archive"
    started = time.monotonic()
    if command == "cache-teacher":
        result = run_cli("cache-teacher", "--data", data, "--out", url, *REMOTE_CACHE, *options)
    else:
        result = run_cli("train-student", "--data", data, "--cache", url, "--out", tmp_path / "run", *REMOTE_TRAIN,
                         *options)
    assert_user_error(result, url, "after 5 tries")
    assert time.monotonic() - started < 30
    assert proxy.requests >= 5 and not s3.exists(url)
    assert not (tmp_path / "run" / "student.pt").exists()
