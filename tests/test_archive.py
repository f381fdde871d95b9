"""The teacher archive: what it records, how it is committed, and what it refuses.

Most tests run against both backends (zarr and webdataset) through the `backend` fixture."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import ModelSpec
from pipeline.data import ImageFolder, ViewDataset
from pipeline.models import build_model, model_fingerprint
from pipeline.store import BACKENDS, ArchiveReader, read_manifest
from pipeline.store.manifest import LOGITS_SCHEMA_VERSION, SCHEMA_VERSION
from pipeline.errors import ArchiveError

from .conftest import (
    archive_files, assert_user_error, cli_json, run_cli, spawn_kdpipe, write_image_folder,
)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _cache(data, out, *extra, backend="zarr"):
    return cli_json(
        "cache-teacher", "--data", data, "--teacher", "tests.toy_models:tiny_cnn", "--out", out, "--epochs", 2,
        "--views-per-sample", 2, "--size", 16, "--workers", 0, "--shard-size", 4, "--format", backend, *extra,
    )


def _shard_file(archive: Path, epoch: int, shard: int) -> str:
    """The manifest key of the object holding the logits of shard `shard` of `epoch`."""
    entry = next(s for s in read_manifest(archive).shards if (s.epoch, s.shard) == (epoch, shard))
    return next(key for key in entry.files if key.startswith(("logits/", "shards/")))


def test_manifest_records_what_was_cached(image_folder, tmp_path, backend):
    result = _cache(image_folder, tmp_path / "a.zarr", "--codec", "dense-fp32", "--seed", 5, "--color-jitter", 0.2,
                    backend=backend)
    manifest = read_manifest(tmp_path / "a.zarr")
    assert manifest.to_dict()["format"] == "kdpipe-archive" and manifest.schema_version == LOGITS_SCHEMA_VERSION
    recipe = manifest.recipe
    assert (recipe.seed, recipe.epochs, recipe.views_per_sample, recipe.size, recipe.color_jitter) == (5, 2, 2, 16, 0.2)
    source = ImageFolder(image_folder)
    assert manifest.dataset.fingerprint == source.fingerprint
    assert manifest.dataset.classes == ("cat", "dog", "fox")
    teacher = build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=3))
    assert manifest.teacher.fingerprint == model_fingerprint(teacher, teacher.preprocessing)
    assert manifest.teacher.preprocessing == teacher.preprocessing
    assert manifest.codec.to_dict() == {"name": "dense-fp32", "dtype": "float32"} and manifest.backend == backend
    layout = manifest.layout
    assert (layout.epochs, layout.num_samples, layout.views_per_sample, layout.num_classes) == (2, 18, 2, 3)
    assert set(manifest.libraries) >= {"kdpipe", "torch", "torchvision", "zarr", "numcodecs", "numpy"}
    assert len(manifest.shards) == 2 * 5  # 18 positions in shards of 4, two epochs
    # every file is listed with its checksum, and nothing else is in the archive
    files = archive_files(tmp_path / "a.zarr")
    assert set(files) == set(manifest.files) | {"manifest.json"}
    for key, entry in manifest.files.items():
        assert hashlib.sha256(files[key]).hexdigest() == entry.sha256
    assert manifest.total_bytes == sum(e.bytes for e in manifest.files.values())
    assert result["bytes"] == manifest.total_bytes and result["views"] == 2 * 18 * 2

    # the stored logits are the teacher's on exactly the views the recipe renders
    reader = ArchiveReader(tmp_path / "a.zarr")
    dataset = ViewDataset(source, recipe)
    teacher.eval()
    for item in (0, 7, 18 + 17):
        sample = dataset[item]
        logits, params, indices = reader.read(sample["epoch"], sample["position"], sample["position"] + 1)
        assert indices[0] == sample["index"]
        assert np.array_equal(params[0], sample["params"].numpy())
        with torch.inference_mode():
            expected = teacher(sample["views"]).numpy()
        np.testing.assert_allclose(logits[0], expected, rtol=1e-5, atol=1e-5)
    if backend != "zarr":
        return
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert "position_index" not in group  # schema 2 stores nothing derivable from sample_index
    assert np.array_equal(group["labels"][...], source.labels)


def test_float16_is_the_default_and_halves_the_logits(image_folder, tmp_path):
    _cache(image_folder, tmp_path / "h.zarr")
    assert zarr.open_group(str(tmp_path / "h.zarr"), mode="r")["logits"].dtype == np.float16
    assert read_manifest(tmp_path / "h.zarr").codec.dtype == "float16"


def test_finished_archive_is_kept_unless_overwrite(image_folder, tmp_path, backend):
    out = tmp_path / "a.zarr"
    _cache(image_folder, out, backend=backend)
    before = archive_files(out)
    again = _cache(image_folder, out, backend=backend)  # the same job: nothing to do
    assert again["computed_views"] == 0 and archive_files(out) == before
    assert_user_error(
        run_cli("cache-teacher", "--data", image_folder, "--teacher", "tests.toy_models:tiny_cnn", "--out", out,
                "--epochs", 3, "--workers", 0),
        "already exists", "--overwrite",
    )
    assert archive_files(out) == before
    replaced = _cache(image_folder, out, "--seed", 9, "--overwrite", backend=backend)
    assert replaced["computed_views"] == 72 and read_manifest(out).recipe.seed == 9


def test_a_folder_that_is_not_an_archive_is_never_replaced(image_folder, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("do not delete")
    result = run_cli("cache-teacher", "--data", image_folder, "--teacher", "kdpipe:cnn", "--out", tmp_path / "precious",
                     "--overwrite", "--workers", 0)
    assert_user_error(result, "not a kdpipe archive")
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "do not delete"


def test_archive_without_manifest_is_refused_as_unfinished(image_folder, tmp_path, backend):
    _cache(image_folder, tmp_path / "a.zarr", backend=backend)
    (tmp_path / "a.zarr" / "manifest.json").unlink()
    with pytest.raises(ArchiveError, match="not a kdpipe archive"):
        ArchiveReader(tmp_path / "a.zarr")
    (tmp_path / "a.zarr" / "plan.json").write_text("{}")
    result = run_cli("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--out", tmp_path / "run",
                     "--cache", tmp_path / "a.zarr", "--epochs", 1, "--workers", 0)
    assert_user_error(result, "unfinished")


def test_newer_schema_is_refused(image_folder, tmp_path):
    _cache(image_folder, tmp_path / "a.zarr")
    path = tmp_path / "a.zarr" / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ArchiveError, match="upgrade kdpipe"):
        read_manifest(tmp_path / "a.zarr")


def test_non_finite_teacher_output_is_refused_and_nothing_looks_finished(image_folder, tmp_path):
    result = run_cli("cache-teacher", "--data", image_folder, "--teacher", "tests.toy_models:nan_teacher",
                     "--out", tmp_path / "a.zarr", "--workers", 0)
    assert_user_error(result, "NaN or Inf")
    assert not (tmp_path / "a.zarr" / "manifest.json").exists()


def test_logits_beyond_float16_are_refused(image_folder, tmp_path):
    result = run_cli("cache-teacher", "--data", image_folder, "--teacher", "tests.toy_models:huge_teacher",
                     "--out", tmp_path / "a.zarr", "--workers", 0)
    assert_user_error(result, "float16 range", "--codec dense-fp32")
    cli_json("cache-teacher", "--data", image_folder, "--teacher", "tests.toy_models:huge_teacher",
             "--out", tmp_path / "b.zarr", "--workers", 0, "--codec", "dense-fp32")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished archive per backend, made once: (its image folder, its path). Copy it before changing it."""
    data = write_image_folder(tmp_path_factory.mktemp("finished") / "data")
    made = {}

    def get(backend: str) -> tuple[Path, Path]:
        if backend not in made:
            made[backend] = tmp_path_factory.mktemp(f"finished-{backend}") / "archive"
            _cache(data, made[backend], backend=backend)
        return data, made[backend]

    return get


