"""train-student against ordinary mistakes and interruptions: reproducible random layers,
a run directory pinned to its inputs and locked to one process, stop signals handled
like Ctrl-C, and every bad option or damaged run file refused in one line."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import signal
import time

import pytest
import torch

from . import forkserver
from .conftest import (assert_user_error, cli_json, run_cli, run_kdpipe, spawn_kdpipe, train_until, weights,
                       write_image_folder)

DATA = "synthetic:24:4:20"
CACHE = ["--data", DATA, "--teacher", "tests.toy_models:tiny_cnn", "--epochs", 3, "--views-per-sample", 2,
         "--size", 16, "--batch-size", 6, "--workers", 0]
TRAIN = ["--data", DATA, "--batch-size", 6, "--epochs", 3, "--workers", 0]


def same_weights(a, b) -> bool:
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_with_dropout_trains_reproducibly_offline_online_and_resumed(tmp_path, monkeypatch):
    """Every generator a run uses is seeded from the run's seed and the step: two cached
    runs of a dropout student are identical (whatever ran before them in the process, and
    with or without workers), equal the online run, and a run stopped after its first
    epoch and resumed ends with the same weights."""
    from pipeline.config import ModelSpec
    from pipeline.models import build_model

    archive = tmp_path / "t.zarr"
    cli_json("cache-teacher", *CACHE, "--out", archive, "--codec", "dense-fp32")
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4)).net.state_dict(), teacher)
    cached = [*TRAIN, "--student", "tests.toy_models:dropout_mlp", "--cache", archive]
    torch.manual_seed(1)
    cli_json("train-student", *cached, "--out", tmp_path / "a")
    torch.manual_seed(2)
    cli_json("train-student", *cached, "--out", tmp_path / "b", "--workers", 2)
    cli_json("train-student", *TRAIN, "--student", "tests.toy_models:dropout_mlp", "--mode", "online",
             "--teacher", "tests.toy_models:tiny_cnn", "--weights", teacher, "--views-per-sample", 2, "--size", 16,
             "--out", tmp_path / "online")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "online")
    train_until(monkeypatch, 1, *cached, "--out", tmp_path / "resumed")
    cli_json("train-student", *cached, "--out", tmp_path / "resumed", "--resume")
    assert same_weights(tmp_path / "a", tmp_path / "resumed")
    # and the dropout really draws: another seed gives other weights
    cli_json("train-student", *cached, "--out", tmp_path / "c", "--init-seed", 1)
    assert not same_weights(tmp_path / "a", tmp_path / "c")


def test_resume_refuses_a_replaced_archive(tmp_path, monkeypatch):
    """A run directory pins the archive's manifest it started on: replacing the archive
    (other teacher weights) between a kill and --resume is refused by name."""
    archive = tmp_path / "t.zarr"
    cli_json("cache-teacher", *CACHE, "--out", archive)
    cached = [*TRAIN, "--student", "kdpipe:mlp", "--cache", archive, "--out", tmp_path / "run"]
    train_until(monkeypatch, 1, *cached)
    cli_json("cache-teacher", *CACHE, "--out", archive, "--overwrite", "--teacher", "kdpipe:cnn")
    assert_user_error(run_cli("train-student", *cached, "--resume"), "inputs.archives.main", "differs")


def test_resume_refuses_moved_images(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "data")
    args = ["--data", data, "--student", "kdpipe:mlp", "--mode", "supervised", "--epochs", 2, "--size", 16,
            "--workers", 0, "--batch-size", 6, "--out", tmp_path / "run"]
    train_until(monkeypatch, 1, *args)
    moved = sorted((data / "cat").iterdir())[0]
    moved.rename(data / "dog" / moved.name)
    assert_user_error(run_cli("train-student", *args, "--resume"), "inputs.dataset", "differs")


def test_the_union_of_teachers_classes_is_ordered_like_class_folders_on_unlabelled_data(tmp_path):
    """Teachers of classes c2-c3 and c0-c3 over an unlabelled pool: the student's outputs
    are c0..c3 in name order whatever the order of --teachers, the run records them, and
    a validation folder of those classes scores them."""
    pool = write_image_folder(tmp_path / "pool", classes=("c0", "c1", "c2", "c3"), per_class=4, labelled=False)
    val = write_image_folder(tmp_path / "val", classes=("c0", "c1", "c2", "c3"), per_class=2, seed=1)
    archive = tmp_path / "archive"
    common = ["--data", pool, "--teacher", "kdpipe:cnn", "--epochs", 2, "--size", 16, "--workers", 0]
    cli_json("cache-teacher", *common, "--num-classes", 4, "--teacher-classes", "c0,c1,c2,c3", "--out", archive)
    cli_json("cache-teacher", *common, "--num-classes", 2, "--teacher-classes", "c3,c2", "--out", archive,
             "--teacher-name", "hi")
    summary = cli_json("train-student", "--data", pool, "--student", "kdpipe:mlp", "--cache", archive, "--epochs", 2,
                       "--workers", 0, "--teachers", "hi,main", "--val", val, "--out", tmp_path / "s")
    assert summary["classes"] == ["c0", "c1", "c2", "c3"]
    # the teachers' classes alone name the outputs: a validation folder of other classes is refused
    other = write_image_folder(tmp_path / "other", classes=("c0", "c1", "c2", "zebra"), per_class=2)
    assert_user_error(run_cli("train-student", "--data", pool, "--student", "kdpipe:mlp", "--cache", archive,
                              "--epochs", 2, "--workers", 0, "--teachers", "hi,main", "--val", other,
                              "--out", tmp_path / "z"), "not the student's classes")


def test_a_second_train_student_on_the_same_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["train-student", "--data", DATA, "--student", "kdpipe:mlp", "--mode", "supervised", "--epochs", 1,
            "--workers", 0, "--out", out]
    out.mkdir()
    holder = os.open(out / "run.lock", os.O_RDWR | os.O_CREAT)  # another train-student holds the directory
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert_user_error(run_cli(*args), "in use by another train-student")
    finally:
        os.close(holder)
    cli_json(*args)  # the lock goes with the process that held it


@pytest.mark.slow
def test_stop_signals_are_handled_like_ctrl_c_in_both_stages(tmp_path):
    """A scheduler's SIGTERM to cache-teacher and a closed terminal's SIGHUP to
    train-student (one handler serves both signals in both stages), each to the whole
    process group, DataLoader workers included: one line, exit 128 + the signal, the
    writer lease released, no traceback; the re-run completes."""
    data = write_image_folder(tmp_path / "data", per_class=8)
    archive = tmp_path / "archive"
    cache = ["cache-teacher", "--data", data, "--teacher", "tests.toy_models:paced_teacher", "--out", archive,
             "--epochs", 4, "--size", 16, "--shard-size", 4, "--batch-size", 2, "--workers", 2]
    train = ["train-student", "--data", data, "--student", "tests.toy_models:slow_student", "--mode", "supervised",
             "--epochs", 6, "--batch-size", 4, "--size", 16, "--workers", 2, "--out", tmp_path / "run"]
    for command, started, rerun, signum in (
            (cache, lambda: list(archive.glob("commits/*.*.json")), [], signal.SIGTERM),
            (train, lambda: (tmp_path / "run" / "checkpoint.pt").exists(), ["--resume"], signal.SIGHUP)):
        child = spawn_kdpipe(*command, start_new_session=True)
        deadline = time.monotonic() + 120
        while not started() and time.monotonic() < deadline:
            assert child.poll() is None, child.communicate()
            time.sleep(0.05)
        os.killpg(child.pid, signum)
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 128 + signum, stderr
        name = signal.Signals(signum).name
        assert stderr.strip().splitlines()[-1].startswith(f"interrupted by {name}; re-run the same command"), stderr
        assert "Traceback" not in stderr, stderr
        assert not (archive / "writer.json").exists()
        finished = run_kdpipe(*command, *rerun)
        assert finished.exit_code == 0, finished.stderr


@pytest.mark.parametrize("option, value", [
    ("--workers", "-1"), ("--lr", "-0.1"), ("--lr", "nan"), ("--weight-decay", "-1"), ("--momentum", "-0.5"),
    ("--momentum", "inf"), ("--temperature", "nan"), ("--epochs", "200000"), ("--epochs", "99999999999999999999"),
    ("--size", "100000"), ("--scale", "0.5,inf"), ("--ratio", "nan,1"), ("--flip-prob", "nan"), ("--init-seed", "-1"),
    ("--batch-size", "0"), ("--student-size", "0"),
])
def test_bad_numbers_are_refused_by_name_before_anything_is_written(tmp_path, option, value):
    out = tmp_path / "run"
    result = run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--mode", "supervised",
                     "--out", out, option, value)
    assert_user_error(result, option)
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_bad_mix_alpha_is_refused_by_name(tmp_path, value):
    result = run_cli("cache-teacher", *CACHE, "--out", tmp_path / "a", "--mixup", "mixup", "--mix-alpha", value)
    assert_user_error(result, "--mix-alpha")
    assert not (tmp_path / "a").exists()


def test_a_student_that_cannot_take_the_views_is_refused_before_the_run_directory(tmp_path):
    out = tmp_path / "run"
    base = ["train-student", "--data", DATA, "--student", "kdpipe:cnn", "--mode", "supervised", "--epochs", 1,
            "--workers", 0, "--out", out]
    assert_user_error(run_cli(*base, "--size", 2), "2 x 2 pixels", "--size")
    assert not out.exists()
    assert_user_error(run_cli("train-student", "--data", DATA, "--student", "tests.toy_models:dict_output",
                              "--mode", "supervised", "--out", out), "returns dict")
    assert not out.exists()
    cli_json(*base, "--size", 16)  # the corrected command is not blocked by anything left behind


def test_damaged_run_files_on_resume(tmp_path, monkeypatch):
    """A garbage config.json or a truncated checkpoint is refused in one line, naming the
    file; a torn last line of metrics.jsonl is dropped and the run resumes."""
    out = tmp_path / "run"
    args = ["--data", DATA, "--student", "kdpipe:mlp", "--mode", "supervised", "--epochs", 2, "--workers", 0,
            "--batch-size", 6, "--out", out]
    train_until(monkeypatch, 1, *args)
    config, checkpoint = (out / "config.json").read_bytes(), (out / "checkpoint.pt").read_bytes()
    (out / "config.json").write_text("{not json")
    assert_user_error(run_cli("train-student", *args, "--resume"), "config.json is damaged")
    (out / "config.json").write_bytes(config)
    (out / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    assert_user_error(run_cli("train-student", *args, "--resume"), "checkpoint.pt is damaged")
    (out / "checkpoint.pt").write_bytes(checkpoint)
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write('{"epoch": 2, "lo')
    cli_json("train-student", *args, "--resume")
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def unprivileged(call):
    """`call()`'s outcome (the message of the KdpipeError it raised, or None) with the
    file permissions of an ordinary user: as root, in a forked child that drops to nobody
    (root reads every folder, whatever its mode)."""
    from pipeline.errors import KdpipeError

    def outcome() -> str:
        try:
            call()
        except KdpipeError as exc:
            return str(exc)
        return ""

    if os.geteuid() != 0:
        return outcome()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, outcome().encode())
        except BaseException as exc:  # noqa: BLE001 - report anything else as a failure of the test
            os.write(write, f"unexpected {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(child, 0)
    return message


@pytest.fixture
def open_folder():
    """A folder that an ordinary user may enter (pytest's own tmp_path is root's alone)."""
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="kdpipe-test-"))
    root.chmod(0o755)
    yield root
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


def test_unreadable_folders_and_broken_links_are_named_not_skipped(open_folder, tmp_path, capsys):
    from pipeline.data import ImageFolder
    from pipeline.errors import DataError

    root = open_folder
    data = write_image_folder(root / "data", per_class=3)
    for folder in [root, data, *data.iterdir()]:
        folder.chmod(0o755)
    for image in data.rglob("*.*"):
        image.chmod(0o644)
    assert unprivileged(lambda: ImageFolder(data)) == ""  # all readable: no complaint
    hidden = data / "cat" / "more"
    hidden.mkdir()
    (data / "cat" / "cat_000.png").rename(hidden / "cat_000.png")
    hidden.chmod(0)
    assert f"cannot read {hidden}" in unprivileged(lambda: ImageFolder(data))
    hidden.chmod(0o755)
    (data / "dog").chmod(0)
    assert f"cannot read {data / 'dog'}" in unprivileged(lambda: ImageFolder(data))
    (data / "dog").chmod(0o755)
    data.chmod(0)
    assert "cannot read" in unprivileged(lambda: ImageFolder(data))
    data.chmod(0o755)
    # a dangling link is named (it was a traceback)
    (data / "fox" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="gone.png"):
        ImageFolder(data)
    (data / "fox" / "gone.png").unlink()
    # an empty class folder stays a class, with a warning
    (data / "zebra").mkdir()
    capsys.readouterr()
    assert ImageFolder(data).classes == ["cat", "dog", "fox", "zebra"]
    warning = capsys.readouterr().err
    assert "warning: class folder" in warning and "zebra" in warning and "holds no images" in warning


@pytest.mark.parametrize("command, option", [
    ("cache-teacher", "--out"), ("cache-teacher", "--data"), ("train-student", "--out"), ("train-student", "--data"),
    ("train-student", "--cache"), ("train-student", "--val"),
])
def test_an_empty_path_is_refused_at_once(tmp_path, monkeypatch, command, option):
    """"" would be the current folder, or "/" (a whole filesystem walked before any refusal)."""
    monkeypatch.chdir(tmp_path)
    args = {"cache-teacher": ["--data", DATA, "--teacher", "kdpipe:cnn", "--out", "a"],
            "train-student": ["--data", DATA, "--student", "kdpipe:mlp", "--mode", "supervised", "--out", "r"]}[command]
    args = [*args, option, ""] if option not in args else [value if previous != option else ""
                                                           for previous, value in zip([None, *args], args)]
    assert_user_error(run_cli(command, *args), f"{option} is empty")
    assert list(tmp_path.iterdir()) == []


def bmp_folder(root, classes=("cat", "dog"), per_class=4):
    """Images whose files all have the same byte size (BMP of one shape): swapping two
    keeps every name and size, so only their content tells them apart."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(80 + 90 * c, 30, size=(20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.bmp")
    return root


