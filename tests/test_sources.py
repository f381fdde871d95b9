"""Data sources beyond class folders: label files, WebDataset shards, Hugging Face datasets.

The same images held each way make the same archive; every kind of bad input is one
line naming the file and the row, shard or member."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import canonical_json
from pipeline.data import ImageFolder, open_source
from pipeline.store import ArchiveReader

from .conftest import archive_files, assert_user_error, cli_json, run_cli, write_image_folder

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(autouse=True)
def kdpipe_cache(tmp_path, monkeypatch) -> Path:
    """Shard indexes and downloads go to a cache of the test's own, never to ~/.cache."""
    monkeypatch.setenv("KDPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def relative_images(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


def class_index(name: str) -> str:
    return str(CLASSES.index(name.split("/")[0]))


def write_shards(folder: Path, data: Path, names: list[str], count: int = 3, label=class_index) -> str:
    """The images `names` of `data` as `count` WebDataset shards, in order (members named
    by relative path, a .cls holding `label(name)` beside each); the brace pattern that
    names them."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(count):
        with tarfile.open(folder / f"train-{shard:02d}.tar", "w") as tar:
            for name in names[shard * len(names) // count:(shard + 1) * len(names) // count]:
                for member, payload in ((name, (data / name).read_bytes()),
                                        (name.rsplit(".", 1)[0] + ".cls", label(name).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"train-{{00..{count - 1:02d}}}.tar")


def write_huggingface(folder: Path, data: Path, names: list[str]) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = {"image": [{"bytes": (data / name).read_bytes(), "path": name} for name in names],
            "label": [CLASSES.index(name.split("/")[0]) for name in names]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """The same 30 images as a class folder, a CSV label file (elsewhere, with ?root=), a
    JSONL label file with integer labels and a class map, WebDataset shards, and a saved
    Hugging Face dataset: name -> --data spec."""
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=10)
    names = relative_images(data)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "labels.csv").write_text(
        "path,label\n" + "".join(f"{name},{name.split('/')[0]}\n" for name in reversed(names)))
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (data / "labels.jsonl").write_text("".join(
        json.dumps({"file": name, "label": CLASSES.index(name.split("/")[0])}) + "\n" for name in names))
    return {
        "folder": str(data),
        "csv": f"{tmp_path}/lists/labels.csv?root={data}",
        "jsonl": f"{data}/labels.jsonl?classes={tmp_path}/classes.txt",
        "webdataset": write_shards(tmp_path / "shards", data, names) + f"?classes={tmp_path}/classes.txt",
        "huggingface": str(write_huggingface(tmp_path / "hf", data, names)),
    }


def cache(data: str, out: Path, workers: int = 0) -> dict:
    return cli_json("cache-teacher", "--data", data, "--teacher", "kdpipe:cnn", "--size", 16, "--epochs", 1,
                    "--views-per-sample", 2, "--workers", workers, "--codec", "dense-fp32", "--out", out)


def without_location(files: dict[str, bytes]) -> dict[str, object]:
    """An archive's files, with manifest.json parsed and the fields naming the data dropped
    (the location, and the manifest's fingerprint, which covers it)."""
    manifest = json.loads(files["manifest.json"])
    del manifest["dataset"]["location"], manifest["manifest_fingerprint"]
    return files | {"manifest.json": manifest}


def test_the_same_images_held_every_way_make_the_same_archive(sources, tmp_path):
    archives = {kind: tmp_path / f"{kind}.zarr" for kind in sources}
    for kind, spec in sources.items():
        cache(spec, archives[kind])
    folder = without_location(archive_files(archives["folder"]))
    for kind in ("csv", "jsonl", "webdataset"):
        assert without_location(archive_files(archives[kind])) == folder, kind
        source = open_source(sources[kind])
        assert source.describe()["fingerprint"] == ImageFolder(sources["folder"]).fingerprint
        reopened = open_source(source.describe()["location"])  # what verify --recompute opens
        assert reopened.describe() == source.describe()
    # Hugging Face records only the file names, so its fingerprint differs; all it holds is the same
    hf, reference = ArchiveReader(str(archives["huggingface"])), ArchiveReader(str(archives["folder"]))
    assert hf.manifest.dataset.fingerprint != reference.manifest.dataset.fingerprint
    assert hf.manifest.dataset.content == reference.manifest.dataset.content
    fields, expected = hf.read_fields(0, 0, 30), reference.read_fields(0, 0, 30)
    assert fields.keys() == expected.keys() >= {"view_params", "sample_index", "label"}
    for name in fields:  # the logits, view parameters, sample indices, labels
        np.testing.assert_array_equal(fields[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(hf.content_digests(), reference.content_digests())
    assert (hf.manifest.dataset.classes, hf.manifest.dataset.num_samples) == (CLASSES, 30)


def test_the_folder_fingerprint_is_the_documented_one(sources):
    """docs/format.md's algorithm, written out apart from the code that all sources share."""
    import hashlib
    import os

    folder = Path(sources["folder"])
    digest = hashlib.sha256(canonical_json({"classes": list(CLASSES)}).encode())
    for name in relative_images(folder):
        key = [name, os.path.getsize(folder / name), CLASSES.index(name.split("/")[0])]
        digest.update(canonical_json(key).encode() + b"\n")
    assert ImageFolder(folder).fingerprint == "sha256:" + digest.hexdigest()


def test_a_student_trains_on_shards_from_a_folders_archive_and_validates_on_a_label_file(sources, tmp_path):
    """Same fingerprint, same contents: the archive of the class folder replays on the shards."""
    cache(sources["folder"], tmp_path / "teacher.zarr")
    summary = cli_json("train-student", "--data", sources["webdataset"], "--cache", tmp_path / "teacher.zarr",
                       "--student", "kdpipe:mlp", "--epochs", 1, "--workers", 0, "--val", sources["csv"],
                       "--out", tmp_path / "run")
    assert 0.0 <= summary["val_top1"] <= 100.0  # scored on the CSV's 30 labelled images


def test_two_workers_read_shards_as_one_process_does(sources, tmp_path):
    cache(sources["webdataset"], tmp_path / "one.zarr", workers=0)
    cache(sources["webdataset"], tmp_path / "two.zarr", workers=2)
    assert archive_files(tmp_path / "two.zarr") == archive_files(tmp_path / "one.zarr")


def test_remote_shards_are_downloaded_once_into_the_cache(sources, tmp_path, http_server, kdpipe_cache):
    shards = Path(sources["webdataset"].partition("?")[0]).parent
    url = http_server(shards) + "/train-{00..02}.tar?" + sources["webdataset"].partition("?")[2]
    local = open_source(sources["webdataset"])
    remote = open_source(url)
    assert remote.describe()["fingerprint"] == local.describe()["fingerprint"]
    assert remote.describe()["location"] == url
    assert [remote.read(i) for i in range(len(remote))] == [local.read(i) for i in range(len(local))]
    assert len(list((kdpipe_cache / "shards").iterdir())) == 3
    assert sorted(p.name for p in shards.iterdir()) == ["train-00.tar", "train-01.tar", "train-02.tar"]


def test_parquet_files_hold_the_same_dataset(sources, tmp_path):
    import datasets

    datasets.load_from_disk(sources["huggingface"]).to_parquet(str(tmp_path / "train.parquet"))
    saved, parquet = open_source(sources["huggingface"]), open_source(f"hf:{tmp_path}/train.parquet")
    assert parquet.describe() | {"location": None} == saved.describe() | {"location": None}
    assert [parquet.read(i) for i in range(30)] == [saved.read(i) for i in range(30)]


def refused(data: str, tmp_path: Path, *fragments: str) -> None:
    assert_user_error(run_cli("cache-teacher", "--data", data, "--teacher", "kdpipe:cnn", "--size", 16,
                              "--epochs", 1, "--workers", 0, "--out", tmp_path / "refused.zarr"), *fragments)
    assert not (tmp_path / "refused.zarr" / "manifest.json").exists()


@pytest.mark.parametrize("rows, fragments", [
    ("path,label\ncat/cat_000.png,cat\ncat/gone.png,cat\n", ("labels.csv line 3", "gone.png")),
    ("path,label\ncat/cat_000.png,cat\n./cat/cat_000.png,dog\n", ("labels.csv line 3", "listed twice (also on line 2)")),
    ("path,label\ncat/cat_000.png,0\ncat/cat_001.png,3\n", ("labels.csv line 3", "label '3' is not in the class map")),
    ("path,label\ncat/cat_000.png,wolf\n", ("labels.csv line 2", "label 'wolf' is not in the class map")),
    ("path,label\ncat/cat_000.png\n", ("labels.csv line 2", "malformed row")),
    ("name,class\ncat/cat_000.png,cat\n", ("labels.csv needs a header naming a path column",)),
    ("path,label\n", ("lists no images",)),
    ("path,label\ncat/cat_000.png,cat\ncat/cat_001.png, \n", ("labels.csv line 3", "neither a class name nor")),
    ("path,label\ncat/cat_000.png,cat\nDATA/cat/cat_000.png,dog\n", ("labels.csv line 3", "listed twice")),
    ("path,label\ncat/cat_000.png,cat\n../data/cat/cat_000.png,dog\n", ("labels.csv line 3", "listed twice")),
])
def test_bad_label_files_are_refused_by_file_and_line(tmp_path, rows, fragments):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    (data / "labels.csv").write_text(rows.replace("DATA", str(data)))  # the same file, written absolute
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    refused(f"{data}/labels.csv?classes={tmp_path}/classes.txt", tmp_path, *fragments)


def test_a_huggingface_imagefolder_metadata_file_is_a_label_file(tmp_path):
    """HF's imagefolder layout: images beside a metadata.csv whose path column is file_name."""
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    names = relative_images(data)
    (data / "metadata.csv").write_text("file_name,label\n" + "".join(f"{n},{n.split('/')[0]}\n" for n in names))
    assert open_source(f"{data}/metadata.csv").describe()["fingerprint"] == ImageFolder(data).describe()["fingerprint"]


@pytest.mark.parametrize("class_map", ['{"cat": "x", "dog": 1, "fox": 2}', '{"cat": null, "dog": null}', '[1, 2]'])
def test_a_class_map_that_is_not_names_and_indices_is_refused(tmp_path, class_map):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    (data / "labels.csv").write_text("path,label\ncat/cat_000.png,cat\n")
    (tmp_path / "classes.json").write_text(class_map)
    refused(f"{data}/labels.csv?classes={tmp_path}/classes.json", tmp_path, "class map", "classes.json")


def test_a_key_twice_in_a_shard_is_refused(tmp_path):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    names = relative_images(data)
    pattern = write_shards(tmp_path / "shards", data, names + names[:1], count=1)
    refused(pattern, tmp_path, names[0], "in the shard twice")


def test_a_classlabel_of_minus_one_is_refused(tmp_path):
    import datasets

    data = write_image_folder(tmp_path / "data", CLASSES, per_class=1)
    names = relative_images(data)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = {"image": [{"bytes": (data / name).read_bytes(), "path": name} for name in names],
            "label": [0, -1, 2]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    refused(str(tmp_path / "hf"), tmp_path, "row 1", "has no label (ClassLabel -1")


def test_integer_labels_need_a_class_map(tmp_path):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    (data / "labels.jsonl").write_text('{"path": "cat/cat_000.png", "label": 0}\n')
    refused(f"{data}/labels.jsonl", tmp_path, "labels.jsonl line 1", "no class map", "?classes=FILE")


def test_a_shard_pattern_that_matches_nothing_is_refused(tmp_path):
    refused(f"{tmp_path}/shards/train-{{000..002}}.tar", tmp_path, "train-000.tar does not exist", "check the pattern")


@pytest.mark.parametrize("cut", ["header", "member", "end marker"])
def test_a_corrupt_or_truncated_shard_is_named(tmp_path, cut):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    pattern = write_shards(tmp_path / "shards", data, relative_images(data), count=2, label=lambda name: name[:3])
    shard = tmp_path / "shards" / "train-01.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = {"header": 100, "member": last.offset_data + 10, "end marker": last.offset_data + 512}[cut]
    shard.write_bytes(shard.read_bytes()[:end])
    refused(pattern, tmp_path, "shard", "train-01.tar is not a readable tar file")


def test_a_corrupt_image_member_is_named_with_its_shard(tmp_path):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    (data / "dog" / "dog_001.png").write_bytes(b"not an image at all")
    pattern = write_shards(tmp_path / "shards", data, relative_images(data), count=2, label=lambda name: name[:3])
    refused(pattern, tmp_path, "cannot read image dog/dog_001.png in shard", "train-01.tar")


def test_a_sample_without_an_image_member_is_refused(tmp_path):
    data = write_image_folder(tmp_path / "data", CLASSES, per_class=2)
    (data / "fox" / "fox_009.txt").write_text("a caption, and no image")
    pattern = write_shards(tmp_path / "shards", data, relative_images(data) + ["fox/fox_009.txt"], count=1)
    refused(pattern, tmp_path, "sample fox/fox_009 in shard", "has no image member")


def test_a_folder_that_is_not_a_huggingface_dataset_is_refused(tmp_path):
    write_image_folder(tmp_path / "data", CLASSES, per_class=1)
    refused(f"hf:{tmp_path}/data", tmp_path, "is not a Hugging Face dataset", "save_to_disk")


def test_a_dataset_dict_is_read_one_split_at_a_time(sources, tmp_path):
    import datasets

    saved = datasets.load_from_disk(sources["huggingface"])
    datasets.DatasetDict({"train": saved, "val": saved.select(range(6))}).save_to_disk(str(tmp_path / "dict"))
    assert len(open_source(f"{tmp_path}/dict")) == 30  # train by default
    val = open_source(f"hf:{tmp_path}/dict?split=val")
    assert len(val) == 6 and open_source(val.describe()["location"]).describe() == val.describe()
    refused(f"hf:{tmp_path}/dict?split=test", tmp_path, "holds the splits train, val", "?split=NAME")


def test_without_the_datasets_package_the_fix_is_named(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    refused(sources["huggingface"], tmp_path, "pip install 'kdpipe[hf]'")
