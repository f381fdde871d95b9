"""Archives on remote stores: s3:// against a moto S3 server and http:// against a static
file server, both real servers on 127.0.0.1. Pins that a remote archive holds exactly the
bytes of a local one, that students trained from it (in forked DataLoader workers) get the
same weights bit for bit, that --local-cache keeps verified objects only, and that every
storage failure is one line and exit code 2."""

from __future__ import annotations

import gc
import hashlib
import json
import time
import uuid
from pathlib import Path

import boto3
import pytest
import s3fs
import torch
from moto.core import enable_iam_authentication

from pipeline.store import location

from .conftest import (
    BACKENDS, BUCKET, KEY, SECRET, StaticFiles, archive_files, assert_same_weights, assert_user_error, cli_json,
    free_port, run_cli, run_kdpipe, subprocess_env, weights, write_image_folder,
)

# Two epochs of 18 samples in shards of 4 positions: several shards per epoch, and
# batches of 8 that straddle shard boundaries. float32 so that nothing is rounded.
CACHE_ARGS = ("--teacher", "tests.toy_models:tiny_cnn", "--epochs", 2, "--views-per-sample", 2, "--size", 16,
              "--shard-size", 4, "--codec", "dense-fp32", "--workers", 0)
# Two workers, so that the archive is opened inside forked DataLoader worker processes.
TRAIN_ARGS = ("--student", "kdpipe:mlp", "--epochs", 2, "--batch-size", 8, "--workers", 2)
MAIN_PROCESS_TRAIN_ARGS = TRAIN_ARGS[:-1] + (0,)
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


# --- servers -------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_endpoint) -> dict:
    """The environment of a kdpipe child process that finds the S3 server the standard
    way, through AWS_* variables alone (no storage options)."""
    return subprocess_env() | {
        "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }


@pytest.fixture
def s3_options(s3_endpoint) -> list[str]:
    """--storage-option flags that reach the S3 server with no AWS_* variable set."""
    return ["--storage-option", f"endpoint_url={s3_endpoint}", "--storage-option", f"key={KEY}",
            "--storage-option", f"secret={SECRET}"]


@pytest.fixture
def prefix(request) -> str:
    """A fresh folder in the bucket for this test: s3://bucket/<test>-<random>."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


class FlakyFiles(StaticFiles):
    """Answers a share of requests with 503, like an overloaded server: `fail_every` = 2
    fails every second request, 1 fails them all."""

    fail_every = 2
    requests = 0

    def send_head(self):
        FlakyFiles.requests += 1
        if FlakyFiles.requests % self.fail_every == 0:
            self.send_error(503, "try again")
            return None
        return super().send_head()


# --- local references ----------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("remote") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The local archive of the job, per format, and the student trained from it (computed once)."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(format: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if format not in made:
            root = tmp_path_factory.mktemp(f"reference-{format}")
            cli_json("cache-teacher", "--data", data, "--out", root / "archive", "--format", format, *CACHE_ARGS)
            cli_json("train-student", "--data", data, "--out", root / "run", "--cache", root / "archive", *TRAIN_ARGS)
            made[format] = (root / "archive", weights(root / "run"))
        return made[format]

    return get


# --- s3:// ---------------------------------------------------------------------------


@pytest.mark.parametrize("format", BACKENDS)
def test_s3_archive_is_the_local_archive_and_trains_the_same_student(format, data, tmp_path, s3_env, s3, prefix,
                                                                     reference, monkeypatch):
    """Through AWS_* variables alone (AWS_ENDPOINT_URL included): cache-teacher writes to
    s3:// exactly the bytes of a local run; a student trained from s3:// (the archive
    opened in forked workers) equals, bit for bit, one trained from a copy. (In-process:
    fsspec keeps the filesystem it makes from the variables, which is harmless, as every
    test sees the same server; test_wrong_secret_key_is_a_user_error reads through them in
    a fresh process.)"""
    for name in AWS_VARIABLES:
        monkeypatch.setenv(name, s3_env[name])
    url = f"{prefix}/archive"
    cli_json("cache-teacher", "--data", data, "--out", url, "--format", format, *CACHE_ARGS)
    local_archive, _ = reference(format)
    remote = {path[len(url) - len("s3://") + 1:]: s3.cat_file(path) for path in s3.find(url)}
    assert remote == archive_files(local_archive)
    assert "manifest.json" in remote and not any(k.startswith(("commits/", "plan.json")) for k in remote)

    summary = cli_json("train-student", "--data", data, "--out", tmp_path / "remote-run", "--cache", url, *TRAIN_ARGS)
    assert summary["mode"] == "cached" and summary["epochs"] == 2
    s3.get(url, str(tmp_path / "copy"), recursive=True)
    assert archive_files(tmp_path / "copy") == remote
    cli_json("train-student", "--data", data, "--out", tmp_path / "copy-run", "--cache", tmp_path / "copy", *TRAIN_ARGS)
    assert_same_weights(tmp_path / "remote-run", weights(tmp_path / "copy-run"))


def test_storage_option_endpoint_needs_no_environment(data, tmp_path, s3_options, s3, prefix, reference, monkeypatch):
    """--storage-option endpoint_url=... (with key/secret) reaches the store with no AWS_*
    variable set; the archive is complete and trains the reference student."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    url = f"{prefix}/archive"
    cli_json("cache-teacher", "--data", data, "--out", url, *CACHE_ARGS, *s3_options)
    assert s3.exists(f"{url}/manifest.json")
    cli_json("train-student", "--data", data, "--out", tmp_path / "run", "--cache", url, *TRAIN_ARGS, *s3_options)
    assert_same_weights(tmp_path / "run", reference("zarr")[1])