@pytest.mark.parametrize("mixup", [[], ["--mixup", "mixup"]])
def test_a_changed_image_with_the_same_name_and_size_is_refused_by_name(tmp_path, mixup):
    """Two images swapped across classes, or one regenerated in place, keep every name,
    size and label: the dataset fingerprint cannot see it, the content check does, and
    names the files (a mixing partner's too)."""
    data = bmp_folder(tmp_path / "data")
    archive = tmp_path / "a.zarr"
    common = ["--data", data, "--size", 16, "--epochs", 1, "--workers", 0, *mixup]
    cli_json("cache-teacher", *common, "--teacher", "kdpipe:cnn", "--out", archive)
    cat, dog = data / "cat" / "cat_1.bmp", data / "dog" / "dog_2.bmp"
    cat_bytes, dog_bytes = cat.read_bytes(), dog.read_bytes()
    assert len(cat_bytes) == len(dog_bytes)
    cat.write_bytes(dog_bytes)
    dog.write_bytes(cat_bytes)
    train = ["train-student", "--data", data, "--student", "kdpipe:mlp", "--cache", archive, "--epochs", 1,
             "--workers", 0, "--batch-size", 8]
    assert_user_error(run_cli(*train, "--out", tmp_path / "s"), "cat_1.bmp", "dog_2.bmp", "changed since archive")
    assert not (tmp_path / "s" / "student.pt").exists()
    verify = run_cli("verify", archive, "--teacher", "kdpipe:cnn", "--data", data, "--recompute", 8)
    assert verify.exit_code == 1 and "cat_1.bmp changed since the archive was cached" in verify.stdout
    cat.write_bytes(cat_bytes)
    dog.write_bytes(dog_bytes)
    cli_json(*train, "--out", tmp_path / "restored")  # the files restored: the archive is theirs again
    # regenerated in place: same name, same size, other pixels
    dog.write_bytes(dog_bytes[:-3] + bytes(3))
    assert_user_error(run_cli(*train, "--out", tmp_path / "r"), "dog_2.bmp")


