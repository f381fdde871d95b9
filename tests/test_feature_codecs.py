"""Feature outputs in archives (schema 3, `cache-teacher --outputs logits,MODULE=CODEC`):
each codec step against an independent formula (torch's adaptive pooling, numpy's SVD,
int8's half-step bound), codec names and manifests refused by name, and end to end on
every backend: the stored features are the teacher's, a resumed job keeps its fitted
projection and ends byte-identical, and --overwrite removes exactly the archive's own
objects, projections included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import cache
from pipeline.config import ModelSpec, sha256_hex
from pipeline.data import ViewDataset, open_source
from pipeline.errors import ArchiveError, ConfigError
from pipeline.models import Teacher
from pipeline.store import (BACKENDS, ArchiveReader, ArchiveWriter, Manifest, ManifestError, fit_projection, json_bytes,
                            read_manifest, seal)
from pipeline.store.feature_codecs import (FLOAT16_TINY, OFFSET, SCALE, VALUES, FeatureCodec, adaptive_average_pool,
                                           projection_bytes, projection_samples)

from .conftest import archive_files, assert_user_error, cli_json, run_cli, write_image_folder

# tests.toy_models:tiny_cnn at 16 px: module 9 gives (16, 8, 8) per view, 16 gives (32, 4, 4), 18 a (32,) vector
OUTPUTS = "logits,9=fp32,16=pool:2+pca:8+int8"
CACHE = ["--teacher", "tests.toy_models:tiny_cnn", "--epochs", 2, "--views-per-sample", 2, "--size", 16,
         "--workers", 0, "--shard-size", 4]


def _maps(shape=(6, 2, 5, 7, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- each codec step against an independent formula ---------------------------------------


@pytest.mark.parametrize("size, pool", [((7, 7), (3, 3)), ((8, 6), (3, 4)), ((7, 5), (2, 3)), ((4, 4), (4, 4)),
                                        ((8, 8), (2, 2)), ((5, 9), (1, 1))])
def test_adaptive_average_pool_is_torchs(size, pool):
    values = _maps((3, 2, 4, *size))
    expected = F.adaptive_avg_pool2d(torch.from_numpy(values).flatten(0, 1), pool).unflatten(0, (3, 2)).numpy()
    pooled = adaptive_average_pool(values, pool)
    assert pooled.shape == (3, 2, 4, *pool) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


def test_int8_is_within_half_a_step_per_view_and_channel():
    """Channels whose ranges differ by 10^4: each (view, channel) has its own scale, half
    its range over 127 steps, so even the narrowest channel keeps its detail; every value
    is within half its step."""
    ranges = 10.0 ** np.arange(-1, 4, dtype=np.float32)  # one per channel
    values = (_maps((5, 2, len(ranges), 4, 3)) + np.float32(0.5)) * ranges[:, None, None]
    codec = FeatureCodec.from_name("m", "int8", values.shape[2:])
    fields = codec.encode(values, None)
    steps, scale, offset = fields[VALUES + "m"], fields[SCALE + "m"], fields[OFFSET + "m"]
    assert steps.dtype == np.int8 and scale.dtype == offset.dtype == np.float16
    assert scale.shape == offset.shape == (5, 2, len(ranges))
    assert np.abs(steps.astype(int)).max() == 127  # the steps are used to the full

    half_range = (values.max(axis=(3, 4)) - values.min(axis=(3, 4))) / 2
    np.testing.assert_allclose(scale.astype(np.float32), half_range / 127, rtol=5e-3)  # up to float16's rounding

    decoded = codec.decode(fields, None)
    error = np.abs(decoded - values)
    bound = scale.astype(np.float32)[..., None, None] / 2
    assert (error <= bound * (1 + 1e-5) + 4 * np.finfo(np.float32).eps * np.abs(values)).all()
    assert error[:, :, 0].max() < 0.01  # the channel of range ~0.4 (one scale per view would give ~20)


def test_int8_steps_are_at_least_float16s_smallest_normal():
    """A channel narrower than 127 such steps is stored at that resolution (about 3e-5)."""
    values = _maps((2, 2, 3, 4, 4)) * np.float32(1e-4)
    codec = FeatureCodec.from_name("m", "int8", values.shape[2:])
    fields = codec.encode(values, None)
    assert (fields[SCALE + "m"] == np.float16(FLOAT16_TINY)).all()
    assert np.abs(codec.decode(fields, None) - values).max() <= FLOAT16_TINY / 2 * (1 + 1e-3)


def test_int8_of_a_vector_has_one_scale_per_view():
    values = _maps((4, 3, 10))
    codec = FeatureCodec.from_name("m", "int8", (10,))
    fields = codec.encode(values, None)
    assert fields[SCALE + "m"].shape == fields[OFFSET + "m"].shape == (4, 3)
    bound = fields[SCALE + "m"].astype(np.float32)[..., None] / 2
    assert (np.abs(codec.decode(fields, None) - values) <= bound * (1 + 1e-5) + 1e-6).all()


def test_int8_of_a_constant_channel_decodes_to_the_constant():
    """A constant float16 value comes back exactly; another constant within half the
    smallest step (its float16 offset is ~8e-4 off, and the steps make that up)."""
    values = _maps((2, 2, 3, 4, 4))
    values[:, :, 1] = 2.5  # a float16 number
    values[:, :, 2] = 3.7  # not one
    codec = FeatureCodec.from_name("m", "int8", values.shape[2:])
    fields = codec.encode(values, None)
    decoded = codec.decode(fields, None)
    assert np.isfinite(fields[SCALE + "m"].astype(np.float32)).all()
    assert (fields[SCALE + "m"][:, :, 1] == np.float16(FLOAT16_TINY)).all()
    assert np.array_equal(decoded[:, :, 1], values[:, :, 1])
    assert np.abs(decoded[:, :, 2] - values[:, :, 2]).max() <= FLOAT16_TINY / 2 * (1 + 1e-3)


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 0.0), ("fp16", 1e-3)])
def test_fp32_is_lossless_and_fp16_is_close(dtype, tolerance):
    values = _maps() * 10
    codec = FeatureCodec.from_name("m", dtype, values.shape[2:])
    fields = codec.encode(values, None)
    assert fields[VALUES + "m"].dtype == np.dtype(codec.dtype)
    decoded = codec.decode(fields, None)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, values, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", ["fp16", "pool:2+fp16"])
def test_a_value_beyond_float16_is_refused_with_its_remedy(name):
    values = _maps((1, 1, 2, 4, 4))
    values[0, 0, 0, 0, 0] = 1e6
    codec = FeatureCodec.from_name("m", name, values.shape[2:])
    with pytest.raises(ConfigError, match="fp32"):
        codec.encode(values, None)


def _low_rank_samples(m=400, channels=8, seed=1) -> np.ndarray:
    """Samples (m, C) with well-separated variances along a random rotation, and a mean."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((channels, channels)))
    spread = 2.0 ** -np.arange(channels)  # variances 1, 1/4, 1/16, ...
    return (rng.standard_normal((m, channels)) * spread) @ rotation.T + rng.standard_normal(channels) * 3


