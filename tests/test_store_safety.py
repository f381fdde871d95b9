"""The archive store never loses a user's files, never stalls on a silent store, checks
an archive fits before writing it, and reports the failure that stopped a run
(issue 14, items 1, 2, 9, 11 and the store side of 14)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from torch import nn

from pipeline.store import location as store_location

from . import forkserver
from .conftest import (
    BUCKET, KEY, REPO, SECRET, archive_files, assert_user_error, cli_json, free_port, run_cli, run_kdpipe,
    subprocess_env, write_image_folder,
)
from .toy_models import tiny_cnn

CACHE = ["--teacher", "tests.toy_models:tiny_cnn", "--epochs", 2, "--views-per-sample", 2, "--size", 16,
         "--workers", 0, "--shard-size", 4]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", per_class=4)


def cache(data: Path, out, *extra):
    return run_cli("cache-teacher", "--data", data, "--out", out, *CACHE, *extra)


def user_folder(root: Path, files: dict[str, str]) -> dict[str, bytes]:
    """A folder of the user's own files; returns its contents, to check nothing changed."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return archive_files(root)


# --- item 1: --overwrite replaces only what is provably a kdpipe archive ---------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_with_an_unrelated_manifest_is_never_touched(data, tmp_path, overwrite):
    project = tmp_path / "project"
    before = user_folder(project, {"manifest.json": json.dumps({"name": "my web app", "icons": []}),
                                   "thesis.tex": "\\documentclass{article}", "src/main.py": "print('hi')"})
    result = cache(data, project, *overwrite)
    assert_user_error(result, "not a kdpipe archive", "manifest.json")
    assert "--overwrite" not in result.stderr
    assert archive_files(project) == before


@pytest.mark.parametrize("plan", ["[1, 2, 3]", "\x00\x01 not json", '{"steps": ["build", "ship"]}'])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_unrelated_plan_is_refused_in_one_line_without_advising_overwrite(data, tmp_path, plan, overwrite):
    project = tmp_path / "project"
    before = user_folder(project, {"plan.json": plan, "notes.md": "my notes"})
    result = cache(data, project, *overwrite)
    assert_user_error(result, "not a kdpipe archive", "plan.json")
    assert "--overwrite" not in result.stderr
    assert archive_files(project) == before


def test_overwrite_refuses_an_archive_holding_a_users_file(data, tmp_path):
    out = tmp_path / "archive"
    assert cache(data, out).exit_code == 0
    (out / "notes.txt").write_text("results of the ablation")
    (out / "logits" / "README").write_text("what these are")
    before = archive_files(out)
    assert_user_error(cache(data, out, "--seed", 9, "--overwrite"), "holds logits/README", "not part of")
    assert archive_files(out) == before