def test_local_cache_keeps_verified_objects_by_hash(data, tmp_path, s3_options, s3, prefix, reference):
    """--local-cache: objects are kept under their sha256; a second run reads them from
    the cache (the remote shards are gone) and re-fetches a corrupted one rather than use it."""
    url, cache = f"{prefix}/archive", tmp_path / "cache"
    cli_json("cache-teacher", "--data", data, "--out", url, *CACHE_ARGS, *s3_options)
    train = ("train-student", "--data", data, "--cache", url, "--local-cache", cache, *TRAIN_ARGS, *s3_options)
    cli_json(*train, "--out", tmp_path / "first")
    expected = reference("zarr")[1]
    assert_same_weights(tmp_path / "first", expected)

    manifest = json.loads(s3.cat_file(f"{url}/manifest.json"))
    cached = {p.name: p for p in cache.rglob("*") if p.is_file()}
    for name, path in cached.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name and path.parent.name == name[:2]
    assert set(cached) <= {entry["sha256"] for entry in manifest["files"].values()}
    shards = {k: v["sha256"] for k, v in manifest["files"].items() if k.startswith("logits/c/")}
    assert len(shards) == 2 * 5 and set(shards.values()) <= set(cached)

    # corrupt one cached shard, and delete every other shard from the store: the second
    # run must take the others from the cache and fetch the corrupted one afresh
    corrupted_key = "logits/c/1/2/0/0"
    corrupted = cached[shards[corrupted_key]]
    good = corrupted.read_bytes()
    corrupted.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    for key in shards:
        if key != corrupted_key:
            s3.rm(f"{url}/{key}")
    cli_json(*train, "--out", tmp_path / "second")
    assert_same_weights(tmp_path / "second", expected)
    assert corrupted.read_bytes() == good


# --- http:// -------------------------------------------------------------------------


@pytest.mark.parametrize("format", BACKENDS)
def test_train_from_http(format, data, tmp_path, reference, http_server):
    """A local archive served over plain http:// trains the reference student, in forked
    workers: reading fetches only the objects the manifest names (the server lists nothing)."""
    archive, expected = reference(format)
    base = http_server(archive.parent)
    cli_json("train-student", "--data", data, "--out", tmp_path / "run", "--cache", f"{base}/{archive.name}", *TRAIN_ARGS)
    assert_same_weights(tmp_path / "run", expected)


@pytest.mark.slow
def test_transient_failures_are_retried_and_persistent_ones_reported(data, tmp_path, reference, http_server,
                                                                     monkeypatch):
    """A server failing every second request still trains the reference student (each
    failed read is retried with backoff); one failing every request gives one line
    naming the object and the number of tries, and nothing is trained."""
    archive, expected = reference("zarr")
    monkeypatch.setattr(location, "RETRY_DELAY", 0.01)  # what is tested is that reads are retried, not how long apart
    monkeypatch.setattr(FlakyFiles, "fail_every", 2)
    base = http_server(archive.parent, FlakyFiles)
    cli_json("train-student", "--data", data, "--out", tmp_path / "run", "--cache", f"{base}/{archive.name}",
             *MAIN_PROCESS_TRAIN_ARGS)
    assert_same_weights(tmp_path / "run", expected)
    assert FlakyFiles.requests > 10

    monkeypatch.setattr(FlakyFiles, "fail_every", 1)
    result = run_cli("train-student", "--data", data, "--out", tmp_path / "down", "--cache", f"{base}/{archive.name}",
                     *MAIN_PROCESS_TRAIN_ARGS)
    assert_user_error(result, f"{base}/{archive.name}/manifest.json", "after 5 tries", "503")
    assert not (tmp_path / "down" / "summary.json").exists()