def test_damaged_shards_are_never_trained_on(finished, tmp_path, backend):
    """A shard with one byte flipped: verify names it (exit 1), and train-student trains
    epoch 0, then stops in one line naming it before it is used. (Each kind of damage,
    flipped, truncated and deleted, is refused by the reader: test_store_contract.py.)"""
    data, archive = finished(backend)
    shutil.copytree(archive, tmp_path / "a")
    key = _shard_file(tmp_path / "a", epoch=1, shard=2)
    shard = tmp_path / "a" / key
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    verified = run_cli("verify", tmp_path / "a")
    assert verified.exit_code == 1 and key in verified.stdout and "checksum" in verified.stdout, verified.output
    result = run_cli("train-student", "--data", data, "--student", "kdpipe:mlp", "--out", tmp_path / "run",
                     "--cache", tmp_path / "a", "--epochs", 2, "--workers", 0)
    # shards are verified when first read: epoch 0 trains, epoch 1 stops before using the bad shard
    assert_user_error(result, "damaged", key, after_epochs=True)
    assert not (tmp_path / "run" / "student.pt").exists()


def test_same_job_named_by_other_paths_is_the_same_job(image_folder, tmp_path, monkeypatch):
    weights = tmp_path / "teacher.pt"
    torch.save(build_model(ModelSpec("kdpipe:cnn", num_classes=3)).net.state_dict(), weights)
    args = ["--teacher", "kdpipe:cnn", "--epochs", 1, "--workers", 0, "--size", 16]
    cli_json("cache-teacher", "--data", image_folder, "--weights", weights, "--out", tmp_path / "a.zarr", *args)
    monkeypatch.chdir(tmp_path)
    again = cli_json("cache-teacher", "--data", image_folder.name, "--weights", "teacher.pt", "--out", "a.zarr", *args)
    assert again["computed_views"] == 0