def test_fit_projection_is_numpys_svd():
    """The mean, then the top-K right singular vectors of the centred samples (up to sign),
    by decreasing variance."""
    samples = _low_rank_samples()
    components = 3
    projection = fit_projection(samples, components)
    assert projection.shape == (components + 1, samples.shape[1]) and projection.dtype == np.float32
    np.testing.assert_allclose(projection[0], samples.mean(axis=0), rtol=1e-5, atol=1e-5)
    _, _, right = np.linalg.svd(samples - samples.mean(axis=0), full_matrices=False)
    agreement = projection[1:].astype(np.float64) @ right[:components].T  # +-1 on the diagonal, 0 elsewhere
    np.testing.assert_allclose(np.abs(agreement), np.eye(components), atol=1e-5)


def test_fit_projection_is_deterministic_and_sign_normalised():
    samples = _low_rank_samples()
    projection = fit_projection(samples, 5)
    assert np.array_equal(projection, fit_projection(samples.copy(), 5))
    directions = projection[1:]
    largest = directions[np.arange(5), np.abs(directions).argmax(axis=1)]
    assert (largest > 0).all()
    # samples mirrored through their mean have the same directions: the eigen-solver's sign is not what is stored
    mirrored = fit_projection(2 * samples.mean(axis=0) - samples, 5)
    np.testing.assert_allclose(mirrored, projection, rtol=1e-4, atol=1e-5)


