"""One contract per store interface, run against every implementation (zarr's
`StoreTests` pattern): what every archive backend and every `Location` must do.

- `BackendContract`: units written through `ArchiveWriter` and read back through
  `ArchiveReader`, for each backend in `pipeline.store.BACKENDS` (one short subclass
  each): every codec round-trips, identical jobs give identical bytes, a resumed job
  skips committed units and ends byte-identical, a damaged or missing shard is refused
  by its checksum before anything decodes it, out-of-range reads are refused, and an
  archive of one sample or of one class reads back. End to end, such archives also
  cache, verify, inspect and train through the CLI.
- `LocationContract`: reads, missing keys, atomic writes, exclusive creation, listing
  and deletion, on a local folder, `memory://`, a moto S3 server and (read-only) an
  HTTP server, all real.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ModelSpec, ViewRecipe
from pipeline.errors import ArchiveError, ConfigError
from pipeline.store import (BACKENDS, ArchiveReader, ArchiveWriter, DatasetInfo, Location, Manifest, TeacherInfo,
                            parse_codec, read_manifest)
from pipeline.views import epoch_order

from .conftest import BUCKET, KEY, SECRET, archive_files, assert_user_error, cli_json, run_cli

CODECS = ("dense-fp32", "dense-fp16", "topk:2")


# --- the backend contract ---------------------------------------------------------------


def make_plan(backend: str, codec: str = "dense-fp32", num_samples: int = 10, classes: int = 3,
              epochs: int = 2, views: int = 2, shard: int = 4) -> Manifest:
    """The plan of a small archive, as cache-teacher would make it (no model needed)."""
    recipe = ViewRecipe(size=8, views_per_sample=views, epochs=epochs, seed=3)
    names = tuple(f"class_{c}" for c in range(classes))
    teacher = TeacherInfo(spec=ModelSpec("kdpipe:mlp", num_classes=classes).to_dict(),
                          fingerprint="sha256:" + "0" * 64, num_classes=classes, classes=names)
    dataset = DatasetInfo(fingerprint="sha256:" + "1" * 64, num_samples=num_samples, classes=names, labelled=True,
                          location="contract")
    return Manifest.plan(backend, recipe, teacher, dataset, parse_codec(codec, classes), positions_per_shard=shard)


def made_up_outputs(plan: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded logits (E, N, V, C), view parameters (E, N, V, P) and labels (N,)."""
    layout = plan.layout
    rng = np.random.default_rng(7)
    shape = (layout.epochs, layout.num_samples, layout.views_per_sample)
    logits = rng.normal(0, 3, size=shape + (layout.num_classes,)).astype(np.float32)
    params = rng.uniform(0, 1, size=shape + (len(layout.view_param_fields),)).astype(np.float32)
    labels = np.arange(layout.num_samples, dtype=np.int64) % layout.num_classes
    return logits, params, labels


def write(out: Path, plan: Manifest, stop_after: int | None = None) -> ArchiveWriter:
    """Write the plan's units (all, or the first `stop_after` pending ones, then let go of
    the lease as a killed writer's successor would find it)."""
    logits, params, labels = made_up_outputs(plan)
    writer = ArchiveWriter(Location(out), plan, labels)
    for count, (epoch, shard, start, stop) in enumerate(writer.pending_units()):
        if count == stop_after:
            writer.release()
            return writer
        writer.write_unit(epoch, shard, logits[epoch, start:stop], params[epoch, start:stop])
    writer.finish()
    return writer