def test_overwrite_deletes_exactly_the_archive_and_its_leftovers(data, tmp_path):
    """A finished archive with an added teacher, the cleanup a killed run left (a plan, a
    commit marker, a dead writer's lease) and a killed write's temporary file is replaced
    whole: what remains is exactly the new archive."""
    out = tmp_path / "archive"
    assert cache(data, out).exit_code == 0
    cli_json("cache-teacher", "--data", data, "--out", out, *CACHE, "--teacher-name", "second")
    assert (out / "teachers" / "second" / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    plan = {key: value for key, value in manifest.items()
            if key not in ("shards", "files", "total_bytes", "manifest_fingerprint")}
    (out / "plan.json").write_text(json.dumps(plan))  # as a run killed before its cleanup leaves it
    (out / "commits").mkdir()
    (out / "commits" / "0.0.json").write_text("{}")
    (out / "writer.json").write_text(json.dumps({"owner": "0" * 32, "host": "gone", "pid": 1, "since": 0,
                                                 "renewed": 0}))
    (out / "logits" / ".zarr.json.tmp-123-0123abcd").write_text("torn")
    cli_json("cache-teacher", "--data", data, "--out", out, *CACHE, "--seed", 9, "--overwrite")
    fresh = tmp_path / "fresh"
    cli_json("cache-teacher", "--data", data, "--out", fresh, *CACHE, "--seed", 9)
    assert archive_files(out).keys() == archive_files(fresh).keys()


# --- item 2: hidden files are the user's; only kdpipe's own temporary files are not ----


def test_a_folder_of_dotfiles_is_not_empty(data, tmp_path):
    project = tmp_path / "project"
    before = user_folder(project, {".env": "SECRET=1", ".gitignore": "*.pyc", ".python-version": "3.11"})
    assert_user_error(cache(data, project), "not a kdpipe archive", "holds .env")
    assert archive_files(project) == before


def test_finishing_deletes_only_kdpipes_temporary_files(data, tmp_path):
    """A run killed while writing its plan leaves its lease and the plan's temporary file:
    the re-run takes both as its own and finishes an archive with neither."""
    out = tmp_path / "archive"
    out.mkdir()
    (out / ".plan.json.tmp-123-89abcdef").write_text("{")
    (out / "writer.json").write_text("")
    cli_json("cache-teacher", "--data", data, "--out", out, *CACHE)
    assert not list(out.rglob(".*")) and not (out / "writer.json").exists()


def test_a_file_named_like_a_temporary_file_of_the_users_is_the_users(data, tmp_path):
    project = tmp_path / "project"
    before = user_folder(project, {".thesis.tex.tmp-1-0123abcd": "an editor's backup"})
    assert_user_error(cache(data, project), "holds .thesis.tex.tmp-1-0123abcd")
    assert archive_files(project) == before


# --- item 9: a store that stops answering ends in bounded time --------------------------


@pytest.fixture
def silent_endpoint():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers (a proxy
    that stopped forwarding); its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            held.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for connection in held:
        connection.close()


@pytest.fixture
def short_timeouts(monkeypatch) -> float:
    """Timeouts of one second, so that a test sees the bound; returns the bound."""
    monkeypatch.setattr(store_location, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(store_location, "READ_TIMEOUT", 1.0)
    return store_location.remote_operation_bound()


@pytest.mark.parametrize("server", ["silent", "refused"])
def test_a_store_that_does_not_answer_ends_in_one_line_within_the_bound(data, silent_endpoint, short_timeouts,
                                                                        server):
    endpoint = silent_endpoint if server == "silent" else f"http://127.0.0.1:{free_port()}"
    url = f"s3://{BUCKET}/x"
    started = time.monotonic()
    result = cache(data, url, "--storage-option", f"endpoint_url={endpoint}", "--storage-option", f"key={KEY}",
                   "--storage-option", f"secret={SECRET}")
    elapsed = time.monotonic() - started
    assert_user_error(result, url, endpoint, "after 5 tries")
    assert elapsed < short_timeouts + 5, f"{elapsed:.1f} s, bound {short_timeouts} s"


def test_a_silent_http_archive_ends_train_student_within_the_bound(data, tmp_path, silent_endpoint, short_timeouts):
    started = time.monotonic()
    result = run_cli("train-student", "--data", data, "--cache", f"{silent_endpoint}/archive", "--out",
                     tmp_path / "run", "--student", "kdpipe:mlp", "--epochs", 1, "--workers", 0)
    elapsed = time.monotonic() - started
    assert_user_error(result, f"{silent_endpoint}/archive", "after 5 tries")
    assert elapsed < short_timeouts + 5, f"{elapsed:.1f} s, bound {short_timeouts} s"


def test_the_default_bound_is_sane_and_stated_in_the_docs():
    bound = store_location.remote_operation_bound()
    assert 60 <= bound <= 300
    assert f"{bound:.0f} s" in (REPO / "docs" / "reliability.md").read_text()


# --- item 11: nothing written per epoch up front; the archive must fit -----------------


def test_many_epochs_write_nothing_per_epoch_before_the_teacher_runs(data, tmp_path):
    """The teacher fails on its first batch: the archive holds no index object of any
    epoch (they are committed with each epoch's first shard), and the failure comes at once."""
    out = tmp_path / "archive"
    started = time.monotonic()
    result = run_cli("cache-teacher", "--data", data, "--out", out, "--teacher", "tests.toy_models:nan_teacher",
                     "--epochs", 20000, "--size", 16, "--workers", 0)
    assert_user_error(result, "NaN")
    assert time.monotonic() - started < 30
    assert (out / "commits" / "static.json").is_file()
    assert not (out / "sample_index" / "c").exists() and not (out / "position_index" / "c").exists()


def test_an_archive_larger_than_the_free_space_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "archive"
    result = run_cli("cache-teacher", "--data", "synthetic:200:10000", "--out", out, "--teacher",
                     "tests.toy_models:tiny_cnn", "--epochs", 100000, "--views-per-sample", 8, "--size", 16,
                     "--workers", 0)
    assert_user_error(result, "needs about", "TB", "100000 epochs x 200 samples x 8 views", "free")
    free = shutil.disk_usage(tmp_path).free
    shown = re.search(r"has ([\d.]+) (\w+) free", result.stderr)
    assert shown is not None
    scale = {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[shown[2]]
    assert abs(float(shown[1]) * scale - free) < 0.1 * scale + 1e8
    assert not out.exists()


# --- item 14: the failure that stopped the run is the one reported ---------------------


class ReadOnlyMidway(nn.Module):
    """A teacher that makes its archive folder read-only once it has run a batch (a disk
    remounted read-only, a quota turned to zero)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = tiny_cnn(num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            os.chmod(os.environ["KDPIPE_TEST_READ_ONLY"], 0o555)
        return self.net(x)


def read_only_midway(num_classes: int) -> nn.Module:
    return ReadOnlyMidway(num_classes)


def as_nobody() -> None:
    """Drop to the user nobody. Run as the fork server's `prepare`, after everything the run
    needs was imported while root (nobody cannot read root's Python): this module came in
    with this very function, and the model is made by it; pydantic imports zoneinfo late."""
    import zoneinfo  # noqa: F401

    os.setgid(65534)
    os.setuid(65534)


def test_a_folder_turned_read_only_mid_run_reports_the_failed_write():
    """As an ordinary user (root writes anywhere: the process drops to nobody once it has
    imported kdpipe): the write that failed is reported, not the lease that could
    then not be removed."""
    root = Path(tempfile.mkdtemp(prefix="kdpipe-ro-"))
    try:
        data = write_image_folder(root / "data", per_class=4)
        out = root / "archive"
        out.mkdir()
        for path in [root, *root.rglob("*")]:
            os.chown(path, 65534, 65534)
        result = run_kdpipe("cache-teacher", "--data", data, "--out", out, *CACHE, "--batch-size", 2,
                            "--teacher", "tests.test_store_safety:read_only_midway", prepare=as_nobody,
                            env=subprocess_env() | {"KDPIPE_TEST_READ_ONLY": str(out)})
        assert_user_error(result, f"cannot write {out}/", "Permission denied")
        assert "cannot delete" not in result.stderr
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(root)


def test_a_local_cache_that_cannot_be_written_warns_once_and_training_goes_on(data, tmp_path):
    archive = tmp_path / "archive"
    assert cache(data, archive).exit_code == 0
    blocked = tmp_path / "local-cache"
    blocked.mkdir()
    for prefix in range(256):  # every folder a cached copy would go into is a file: no copy can be kept
        (blocked / f"{prefix:02x}").write_text("")
    result = run_cli("train-student", "--data", data, "--cache", archive, "--local-cache", blocked, "--out",
                     tmp_path / "run", "--student", "kdpipe:mlp", "--epochs", 1, "--workers", 0)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(blocked) in warnings[0] and "--local-cache" in warnings[0], result.stderr
    assert "cache-teacher" not in result.stderr
    assert (tmp_path / "run" / "student.pt").is_file()


def test_a_full_disk_when_taking_the_lease_names_the_file(data, tmp_path):
    """No file may grow (RLIMIT_FSIZE 0, as on a full disk): the first write, the lease,
    fails with one line naming it."""
    out = tmp_path / "archive"
    result = run_kdpipe("cache-teacher", "--data", data, "--out", out, *CACHE,
                        prepare=functools.partial(forkserver.limit_file_size, 0))
    assert_user_error(result, f"{out}/writer.json", "free some space")
    assert not (out / "writer.json").exists()