def test_pca_keeping_every_channel_reconstructs():
    values = _maps((6, 2, 5, 3, 3))
    codec = FeatureCodec.from_name("m", "pca:5+fp32", values.shape[2:])
    projection = fit_projection(projection_samples(values), 5)
    decoded = codec.decode(codec.encode(values, projection), projection)
    np.testing.assert_allclose(decoded, values, rtol=1e-4, atol=1e-4)


def test_pca_loses_exactly_the_discarded_variance():
    """Of vectors stored with pca:K, the squared reconstruction error over m - 1 is the sum
    of the covariance's discarded eigenvalues, and each stored coefficient is the centred
    vector's along numpy's direction (up to sign)."""
    samples = _low_rank_samples(m=400, channels=8).astype(np.float32)
    values = samples.reshape(200, 2, 8)  # (positions, views, C): vectors
    components = 3
    codec = FeatureCodec.from_name("m", f"pca:{components}+fp32", (8,))
    projection = fit_projection(projection_samples(values), components)
    fields = codec.encode(values, projection)
    assert fields[VALUES + "m"].shape == (200, 2, components)
    decoded = codec.decode(fields, projection)

    centred = samples.astype(np.float64) - samples.mean(axis=0)
    eigenvalues = np.sort(np.linalg.eigvalsh(centred.T @ centred / (len(samples) - 1)))[::-1]
    lost = ((decoded.reshape(-1, 8) - samples) ** 2).sum() / (len(samples) - 1)
    np.testing.assert_allclose(lost, eigenvalues[components:].sum(), rtol=1e-3)
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    by_hand = centred @ right[:components].T
    np.testing.assert_allclose(np.abs(fields[VALUES + "m"].reshape(-1, components)), np.abs(by_hand), atol=1e-4)


CHAINS_ON_A_MAP = {  # as given: as named in the manifest
    "fp16": "fp16", "fp32": "fp32", "int8": "int8", "pool:2x3+fp32": "pool:2x3+fp32", "pool:3+int8": "pool:3x3+int8",
    "pca:3+int8": "pca:3+int8", "pool:2+pca:4": "pool:2x2+pca:4+fp16", "pool:1+pca:5+int8": "pool:1x1+pca:5+int8",
}


@pytest.mark.parametrize("given, name", CHAINS_ON_A_MAP.items())
def test_stored_fields_and_decoded_shape_are_what_the_codec_says(given, name):
    values = _maps((3, 2, 5, 6, 7))
    codec = FeatureCodec.from_name("m", given, values.shape[2:])
    assert codec.name == name
    projection = fit_projection(projection_samples(codec.pooled(values)), codec.components) \
        if codec.components else None
    fields = codec.encode(values, projection)
    declared = codec.fields(2)
    assert fields.keys() == declared.keys()
    for key, (shape, dtype) in declared.items():
        assert fields[key].shape == (3, *shape) and fields[key].dtype == dtype, key
    decoded = codec.decode(fields, projection)
    assert decoded.shape == (3, 2, *codec.decoded_shape) and decoded.dtype == np.float32
    assert codec.decoded_shape == (5, *(codec.pool or (6, 7)))
    assert FeatureCodec.from_dict(codec.to_dict(), 0) == codec