class BackendContract:
    backend: str  # one of BACKENDS

    @pytest.mark.parametrize("codec", CODECS)
    def test_every_codec_round_trips(self, tmp_path, codec):
        plan = make_plan(self.backend, codec)
        write(tmp_path / "a", plan)
        logits, params, labels = made_up_outputs(plan)
        stored = plan.codec.decode(plan.codec.encode(logits.reshape(-1, *logits.shape[2:]))).reshape(logits.shape)
        reader = ArchiveReader(tmp_path / "a")
        assert reader.manifest.backend == self.backend and reader.manifest.codec == plan.codec
        for epoch in range(plan.layout.epochs):
            got, got_params, samples = reader.read(epoch, 0, plan.layout.num_samples)
            np.testing.assert_array_equal(samples, epoch_order(plan.recipe, epoch, plan.layout.num_samples))
            np.testing.assert_array_equal(got, stored[epoch])
            np.testing.assert_array_equal(got_params, params[epoch])
            np.testing.assert_array_equal(reader.read_fields(epoch, 3, 9)["label"], labels[samples[3:9]])
        if codec == "dense-fp32":
            np.testing.assert_array_equal(stored, logits)  # lossless

    def test_identical_jobs_give_identical_bytes(self, tmp_path):
        plan = make_plan(self.backend, "topk:2")
        write(tmp_path / "a", plan)
        write(tmp_path / "b", plan)
        assert archive_files(tmp_path / "a") == archive_files(tmp_path / "b")
        assert (tmp_path / "a" / "manifest.json").read_bytes() == json.dumps(
            read_manifest(tmp_path / "a").to_dict(), indent=1, sort_keys=True).encode() + b"\n"

    def test_a_resumed_job_skips_committed_units_and_ends_identical(self, tmp_path):
        plan = make_plan(self.backend)
        write(tmp_path / "whole", plan)
        write(tmp_path / "resumed", plan, stop_after=4)
        resumed = ArchiveWriter(Location(tmp_path / "resumed"), plan, made_up_outputs(plan)[2])
        pending = resumed.pending_units()
        resumed.release()
        assert [unit[:2] for unit in pending] == [unit[:2] for unit in plan.layout.units()][4:]
        write(tmp_path / "resumed", plan)
        assert archive_files(tmp_path / "resumed") == archive_files(tmp_path / "whole")

    @pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
    def test_a_damaged_shard_is_refused_before_it_is_decoded(self, tmp_path, damage):
        plan = make_plan(self.backend)
        write(tmp_path / "a", plan)
        key = next(k for k in read_manifest(tmp_path / "a").shards[4].files if k.startswith(("logits/", "shards/")))
        path = tmp_path / "a" / key
        data = bytearray(path.read_bytes())
        if damage == "flip a byte":
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        elif damage == "truncate":
            path.write_bytes(bytes(data[:-3]))
        else:
            path.unlink()
        reader = ArchiveReader(tmp_path / "a")
        reader.read(0, 0, 10)  # epoch 0 is sound
        expected = {"flip a byte": "fails its checksum", "truncate": "bytes, not", "delete": "is missing"}[damage]
        with pytest.raises(ArchiveError, match=expected):  # a checksum's words, not a decoder's
            reader.read(1, 4, 6)

    @pytest.mark.parametrize("epoch, start, stop", [(2, 0, 1), (-1, 0, 1), (0, 0, 11), (0, 5, 5), (0, -1, 2)])
    def test_reads_outside_the_archive_are_refused(self, tmp_path, epoch, start, stop):
        write(tmp_path / "a", make_plan(self.backend))
        with pytest.raises(ArchiveError, match="has no positions"):
            ArchiveReader(tmp_path / "a").read(epoch, start, stop)

    @pytest.mark.parametrize("num_samples, classes", [(1, 3), (6, 1), (1, 1)])
    def test_one_sample_or_one_class_reads_back(self, tmp_path, num_samples, classes):
        """zarr writes no chunk that is all fill value (labels all 0, the position index
        of a single sample): the reader takes it as the fill value it is."""
        plan = make_plan(self.backend, "dense-fp16", num_samples=num_samples, classes=classes)
        write(tmp_path / "a", plan)
        logits, params, labels = made_up_outputs(plan)
        reader = ArchiveReader(tmp_path / "a")
        for epoch in range(plan.layout.epochs):
            fields = reader.read_fields(epoch, 0, num_samples)
            np.testing.assert_array_equal(fields["label"], labels[fields["sample_index"]])
            np.testing.assert_array_equal(reader.codec.decode(fields), logits[epoch].astype(np.float16).astype(np.float32))


class TestZarrBackend(BackendContract):
    backend = "zarr"


class TestWebDatasetBackend(BackendContract):
    backend = "webdataset"


def test_every_backend_runs_the_contract():
    assert sorted(cls.backend for cls in BackendContract.__subclasses__()) == sorted(BACKENDS)


def test_a_missing_listed_index_chunk_is_still_damage(tmp_path):
    """Only a chunk the manifest does not list reads as fill value: a listed one that is
    gone is refused."""
    write(tmp_path / "a", make_plan("zarr"))
    (tmp_path / "a" / "sample_index" / "c" / "1" / "0").unlink()
    reader = ArchiveReader(tmp_path / "a")
    with pytest.raises(ArchiveError, match="sample_index/c/1/0 is missing"):
        reader.read(1, 0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data", ["synthetic:1:2", "synthetic:6:1"], ids=["one sample", "one class"])
def test_one_sample_and_one_class_archives_work_end_to_end(tmp_path, backend, data):
    archive = tmp_path / "a"
    cli_json("cache-teacher", "--data", data, "--teacher", "kdpipe:mlp", "--out", archive, "--format", backend,
             "--size", 8, "--epochs", 1, "--workers", 0)
    verified = run_cli("verify", archive)
    assert verified.exit_code == 0 and "problems: none" in verified.stdout, verified.output
    inspected = run_cli("inspect", archive, "--json")
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)
    assert report["complete"] and report["shape"]["positions"] == int(data.split(":")[1])
    summary = cli_json("train-student", "--data", data, "--cache", archive, "--student", "kdpipe:mlp",
                       "--epochs", 1, "--workers", 0, "--out", tmp_path / "run")
    assert summary["epochs"] == 1


# --- the Location contract --------------------------------------------------------------