def test_http_is_read_only(data, tmp_path, http_server):
    """cache-teacher --out http://... is refused before anything is computed."""
    (tmp_path / "served").mkdir()
    base = http_server(tmp_path / "served")
    result = run_cli("cache-teacher", "--data", data, "--out", f"{base}/archive", *CACHE_ARGS)
    assert_user_error(result, "read-only", f"{base}/archive")
    assert not any((tmp_path / "served").iterdir())


# --- what is refused -------------------------------------------------------------------


@pytest.fixture
def iam_user(s3_endpoint):
    """Real credentials of an IAM user allowed everything: (access key id, secret)."""
    iam = boto3.client("iam", endpoint_url=s3_endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                       region_name="us-east-1")
    name = f"user-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.slow
def test_wrong_secret_key_is_a_user_error(data, tmp_path, s3_env, s3_endpoint, s3_options, prefix, iam_user):
    """With moto's IAM checks on (moto accepts any key otherwise), a valid key id with the
    wrong secret is refused in one line, for reading (through AWS_* variables) and for
    writing (through --storage-option), and is not mistaken for a missing archive."""
    key_id, secret = iam_user
    url = f"{prefix}/archive"
    cli_json("cache-teacher", "--data", data, "--out", url, *CACHE_ARGS, *s3_options)
    with enable_iam_authentication():
        # the right secret reads the archive: what follows fails for the secret alone
        right = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=key_id, secret=secret, skip_instance_cache=True)
        assert right.cat_file(f"{url}/manifest.json")
        bad_env = s3_env | {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        result = run_kdpipe("train-student", "--data", data, "--out", tmp_path / "run", "--cache", url, *TRAIN_ARGS,
                            env=bad_env)
        assert_user_error(result, url)
        assert "does not exist" not in result.stderr
        assert not (tmp_path / "run" / "summary.json").exists()

        bad_options = ["--storage-option", f"endpoint_url={s3_endpoint}", "--storage-option", f"key={key_id}",
                       "--storage-option", "secret=not-the-secret"]
        result = run_cli("cache-teacher", "--data", data, "--out", f"{prefix}/other", *CACHE_ARGS, *bad_options)
        assert_user_error(result, f"{prefix}/other")
    assert not right.exists(f"{prefix}/other")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train-student", "cache-teacher"])
def test_unreachable_endpoint_fails_fast(command, data, tmp_path):
    """An endpoint where nothing listens: one line naming the archive, within seconds when
    botocore's retries are turned down through nested storage options (its default
    retries with back-off take about 5-10 s here)."""
    closed = f"http://127.0.0.1:{free_port()}"
    options = ["--storage-option", f"endpoint_url={closed}", "--storage-option", f"key={KEY}",
               "--storage-option", f"secret={SECRET}", "--storage-option", "config_kwargs.connect_timeout=1",
               "--storage-option", "config_kwargs.retries.max_attempts=1"]
    url = f"s3://{BUCKET}/nowhere"
    if command == "train-student":
        args = ("--out", tmp_path / "run", "--cache", url, *TRAIN_ARGS)
    else:
        args = ("--out", url, *CACHE_ARGS)
    started = time.monotonic()
    result = run_cli(command, "--data", data, *args, *options)
    assert_user_error(result, url, "cannot read" if command == "train-student" else "cannot reach")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "run").exists()


def test_missing_archive_on_s3(data, tmp_path, s3_options, prefix):
    """A URL in a reachable bucket where no archive was ever written."""
    result = run_cli("train-student", "--data", data, "--out", tmp_path / "run", "--cache", f"{prefix}/nothing",
                     *TRAIN_ARGS, *s3_options)
    assert_user_error(result, f"{prefix}/nothing", "does not exist")
    assert not (tmp_path / "run").exists()


def test_damaged_object_on_s3_is_never_trained_on(data, tmp_path, s3_options, s3, prefix, monkeypatch):
    """An object overwritten with other bytes of the same size: train-student names it and
    stops in the first step (no epoch done), though it is read in a DataLoader worker
    (whose error must still come out as one line). Damage read in the main process is
    test_archive.py's test_damaged_shards_are_never_trained_on."""
    # A failed run's DataLoader workers are reaped when its iterator is collected, which
    # waits MP_STATUS_CHECK_INTERVAL (5 s) for each: shorten the wait, reap them here.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    url = f"{prefix}/archive"
    cli_json("cache-teacher", "--data", data, "--out", url, *CACHE_ARGS, *s3_options)
    key = "logits/c/0/1/0/0"
    good = s3.cat_file(f"{url}/{key}")
    s3.pipe_file(f"{url}/{key}", bytes([good[0] ^ 0xFF]) + good[1:])
    result = run_cli("train-student", "--data", data, "--out", tmp_path / "run", "--cache", url, *TRAIN_ARGS,
                     *s3_options)
    assert_user_error(result, "damaged", url, key)
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "student.pt").exists()
    del result  # its traceback holds the DataLoader: collected, it shuts its workers down
    gc.collect()
