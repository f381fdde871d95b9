"""The manifest's strict checks: a manifest edited and re-sealed (its fingerprint
recomputed, so the seal alone cannot tell) whose fields have the wrong type or
contradict each other is refused by name, by train-student, inspect and verify alike,
before anything is read from the archive. And `Manifest.to_dict` gives back exactly the
JSON that was written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.store import Manifest, json_bytes, read_manifest, seal

from .conftest import assert_user_error, cli_json, run_cli

DATA = "synthetic:10:3"  # 10 samples of 3 classes: shards of 4 give 3 shards per epoch


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A finished zarr archive of 2 epochs x 10 samples, made once."""
    out = tmp_path_factory.mktemp("manifest") / "archive"
    cli_json("cache-teacher", "--data", DATA, "--teacher", "kdpipe:mlp", "--out", out, "--epochs", 2, "--size", 8,
             "--shard-size", 4, "--workers", 0)
    return out


def resealed(archive: Path, tmp_path: Path, edit) -> Path:
    """A copy of `archive` whose manifest `edit` changed, sealed again as a forger would."""
    copy = tmp_path / "copy"
    shutil.copytree(archive, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_bytes(json_bytes(seal(manifest)))
    return copy


def every_reader(archive: Path, tmp_path: Path):
    """train-student, inspect and verify on `archive`."""
    yield run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--cache", archive,
                  "--out", tmp_path / "run", "--epochs", 1, "--workers", 0)
    yield run_cli("inspect", archive)
    yield run_cli("verify", archive)


def test_to_dict_gives_back_the_written_json(archive):
    manifest = read_manifest(archive)
    assert json_bytes(manifest.to_dict()) == (archive / "manifest.json").read_bytes()
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def _set(path: str, value):
    """An edit that sets the dotted field `path` to `value`."""
    def edit(manifest: dict) -> None:
        *parents, leaf = path.split(".")
        node = manifest
        for part in parents:
            node = node[part]
        node[leaf] = value
    return edit


def _drop_last_shard(manifest: dict) -> None:
    manifest["shards"].pop()


def _shift_a_shard(manifest: dict) -> None:
    manifest["shards"][1]["stop"] += 1


def _rename_a_shard_file(manifest: dict) -> None:
    manifest["shards"][0]["files"] = ["logits/c/0/1/0/0", "view_params/c/0/0/0/0"]


def _unlist_a_shard_file(manifest: dict) -> None:
    key = manifest["shards"][0]["files"][0]
    manifest["total_bytes"] -= manifest["files"].pop(key)["bytes"]


def _bad_sha(manifest: dict) -> None:
    manifest["files"]["zarr.json"]["sha256"] = "not-a-digest"


CASES = {
    "total_bytes": (lambda m: m.update(total_bytes=m["total_bytes"] + 1), ["total_bytes", "sum of the files' bytes"]),
    "unknown backend": (_set("backend", "lance"), ["backend 'lance'", "upgrade kdpipe"]),
    "schema_version true": (_set("schema_version", True), ["schema_version must be an integer", "True"]),
    "schema_version 0": (_set("schema_version", 0), ["schema_version must be at least 1"]),
    "schema_version -3": (_set("schema_version", -3), ["schema_version must be at least 1"]),
    "schema_version '1'": (_set("schema_version", "1"), ["schema_version must be an integer", "'1'"]),
    "schema_version 1.0": (_set("schema_version", 1.0), ["schema_version must be an integer", "1.0"]),
    "a shard missing": (_drop_last_shard, ["shards lists 5 shards", "layout has 6"]),
    "a shard's positions": (_shift_a_shard, ["shards[1]", "positions 4-8"]),
    "a shard's files": (_rename_a_shard_file, ["shards[0].files"]),
    "a shard file unlisted": (_unlist_a_shard_file, ["shards[0].files names logits/c/0/0/0/0"]),
    "chunks that do not divide shards": (_set("layout.positions_per_chunk", 3), ["layout.positions_per_chunk 3",
                                                                                 "layout.positions_per_shard 4"]),
    "view_param_fields": (_set("layout.view_param_fields", ["top", "left"]), ["layout.view_param_fields"]),
    "codec.dtype": (_set("codec.dtype", "float32"), ["codec.dtype 'float32'", "codec.name 'dense-fp16'"]),
    "an unknown codec field": (_set("codec.level", 3), ["codec.level"]),
    "layout.num_samples": (_set("dataset.num_samples", 11), ["layout.num_samples 10", "dataset.num_samples 11"]),
    "layout.num_classes": (_set("layout.num_classes", 4), ["layout.num_classes 4", "teacher.num_classes 3"]),
    "layout.epochs": (_set("recipe.epochs", 3), ["layout.epochs 2", "recipe.epochs 3"]),
    "teacher.classes": (_set("teacher.classes", ["a", "b"]), ["teacher.classes names 2 classes"]),
    "a file's sha256": (_bad_sha, ["files['zarr.json'].sha256"]),
    "teacher.outputs": (_set("teacher.outputs", "features"), ["teacher.outputs"]),
    "layout field type": (_set("layout.epochs", 2.0), ["layout.epochs must be an integer"]),
}