def test_a_codec_without_a_dtype_stores_fp16():
    assert FeatureCodec.from_name("m", "pool:2", (4, 4, 4)).name == "pool:2x2+fp16"
    assert FeatureCodec.from_name("m", "pca:2", (4,)).dtype == "float16"


# --- codec names refused by name ----------------------------------------------------------


@pytest.mark.parametrize("name, shape, fragments", [
    ("topk:10", (8, 4, 4), ["topk:10 is a codec of logits"]),
    ("dense-fp16", (8, 4, 4), ["dense-fp16 is a codec of logits"]),
    ("pool:2", (32,), ["pooling applies to feature maps", "drop pool:"]),
    ("pool:2+pca:4+int8", (32,), ["pooling applies to feature maps"]),
    ("pool:5", (8, 4, 4), ["maps of 4 x 4", "smaller than pool:5x5"]),
    ("pool:2x5", (8, 4, 4), ["smaller than pool:2x5"]),
    ("pca:9", (8, 4, 4), ["has 8 channels, fewer than pca:9"]),
    ("pca:33+int8", (32,), ["fewer than pca:33"]),
    ("fp16", (), ["a scalar per view"]),
    ("pca", (8, 4, 4), ["cannot read 'pca'"]),
    ("pool", (8, 4, 4), ["cannot read 'pool'"]),
    ("pool:0", (8, 4, 4), ["'0' is not a positive integer"]),
    ("pool:2xa", (8, 4, 4), ["'a' is not a positive integer"]),
    ("pca:-1", (8, 4, 4), ["'-1' is not a positive integer"]),
    ("fp16+pca:4", (8, 4, 4), ["cannot read 'fp16'"]),
    ("pca:4+pool:2", (8, 4, 4), ["cannot read 'pool:2'"]),
    ("fp16+fp32", (8, 4, 4), ["cannot read 'fp16'"]),
    ("int4", (8, 4, 4), ["cannot read 'int4'"]),
    ("", (8, 4, 4), ["cannot read ''"]),
])
def test_a_codec_that_does_not_apply_is_refused_by_name(name, shape, fragments):
    with pytest.raises(ConfigError) as raised:
        FeatureCodec.from_name("layer3", name, shape)
    message = str(raised.value)
    assert message.startswith("--outputs layer3="), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("outputs, fragments", [
    ("logits,16=pca:99", ["--outputs 16=pca:99+fp16", "fewer than pca:99"]),
    ("logits,18=pool:2", ["pooling applies to feature maps", "'18' gives 32 per view"]),
    ("logits,16=topk:5", ["topk:5 is a codec of logits"]),
    ("logits,16=int4", ["cannot read 'int4'"]),
    ("logits,9,9=fp32", ["names a module twice"]),
    ("logits,=fp32", ["name a module"]),
])
def test_cache_teacher_refuses_a_feature_codec_before_writing(outputs, fragments, tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "archive"
    assert_user_error(run_cli("cache-teacher", "--data", data, "--out", out, *CACHE, "--outputs", outputs), *fragments)
    assert not out.exists()


# --- end to end, on every backend -----------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("features") / "data", per_class=4)


@pytest.fixture(scope="module")
def archives(data):
    """The finished archive of OUTPUTS on a backend (12 samples, 2 epochs of 3 shards),
    made on first use."""
    made = {}

    def archive(backend: str) -> Path:
        if backend not in made:
            made[backend] = data.parent / backend
            cli_json("cache-teacher", "--data", data, "--out", made[backend], *CACHE, "--format", backend,
                     "--outputs", OUTPUTS)
        return made[backend]

    return archive


def teacher_outputs(teacher: Teacher, views: ViewDataset, epoch: int, start: int, stop: int):
    """The teacher's feature outputs by name (positions, views, ...), the view parameters
    and the sample indices of positions [start, stop) of `epoch`, computed afresh from the
    views the recipe draws, in one batch."""
    items = [views[epoch * views.num_samples + position] for position in range(start, stop)]
    _, features = teacher.with_features(torch.stack([item["views"] for item in items]).flatten(0, 1))
    shape = (stop - start, views.recipe.views_per_sample)
    return ({name: value.numpy().reshape(*shape, *value.shape[1:]) for name, value in features.items()},
            np.stack([item["params"].numpy() for item in items]), np.array([item["index"] for item in items]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stored_features_are_the_teachers(backend, archives, data):
    """Recomputed shard by shard (the batches cache-teacher ran), from the views the
    archive records: fp32 gives back module 9's outputs exactly; pool+pca+int8 gives the
    PCA reconstruction of module 16's pooled outputs with the stored projection, within
    int8's rounding (relative L2 < 1%; 0.3% measured), and so the pooled outputs within
    20% (8% measured: what 8 of 32 components keep). The projection is the one fitted on
    epoch 0's views."""
    reader = ArchiveReader(archives(backend))
    manifest = reader.manifest
    assert manifest.schema_version == 3
    assert [(f.module, f.name, f.shape) for f in manifest.features] == [
        ("9", "fp32", (16, 8, 8)), ("16", "pool:2x2+pca:8+int8", (32, 4, 4))]
    assert manifest.projection_keys == ("projections/16.npy",) and "projections/16.npy" in manifest.files
    teacher = Teacher(ModelSpec.from_dict(manifest.teacher.spec), size=manifest.recipe.size, features=("9", "16"))
    views = ViewDataset(open_source(str(data)), manifest.recipe)
    mean, directions = reader.projections["16"][0].astype(np.float64), reader.projections["16"][1:].astype(np.float64)
    pooled_all, reconstructed_all, decoded_all = [], [], []
    for epoch, _, start, stop in manifest.layout.units():
        fields = reader.read_fields(epoch, start, stop)
        features, params, samples = teacher_outputs(teacher, views, epoch, start, stop)
        assert np.array_equal(fields["sample_index"], samples) and np.array_equal(fields["view_params"], params)
        stored = reader.decode_feature("9", fields)
        assert stored.shape == (stop - start, 2, 16, 8, 8)
        np.testing.assert_array_equal(stored, features["9"])
        pooled = F.adaptive_avg_pool2d(torch.from_numpy(features["16"]).flatten(0, 1), 2).unflatten(0, (-1, 2))
        channels_last = pooled.numpy().astype(np.float64).transpose(0, 1, 3, 4, 2)
        reconstructed = ((channels_last - mean) @ directions.T @ directions + mean).transpose(0, 1, 4, 2, 3)
        pooled_all.append(pooled.numpy())
        reconstructed_all.append(reconstructed)
        decoded_all.append(reader.decode_feature("16", fields))
        assert decoded_all[-1].shape == (stop - start, 2, 32, 2, 2)
    pooled, reconstructed, decoded = map(np.concatenate, (pooled_all, reconstructed_all, decoded_all))
    assert np.linalg.norm(decoded - reconstructed) / np.linalg.norm(reconstructed - mean[:, None, None]) < 0.01
    assert np.linalg.norm(decoded - pooled) / np.linalg.norm(pooled) < 0.2

    epoch_0 = pooled[:manifest.layout.num_samples]  # the units come in training order: epoch 0 first
    np.testing.assert_allclose(reader.projections["16"], fit_projection(projection_samples(epoch_0), 8),
                               rtol=1e-4, atol=1e-4)

    reader.read_only_features(("16",))
    fields = reader.read_fields(1, 0, 4)
    assert VALUES + "9" not in fields and VALUES + "16" in fields


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_feature_archive_verifies_and_its_manifest_round_trips(backend, archives):
    result = run_cli("verify", archives(backend))
    assert result.exit_code == 0 and "problems: none" in result.output, result.output
    manifest = read_manifest(archives(backend))
    assert json_bytes(manifest.to_dict()) == (archives(backend) / "manifest.json").read_bytes()
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))).features == manifest.features


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nested_module_with_dots_in_its_name_is_stored(backend, data, tmp_path):
    """`net.9` names a module inside another: its fields, feature.net.9 and its projection
    projections/net.16.npy, are stored, verified and read like any other."""
    out = tmp_path / "archive"
    cli_json("cache-teacher", "--data", data, "--out", out, *CACHE, "--epochs", 1, "--format", backend,
             "--teacher", "tests.toy_models:recording_teacher", "--outputs", "logits,net.9,net.16=pool:2+pca:4+int8")
    assert run_cli("verify", out).exit_code == 0
    reader = ArchiveReader(out)
    assert reader.manifest.projection_keys == ("projections/net.16.npy",)
    teacher = Teacher(ModelSpec.from_dict(reader.manifest.teacher.spec), size=16, features=("net.9",))
    views = ViewDataset(open_source(str(data)), reader.manifest.recipe)
    features, _, _ = teacher_outputs(teacher, views, 0, 4, 8)
    np.testing.assert_allclose(reader.decode_feature("net.9", reader.read_fields(0, 4, 8)), features["net.9"],
                               rtol=1e-3, atol=1e-3)  # stored as fp16, the default
    assert reader.decode_feature("net.16", reader.read_fields(0, 4, 8)).shape == (4, 2, 32, 2, 2)