class LocationContract:
    """What every Location does. `store` gives (location, put): `put(key, data)` places an
    object by the store's own means, so reads are tested apart from writes."""

    @pytest.fixture
    def store(self, tmp_path):
        raise NotImplementedError

    def test_reads_what_is_there(self, store):
        location, put = store
        put("a/b.bin", b"\x00payload\xff")
        assert location.read("a/b.bin") == b"\x00payload\xff"
        assert location.read_if_present("a/b.bin") == b"\x00payload\xff"
        assert location.exists("a/b.bin")

    def test_reads_several_at_once(self, store):
        location, put = store
        put("x/1", b"one")
        put("x/2", b"two")
        assert location.read_many(["x/1", "x/2"]) == {"x/1": b"one", "x/2": b"two"}
        assert location.read_many([]) == {}

    def test_a_missing_key_is_none_or_an_error_naming_it(self, store):
        location, put = store
        put("present", b"1")
        assert location.read_if_present("absent") is None
        assert not location.exists("absent")
        with pytest.raises(ArchiveError, match=f"{location.url}/absent is missing"):
            location.read("absent")
        with pytest.raises(ArchiveError, match="absent/one is missing"):
            location.read_many(["present", "absent/one"])


class WritableLocationContract(LocationContract):
    """A store kdpipe writes archives to."""

    @pytest.fixture
    def store(self, location):
        return location, location.write

    def test_a_write_replaces_the_object_whole(self, location):
        location.write("k", b"old" * 100)
        location.write("k", b"new")
        assert location.read("k") == b"new"
        assert location.sizes() == {"k": 3}  # no temporary object left beside it

    def test_a_failed_write_leaves_the_old_object(self, location, monkeypatch):
        from pipeline.store import location as location_module

        monkeypatch.setattr(location_module, "RETRY_DELAY", 0.0)
        location.write("k", b"old")
        with pytest.raises(Exception):
            location.write("k", object())  # not bytes: the write fails before anything lands
        assert location.read("k") == b"old"
        assert location.sizes() == {"k": 3}

    def test_create_exclusive_creates_once(self, location):
        assert location.create_exclusive("lease.json", b"first")
        assert not location.create_exclusive("lease.json", b"second")
        assert location.read("lease.json") == b"first"

    def test_sizes_lists_every_object_below_a_prefix(self, location):
        location.write("a/1", b"1")
        location.write("a/b/22", b"22")
        location.write("c", b"333")
        assert location.sizes() == {"a/1": 1, "a/b/22": 2, "c": 3}
        assert location.sizes("a") == {"a/1": 1, "a/b/22": 2}
        assert location.sizes("nothing") == {}

    def test_delete_removes_keys_and_prefixes(self, location):
        for key in ("a/1", "a/2", "b"):
            location.write(key, b"x")
        location.delete("b")
        location.delete("missing")  # nothing to do, no error
        assert set(location.sizes()) == {"a/1", "a/2"}
        location.delete("a", recursive=True)
        assert location.sizes() == {} and not location.exists("a/1")


class TestLocalFolder(WritableLocationContract):
    @pytest.fixture
    def location(self, tmp_path):
        return Location(tmp_path / "root")


class TestMemory(WritableLocationContract):
    @pytest.fixture
    def location(self):
        location = Location(f"memory://kdpipe-contract-{uuid.uuid4().hex}")
        yield location
        location.delete(recursive=True)


class TestS3(WritableLocationContract):
    @pytest.fixture
    def location(self, s3_endpoint):
        return Location(f"s3://{BUCKET}/contract-{uuid.uuid4().hex}",
                        {"endpoint_url": s3_endpoint, "key": KEY, "secret": SECRET})


class TestHTTP(LocationContract):
    """http(s):// serves finished archives read-only: objects are put by writing into the
    folder the server serves."""

    @pytest.fixture
    def store(self, tmp_path, http_server):
        served = tmp_path / "served"
        served.mkdir()

        def put(key: str, data: bytes) -> None:
            (served / key).parent.mkdir(parents=True, exist_ok=True)
            (served / key).write_bytes(data)

        return Location(http_server(served)), put

    def test_writes_are_refused(self, store):
        location, put = store
        put("k", b"old")
        for attempt in (lambda: location.write("k", b"new"), lambda: location.create_exclusive("new", b"x")):
            with pytest.raises(ConfigError, match="read-only"):
                attempt()
        assert location.read("k") == b"old" and not location.writable


def test_every_location_kind_runs_the_contract():
    kinds = {cls.__name__ for cls in (*WritableLocationContract.__subclasses__(), *LocationContract.__subclasses__())}
    assert kinds >= {"TestLocalFolder", "TestMemory", "TestS3", "TestHTTP"}


def test_an_unknown_scheme_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown URL scheme ftp://"):
        Location("ftp://host/archive")


def test_a_user_error_in_the_cli_names_an_unknown_backend(tmp_path):
    result = run_cli("cache-teacher", "--data", "synthetic:4:2", "--teacher", "kdpipe:mlp", "--out", tmp_path / "a",
                     "--format", "lance")
    assert_user_error(result, "--format must be one of zarr, webdataset", "'lance'")
    assert not (tmp_path / "a").exists()
