"""Shared helpers: real image folders on disk, CLI runs (in-process, in a process forked
from the fork server, and cold), error checks, trained weights, real S3 and HTTP servers
on 127.0.0.1, and the order the tests run in."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline.store import BACKENDS  # noqa: F401 (every archive backend: tests that hold for each run on both)

from .forkserver import ForkServer, Forked, install_shim

REPO = Path(__file__).resolve().parents[1]

# One thread per process: pytest-xdist runs a worker per core, and the tests' models are
# tiny, so more threads would only compete for the cores. Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
MODES = ("L", "RGB", "RGBA", "P")


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 6, seed: int = 0,
    labelled: bool = True,
) -> Path:
    """A real image folder: PNG and JPEG, grayscale/RGB/RGBA/palette, assorted sizes.
    Each class has its own mean colour so that a model can learn something."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(14, 40, size=2))
            base = np.array([60 + 70 * c, 200 - 60 * c, 90 + 30 * (c % 2)], dtype=float)
            pixels = np.clip(base + rng.normal(0, 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert(MODES[(c + i) % len(MODES)])
            suffix = ".jpg" if i % 3 == 2 and image.mode in ("L", "RGB") else ".png"
            image.save(folder / f"{name}_{i:03d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


def archive_files(root: Path) -> dict[str, bytes]:
    """Every file below `root` (hidden ones included: a leftover temporary file counts)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args):
    """Run kdpipe in-process, as a user would from the shell."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_json(*args) -> dict:
    """Run a command that must succeed; its last stdout line is JSON."""
    result = run_cli(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_user_error(result, *fragments: str, after_epochs: bool = False) -> None:
    """Exit 2, one line on stderr that starts with 'error:' and names the problem, no traceback.
    With `after_epochs`, the error may follow the status lines of epochs already trained."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    if after_epochs:
        assert all("] epoch " in line for line in lines[:-1]), result.stderr
        lines = lines[-1:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def train_until(monkeypatch, stop_after_epochs: int, *args):
    """Run train-student in-process and stop it as Ctrl-C would once `stop_after_epochs`
    epochs are checkpointed: the run directory is what a kill at that moment leaves."""
    from pipeline.rundir import RunDir

    saved = {"epochs": 0}
    save = RunDir.save_checkpoint

    def save_then_stop(self, state):
        save(self, state)
        saved["epochs"] += 1
        if saved["epochs"] == stop_after_epochs:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", save_then_stop)
        result = run_cli("train-student", *args)
    assert result.exit_code == 130, result.output
    return result


def subprocess_env() -> dict:
    """Environment for running kdpipe in a child process that can import `tests`."""
    return os.environ | {"PYTHONPATH": str(REPO)}


KDPIPE = [sys.executable, "-m", "cli"]  # a cold start, for the tests where that is the point


TIMM_NAME, TIMM_TAG = "test_resnet", "r160_in1k"  # a tiny timm model with a published tag, for tests


def offline_env(tmp_path: Path) -> dict:
    """A kdpipe process's environment whose Hugging Face and torch hub caches are empty
    folders below `tmp_path` and which cannot download: the hub is offline, and every
    HTTP(S) request goes to a proxy port nothing listens on."""
    proxy = f"http://127.0.0.1:{free_port()}"
    return subprocess_env() | {
        "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": proxy, "http_proxy": proxy, "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": "",
    }


def put_timm_weights(env: dict) -> dict[str, torch.Tensor]:
    """A 1000-class test_resnet's weights as the hub cache keeps timm/test_resnet.r160_in1k:
    models--timm--NAME/snapshots/COMMIT/model.safetensors, and refs/main naming COMMIT."""
    torch.manual_seed(1)
    state = timm.create_model(TIMM_NAME).state_dict()
    repo = Path(env["HF_HUB_CACHE"]) / f"models--timm--{TIMM_NAME}.{TIMM_TAG}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(state, repo / "snapshots" / commit / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return state


@dataclass
class Finished:
    """A kdpipe child process, shaped like CliRunner's result so `assert_user_error` reads it."""

    exit_code: int
    stdout: str
    stderr: str
    exception: None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@functools.cache
def fork_server() -> ForkServer:
    """This pytest process's fork server (see tests/forkserver.py), started on first use,
    with a `kdpipe` shim beside its socket."""
    folder = Path(tempfile.mkdtemp(prefix="kdpipe-fork-"))  # short: a socket path has a length limit
    server = ForkServer.start(folder, subprocess_env())
    install_shim(folder, server.socket_path)
    return server


def pytest_sessionfinish(session):
    if fork_server.cache_info().currsize:
        server = fork_server()
        server.close()
        shutil.rmtree(server.socket_path.parent, ignore_errors=True)


def spawn_kdpipe(*args, env: dict | None = None, start_new_session: bool = False,
                 prepare: Callable[[], None] | None = None) -> Forked:
    """Start kdpipe in a process of its own, as a user would from the shell, used like
    subprocess.Popen. For what needs a process: kills, signals, resource limits."""
    return fork_server().popen(args, REPO, env or subprocess_env(), start_new_session, prepare)


def run_kdpipe(*args, env: dict | None = None, timeout: float = 180,
               prepare: Callable[[], None] | None = None) -> Finished:
    """Run kdpipe in a process of its own to the end (see `spawn_kdpipe`)."""
    child = spawn_kdpipe(*args, env=env, prepare=prepare)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    return Finished(child.returncode, stdout, stderr)


# --- trained students ----------------------------------------------------------------


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The student's weights a run directory holds."""
    return torch.load(run / "student.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(run: Path, expected: dict[str, torch.Tensor]) -> None:
    got = weights(run)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs from the reference run"


# --- a real S3 server ------------------------------------------------------------------

BUCKET = "kdpipe-test"
KEY, SECRET = "testing", "testing"  # moto accepts any credentials until IAM checks are switched on


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with one bucket, shared by every test; its URL. Each
    test writes under a prefix of its own."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the test server, to look at what kdpipe stored."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)


# --- a real HTTP server ----------------------------------------------------------------


class StaticFiles(http.server.SimpleHTTPRequestHandler):
    """Plain files only, like a CDN or a bucket's public URL: no directory listings, no log lines."""

    def list_directory(self, path):
        self.send_error(404, "no directory listings here")
        return None

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    """Serve a folder's files over http:// from 127.0.0.1; call it with the folder (and a
    handler class), get the base URL."""
    servers = []

    def serve(folder: Path, handler_class=StaticFiles) -> str:
        handler = functools.partial(handler_class, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


# --- order ---------------------------------------------------------------------------------


def pytest_collection_modifyitems(items):
    """The longest chain first: the docs' commands on the quickstart's folder, which wait
    for `kdpipe quickstart`; then the other slow tests; README's own commands last, so that
    under pytest-xdist (each worker takes a half, then steals) the second worker meets
    them only once the quickstart is done, and the short tests fill in around the rest."""
    def rank(item) -> int:
        if "quickstart" in item.fixturenames:
            return 3 if "README" in item.name else 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)