# --- manifests refused by name -------------------------------------------------------------


def _rename_the_pca_codec(manifest: dict) -> None:
    manifest["features"][1]["codec"]["name"] = "pool:2x2+pca:4+int8"


def _schema_2(manifest: dict) -> None:
    manifest["schema_version"] = 2


def _list_a_module_twice(manifest: dict) -> None:
    manifest["features"].append(manifest["features"][0])


def _pool_a_vector(manifest: dict) -> None:
    manifest["features"][1]["shape"] = [32]


def _more_components_than_channels(manifest: dict) -> None:
    manifest["features"][1]["codec"] |= {"components": 64, "name": "pool:2x2+pca:64+int8"}


def _one_pool_size(manifest: dict) -> None:
    manifest["features"][1]["codec"] |= {"pool": [2], "name": "pool:2x2+pca:8+int8"}


def _a_dtype_of_another_library(manifest: dict) -> None:
    manifest["features"][0]["codec"]["dtype"] = "bfloat16"


def _unlist_the_projection(manifest: dict) -> None:
    manifest["total_bytes"] -= manifest["files"].pop("projections/16.npy")["bytes"]


@pytest.mark.parametrize("edit, fragments", [
    (_rename_the_pca_codec, ["features[1].codec.name 'pool:2x2+pca:4+int8' contradicts", "'pool:2x2+pca:8+int8'"]),
    (_schema_2, ["features needs schema_version 3", "not 2"]),
    (_list_a_module_twice, ["features lists module '9' twice"]),
    (_pool_a_vector, ["features[1]", "pooling applies to feature maps"]),
    (_more_components_than_channels, ["features[1]", "fewer than pca:64"]),
    (_one_pool_size, ["features[1].codec.pool must be [height, width]"]),
    (_a_dtype_of_another_library, ["features[0].codec.dtype must be one of", "'bfloat16'"]),
    (_unlist_the_projection, ["files does not list projections/16.npy"]),
])
def test_a_tampered_features_entry_is_refused_by_name(edit, fragments, archives, tmp_path):
    """Edited and sealed again as a forger would: refused by `Manifest.from_dict` and by
    every reader, naming the field."""
    manifest = json.loads((archives("zarr") / "manifest.json").read_text())
    edit(manifest)
    with pytest.raises(ManifestError) as raised:
        Manifest.from_dict(manifest)
    for fragment in fragments:
        assert fragment in str(raised.value), raised.value
    copy = tmp_path / "copy"
    shutil.copytree(archives("zarr"), copy)
    (copy / "manifest.json").write_bytes(json_bytes(seal(manifest)))
    assert_user_error(run_cli("verify", copy), *fragments)