def test_unfinished_archive_of_another_job_is_refused(image_folder, tmp_path):
    out = tmp_path / "a.zarr"
    _cache(image_folder, out)
    (out / "manifest.json").unlink()
    (out / "plan.json").write_text(json.dumps({"recipe": {"seed": 123}}))
    assert_user_error(
        run_cli("cache-teacher", "--data", image_folder, "--teacher", "tests.toy_models:tiny_cnn", "--out", out, "--workers", 0),
        "unfinished archive of a different job",
    )


def test_stock_webdataset_reads_the_shards(image_folder, tmp_path):
    """webdataset.WebDataset over the tar shards yields every record, in training order,
    equal to what kdpipe's reader returns; identical jobs give identical shard bytes."""
    import webdataset

    _cache(image_folder, tmp_path / "w", "--codec", "dense-fp32", backend="webdataset")
    manifest = read_manifest(tmp_path / "w")
    urls = [str(tmp_path / "w" / key) for shard in manifest.shards for key in shard.files]
    records = [sample["npy"] for sample in webdataset.WebDataset(urls, shardshuffle=False).decode()]
    assert len(records) == 2 * 18
    reader = ArchiveReader(tmp_path / "w")
    for epoch in range(2):
        logits, params, indices = reader.read(epoch, 0, 18)
        stock = records[epoch * 18: (epoch + 1) * 18]
        assert [int(r["position"]) for r in stock] == list(range(18))
        assert np.array_equal(np.stack([r["logits"] for r in stock]), logits)
        assert np.array_equal(np.stack([r["view_params"] for r in stock]), params)
        assert np.array_equal([int(r["sample"]) for r in stock], indices)
    _cache(image_folder, tmp_path / "again", "--codec", "dense-fp32", backend="webdataset")
    assert archive_files(tmp_path / "w") == archive_files(tmp_path / "again")


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_lives(tmp_path, image_folder):
    """Two cache-teacher processes on one archive: the second refuses with one line naming
    the first, which finishes a sound archive. (A dead writer's lease is taken over: the
    kill tests of test_reliability.py.)"""
    def args(out):
        return ["cache-teacher", "--data", str(image_folder), "--teacher", "tests.toy_models:slow_teacher",
                "--out", str(out), "--epochs", "2", "--size", "16", "--shard-size", "3", "--batch-size", "3",
                "--workers", "0"]

    first = spawn_kdpipe(*args(tmp_path / "a"))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "a" / "commits").glob("*.*.json")) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    assert_user_error(run_cli(*args(tmp_path / "a")), "being written by another cache-teacher", f"pid {first.pid}")
    assert first.wait(timeout=120) == 0, first.communicate()
    assert run_cli("verify", tmp_path / "a").exit_code == 0
    assert not (tmp_path / "a" / "writer.json").exists()


# --- schema 1: archives kdpipe wrote before schema 2 still read, verify and train ----------------

# Made by kdpipe before schema 2 (its last schema-1 writer), with
#   kdpipe cache-teacher --data synthetic:24:4:20 --teacher tests.toy_models:tiny_cnn --epochs 2
#     --views-per-sample 2 --size 16 --color-jitter 0.2 --batch-size 6 --shard-size 12 --workers 0
#     --out tests/data/schema1/NAME   (dense-fp32.zarr: --codec dense-fp32; topk.zarr: --codec topk:2;
#                                      topk-wds: --codec topk:2 --format webdataset)
SCHEMA1 = Path(__file__).parent / "data" / "schema1"
SCHEMA1_DATA = "synthetic:24:4:20"