def test_verify_recompute_compares_the_stored_view_parameters(tmp_path):
    """An archive whose crop boxes were altered and re-sealed passes every checksum;
    --recompute re-derives each view and finds it."""
    from pipeline.store import ArchiveReader, FileEntry, read_manifest, seal
    from pipeline.store import json_bytes
    import zarr

    archive = tmp_path / "a.zarr"
    cli_json("cache-teacher", *CACHE, "--out", archive, "--shard-size", 24)
    group = zarr.open_group(str(archive), mode="r+")
    params = group["view_params"][...]
    params[:, :, :, 0] += 1  # every crop box moved down a pixel
    group["view_params"][...] = params
    manifest = json.loads((archive / "manifest.json").read_text())
    for key in list(manifest["files"]):
        manifest["files"][key] = FileEntry.of((archive / key).read_bytes()).to_dict()
    manifest["total_bytes"] = sum(entry["bytes"] for entry in manifest["files"].values())
    (archive / "manifest.json").write_bytes(json_bytes(seal(manifest)))
    read_manifest(archive)
    ArchiveReader(archive).read(0, 0, 1)  # sound as far as checksums go
    result = run_cli("verify", archive, "--teacher", "tests.toy_models:tiny_cnn", "--data", DATA, "--recompute", 4)
    assert result.exit_code == 1, result.output
    assert "stored view parameters are not those the recipe gives" in result.stdout


def test_workers_out_of_shared_memory_get_one_line_with_advice(tmp_path):
    """PyTorch hands a worker's batch over in a shared-memory file; when it cannot be
    made (a small /dev/shm, as in a default container; here a file-size limit, which
    stops those files alike) the run ends in one line saying what to do."""
    command = ["train-student", "--data", DATA, "--student", "kdpipe:mlp", "--mode", "supervised", "--epochs", "1",
               "--batch-size", "12", "--size", "32", "--workers", "2", "--out", str(tmp_path / "run")]
    child = run_kdpipe(*command, prepare=functools.partial(forkserver.limit_file_size, 32768))
    assert child.exit_code == 2, child.stderr
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in child.stderr, child.stderr
    assert lines[0].startswith("error: the DataLoader workers ran out of shared memory") and "--workers 0" in lines[0]