def test_a_projection_of_the_wrong_shape_is_refused_on_opening(archives, tmp_path):
    """A projections/16.npy listed with its true checksum but not (components + 1, C)."""
    copy = tmp_path / "copy"
    shutil.copytree(archives("zarr"), copy)
    data = projection_bytes(np.zeros((3, 32), dtype=np.float32))
    (copy / "projections" / "16.npy").write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    old = manifest["files"]["projections/16.npy"]["bytes"]
    manifest["files"]["projections/16.npy"] = {"bytes": len(data), "sha256": sha256_hex(data)}
    manifest["total_bytes"] += len(data) - old
    (copy / "manifest.json").write_bytes(json_bytes(seal(manifest)))
    with pytest.raises(ArchiveError) as raised:
        ArchiveReader(copy)
    assert "is damaged: projections/16.npy holds float32 (3, 32), not float32 (9, 32)" in str(raised.value)


# --- resuming keeps the projection ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_feature_archive_keeps_its_projection(backend, archives, data, tmp_path, monkeypatch):
    """Stopped (as by Ctrl-C) after its first shard: the re-run fits nothing, computes the
    other five shards and ends byte-identical to the uninterrupted archive."""
    fits, writes = [], []
    fit, write_unit = cache.fit_projections, ArchiveWriter.write_unit

    def counted_fit(*args):
        fits.append(1)
        return fit(*args)

    def stop_at_the_second_shard(self, *args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return write_unit(self, *args, **kwargs)

    monkeypatch.setattr(cache, "fit_projections", counted_fit)
    out = tmp_path / "archive"
    command = ["cache-teacher", "--data", data, "--out", out, *CACHE, "--format", backend, "--outputs", OUTPUTS]
    with monkeypatch.context() as patch:
        patch.setattr(ArchiveWriter, "write_unit", stop_at_the_second_shard)
        assert run_cli(*command).exit_code == 130
    assert not (out / "manifest.json").exists() and (out / "projections" / "16.npy").is_file()
    assert len(fits) == 1
    result = cli_json(*command)
    assert len(fits) == 1, "the re-run fitted the projection again"
    assert result["computed_views"] == 5 * 4 * 2
    assert archive_files(out) == archive_files(archives(backend))


# --- --overwrite removes exactly the archive's own objects ------------------------------------


def test_overwrite_removes_the_projections_of_the_archive_it_replaces(archives, data, tmp_path):
    """Replaced by an archive without pca: neither projections/16.npy nor any feature.16
    object stays (the folders they were in may, empty)."""
    out = tmp_path / "archive"
    shutil.copytree(archives("zarr"), out)
    replacement = [*CACHE, "--outputs", "logits,9=int8"]
    cli_json("cache-teacher", "--data", data, "--out", out, *replacement, "--overwrite")
    fresh = tmp_path / "fresh"
    cli_json("cache-teacher", "--data", data, "--out", fresh, *replacement)
    assert "projections/16.npy" in archive_files(archives("zarr"))
    assert archive_files(out) == archive_files(fresh)  # no projections/16.npy, no feature.16 objects


@pytest.mark.parametrize("foreign", ["projections/9.npy", "projections/notes.txt", "notes.txt"])
def test_overwrite_refuses_a_feature_archive_holding_a_users_file(foreign, archives, data, tmp_path):
    out = tmp_path / "archive"
    shutil.copytree(archives("zarr"), out)
    (out / foreign).write_text("mine")
    before = archive_files(out)
    result = run_cli("cache-teacher", "--data", data, "--out", out, *CACHE, "--outputs", "logits", "--overwrite")
    assert_user_error(result, f"holds {foreign}", "not part of")
    assert archive_files(out) == before