@pytest.mark.parametrize("name", ["dense-fp32.zarr", "topk.zarr", "topk-wds"])
def test_schema1_archives_read_and_verify(name, capsys):
    """The spec's own reader and kdpipe's agree on them bit for bit; verify and inspect pass."""
    from .test_docs import format_md

    archive = SCHEMA1 / name
    manifest = read_manifest(archive)
    assert manifest.schema_version == 1 and "logprob_coding" not in manifest.to_dict()["codec"]
    spec, reader = format_md(), ArchiveReader(archive)
    root, checked = spec["open_archive"](archive)
    spec["verify_checksums"](root, checked)
    for epoch in range(2):
        slab = spec["read_slab"](root, checked, epoch, 0, 24)
        logits, params, samples = reader.read(epoch, 0, 24)
        assert slab["logits"].tobytes() == logits.tobytes() and np.isfinite(logits).all()
        assert slab["view_params"].tobytes() == params.tobytes()
        assert np.array_equal(slab["sample"], samples)
    assert "problems: none" in run_cli("verify", archive).output
    inspected = run_cli("inspect", archive, "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.output)["schema_version"] == 1


def test_schema1_dense_fp32_archive_trains_as_online(tmp_path):
    """Offline equals online, bit for bit, from the schema-1 archive too."""
    teacher_weights = tmp_path / "teacher.pt"
    torch.save(build_model(ModelSpec("tests.toy_models:tiny_cnn", num_classes=4)).net.state_dict(), teacher_weights)
    common = ["--data", SCHEMA1_DATA, "--student", "kdpipe:mlp", "--batch-size", 6, "--epochs", 2, "--workers", 0]
    cli_json("train-student", *common, "--cache", SCHEMA1 / "dense-fp32.zarr", "--out", tmp_path / "cached")
    cli_json("train-student", *common, "--mode", "online", "--teacher", "tests.toy_models:tiny_cnn", "--weights",
             teacher_weights, "--views-per-sample", 2, "--size", 16, "--color-jitter", 0.2,
             "--out", tmp_path / "online")
    cached, online = (torch.load(tmp_path / run / "student.pt", weights_only=True)["model"]
                      for run in ("cached", "online"))
    assert cached.keys() == online.keys() and all(torch.equal(cached[k], online[k]) for k in cached)


def test_schema2_topk_stores_the_same_views_in_fewer_bytes(tmp_path):
    """The same job as the schema-1 top-k archive, cached now: schema 2, the same decoded
    logits, view parameters and samples, no position_index, and fewer bytes."""
    out = tmp_path / "topk.zarr"
    cli_json("cache-teacher", "--data", SCHEMA1_DATA, "--teacher", "tests.toy_models:tiny_cnn", "--epochs", 2,
             "--views-per-sample", 2, "--size", 16, "--color-jitter", 0.2, "--batch-size", 6, "--shard-size", 12,
             "--workers", 0, "--codec", "topk:2", "--out", out)
    old, new = ArchiveReader(SCHEMA1 / "topk.zarr"), ArchiveReader(out)
    assert new.manifest.schema_version == 2 and new.manifest.codec.logprob_coding == "delta"
    for epoch in range(2):
        for before, after in zip(old.read(epoch, 0, 24), new.read(epoch, 0, 24)):
            assert before.tobytes() == after.tobytes()
    assert not any(key.startswith("position_index/") for key in new.manifest.files)
    assert new.manifest.total_bytes < old.manifest.total_bytes
    # verify --recompute reads the log-probabilities of either coding
    recomputed = [json.loads(run_cli("verify", archive, "--teacher", "tests.toy_models:tiny_cnn",
                                     "--data", SCHEMA1_DATA, "--recompute", 3, "--json").output)
                  for archive in (SCHEMA1 / "topk.zarr", out)]
    assert recomputed[0]["problems"] == recomputed[1]["problems"] == []
    assert recomputed[0]["recomputed"] == recomputed[1]["recomputed"]


def test_dense_int8_caches_trains_and_refuses_what_it_cannot_store(tmp_path):
    out = tmp_path / "int8.zarr"
    cache = ["cache-teacher", "--data", SCHEMA1_DATA, "--teacher", "tests.toy_models:tiny_cnn", "--epochs", 1,
             "--size", 16, "--workers", 0]
    cli_json(*cache, "--codec", "dense-int8", "--out", out)
    reference = tmp_path / "fp32.zarr"
    cli_json(*cache, "--codec", "dense-fp32", "--out", reference)
    logits, exact = ArchiveReader(out).read(0, 0, 24)[0], ArchiveReader(reference).read(0, 0, 24)[0]
    step = (exact.max(-1, keepdims=True) - exact.min(-1, keepdims=True)) / 254
    assert (np.abs(logits - exact) <= step / 2 + 1e-6).all()
    assert "problems: none" in run_cli("verify", out).output
    cli_json("train-student", "--data", SCHEMA1_DATA, "--student", "kdpipe:mlp", "--cache", out, "--epochs", 1,
             "--workers", 0, "--out", tmp_path / "run")
    assert_user_error(run_cli(*cache, "--codec", "dense-int4", "--out", tmp_path / "x"), "unknown codec", "dense-int8")