@pytest.mark.parametrize("case", CASES)
def test_contradictory_or_mistyped_manifest_is_refused_by_name(archive, tmp_path, case):
    edit, fragments = CASES[case]
    copy = resealed(archive, tmp_path, edit)
    for result in every_reader(copy, tmp_path):
        assert_user_error(result, f"the manifest of archive {copy}", *fragments)
        assert "upgrade kdpipe" not in result.stderr or case == "unknown backend"
    assert not (tmp_path / "run").exists()


def test_a_sound_resealed_manifest_still_reads(archive, tmp_path):
    """The checks refuse contradictions, not edits: a consistent change (an informational
    field) reads as before."""
    copy = resealed(archive, tmp_path, _set("dataset.location", "elsewhere"))
    assert read_manifest(copy).dataset.location == "elsewhere"
    assert run_cli("verify", copy).exit_code == 0


SCHEMA1 = Path(__file__).parent / "data" / "schema1"
INT8 = {"name": "dense-int8", "dtype": "int8", "scale": "per-view"}


def _plan_of(manifest: dict, **changes) -> dict:
    """The plan part of a manifest's JSON, with dotted fields (a__b) changed."""
    plan = {key: value for key, value in json.loads(json.dumps(manifest)).items()
            if key not in ("shards", "files", "total_bytes", "manifest_fingerprint")}
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = plan
        for part in parents:
            node = node[part]
        node[leaf] = value
    return plan


def test_the_schema_version_and_the_codec_agree():
    """Schema 1 codes top-k log-probabilities as they are and has no dense-int8; schema 2
    codes them as deltas and says so: any other pairing is refused by name."""
    from pipeline.store import ManifestError

    schema1 = json.loads((SCHEMA1 / "topk.zarr" / "manifest.json").read_text())
    assert Manifest.from_dict(_plan_of(schema1), finished=False).codec.logprob_coding == "absolute"
    schema2 = _plan_of(schema1, schema_version=2, codec=schema1["codec"] | {"logprob_coding": "delta"})
    assert Manifest.from_dict(schema2, finished=False).codec.logprob_coding == "delta"
    refused = {
        "absolute in schema 2": (_plan_of(schema1, schema_version=2), "codec.logprob_coding"),
        "delta in schema 1": (_plan_of(schema2, schema_version=1), "codec.logprob_coding"),
        "another coding": (_plan_of(schema2, codec__logprob_coding="zigzag"), "'zigzag'"),
        "dense-int8 in schema 1": (_plan_of(schema1, codec=INT8), "needs schema_version 2"),
        "dense-int8 per class": (_plan_of(schema2, codec=INT8 | {"scale": "per-class"}), "'per-class'"),
    }
    for case, (plan, fragment) in refused.items():
        with pytest.raises(ManifestError, match=fragment):
            Manifest.from_dict(plan, finished=False)
            pytest.fail(case)
