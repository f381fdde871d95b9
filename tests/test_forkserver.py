"""The fork server the end-to-end tests start kdpipe through (tests/forkserver.py): each
command is a process of its own with the caller's stdio, folder, environment, session and
limits, and reports how it ended, as a freshly started one would."""

import functools
import os
import signal
import subprocess

from . import forkserver
from .conftest import fork_server, run_kdpipe, spawn_kdpipe, subprocess_env


def test_a_command_ends_as_a_fresh_process_would(tmp_path):
    result = run_kdpipe("cache-teacher", "--data", tmp_path / "nowhere", "--teacher", "kdpipe:cnn",
                        "--out", tmp_path / "a")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: data folder {tmp_path / 'nowhere'} does not exist"]
    assert result.stdout == ""


def test_a_command_is_its_own_process_in_a_session_of_its_own_and_a_kill_is_reported(tmp_path):
    data = "synthetic:8:2:8"
    child = spawn_kdpipe("cache-teacher", "--data", data, "--teacher", "tests.toy_models:paced_teacher", "--out",
                         tmp_path / "a", "--size", 8, "--epochs", 50, "--batch-size", 2, "--workers", 0,
                         env=subprocess_env() | {"KDPIPE_TEST_PACE": "0.2"}, start_new_session=True)
    try:
        assert child.pid not in (os.getpid(), fork_server().process.pid)
        assert os.getsid(child.pid) == child.pid  # a session of its own
        assert child.poll() is None
    finally:
        child.kill()
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL


def test_a_limit_set_for_the_command_applies_to_it(tmp_path):
    result = run_kdpipe("cache-teacher", "--data", "synthetic:4:2:8", "--teacher", "kdpipe:mlp", "--size", 8,
                        "--out", tmp_path / "a", prepare=functools.partial(forkserver.limit_file_size, 0))
    assert result.exit_code == 2 and "free some space" in result.stderr


def test_the_shim_runs_a_command_in_the_shells_folder_and_exits_as_it_did(tmp_path):
    shim = fork_server().socket_path.parent / "kdpipe"
    done = subprocess.run([shim, "cache-teacher", "--data", "synthetic:4:2:8", "--teacher", "kdpipe:mlp",
                           "--size", "8", "--out", "here.zarr"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "here.zarr" / "manifest.json").exists()
    failed = subprocess.run([shim, "inspect", "missing.zarr"], cwd=tmp_path, capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.startswith("error: ")
