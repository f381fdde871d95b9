"""Logit codecs: exact where promised, bounded error where not, and usable at any temperature."""

import math

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, ModelError
from pipeline.store import BACKENDS, DenseCodec, Int8Codec, TopKCodec, parse_codec
from pipeline.store.codecs import LOG_TAIL_FLOOR, LOGPROB_STEP

from .conftest import cli_json


def _logits(n=64, views=2, classes=100, scale=4.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, views, classes)) * scale).astype(np.float32)


def test_dense_fp32_is_lossless_and_fp16_is_close():
    logits = _logits()
    assert np.array_equal(DenseCodec("float32").decode(DenseCodec("float32").encode(logits)), logits)
    half = DenseCodec("float16").decode(DenseCodec("float16").encode(logits))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, logits, rtol=1e-3, atol=1e-3)


def test_dense_fp16_refuses_overflow():
    with pytest.raises(ModelError, match="--codec dense-fp32"):
        DenseCodec("float16").encode(np.array([[[1e6, 0.0]]], dtype=np.float32))


def test_topk_by_hand():
    """logits (2, 1, 0, -1), k = 2: log p = z - logsumexp(z); the tail holds classes 2 and 3."""
    z = np.array([[[0.0, 2.0, -1.0, 1.0]]], dtype=np.float32)
    lse = math.log(sum(math.exp(v) for v in (0.0, 2.0, -1.0, 1.0)))
    fields = TopKCodec(2, 4).encode(z)
    assert fields["topk_indices"].tolist() == [[[1, 3]]]
    quantised = [round((lse - 2) * 16), round((lse - 1) * 16)]
    assert fields["topk_logprobs"].tolist() == [[[quantised[0], quantised[1] - quantised[0]]]]  # delta-coded
    assert TopKCodec(2, 4, "absolute").encode(z)["topk_logprobs"].tolist() == [[quantised]]  # schema 1
    tail = math.log(math.exp(0.0 - lse) + math.exp(-1.0 - lse))
    assert abs(float(fields["tail_logmass"][0, 0]) - tail) < 1e-3
    decoded = TopKCodec(2, 4).decode(fields)[0, 0]
    # the two tail classes share the tail mass equally
    assert decoded[0] == decoded[2] and abs(decoded[0] - (tail - math.log(2))) < 1e-3
    assert abs(decoded[1] - (2 - lse)) <= LOGPROB_STEP / 2 + 1e-6
    assert abs(decoded[3] - (1 - lse)) <= LOGPROB_STEP / 2 + 1e-6


@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_keeps_the_top_classes_and_the_tail_mass(k):
    logits = _logits()
    codec = TopKCodec(k, logits.shape[-1])
    fields = codec.encode(logits)
    assert fields["topk_indices"].dtype == np.uint16 and fields["topk_logprobs"].dtype == np.uint8
    log_probs = torch.from_numpy(logits).double().log_softmax(-1)
    top = log_probs.topk(k, dim=-1)
    assert np.array_equal(fields["topk_indices"], top.indices.numpy())
    decoded = torch.from_numpy(codec.decode(fields)).double()
    stored = decoded.gather(-1, top.indices)
    clipped = top.values < -255 * LOGPROB_STEP
    error = (stored - top.values).abs()[~clipped]
    assert error.max() <= LOGPROB_STEP / 2 + 1e-6
    # the tail's total probability is kept (up to float16)
    tail_true = 1 - top.values.exp().sum(-1)
    rest = torch.ones_like(decoded, dtype=torch.bool).scatter(-1, top.indices, False)
    tail_decoded = (decoded.exp() * rest).sum(-1)
    np.testing.assert_allclose(tail_decoded.numpy(), tail_true.numpy(), rtol=2e-3, atol=1e-6)


def test_topk_ratios_survive_any_temperature():
    """softmax(decoded / T) keeps the teacher's ratios between its top classes at every T."""
    logits = _logits(scale=2.0)
    codec = TopKCodec(10, logits.shape[-1])
    decoded = torch.from_numpy(codec.decode(codec.encode(logits)))
    original = torch.from_numpy(logits)
    top = original.topk(10, dim=-1).indices
    for temperature in (1.0, 4.0):
        ratio_true = (original.gather(-1, top) / temperature).diff(dim=-1)
        ratio_decoded = (decoded.gather(-1, top) / temperature).diff(dim=-1)
        assert (ratio_true - ratio_decoded).abs().max() <= LOGPROB_STEP / temperature + 1e-5


def test_topk_with_all_classes_has_no_tail():
    logits = _logits(classes=5)
    codec = parse_codec("topk:50", classes=5)
    assert codec.k == 5
    fields = codec.encode(logits)
    assert (fields["tail_logmass"] == np.float16(LOG_TAIL_FLOOR)).all()
    decoded = torch.from_numpy(codec.decode(fields)).softmax(-1)
    probs = torch.from_numpy(logits).softmax(-1)
    assert (decoded - probs).abs().max() < 0.03


@pytest.mark.parametrize("k", [1, 10, 100])
def test_delta_coded_logprobs_decode_to_the_absolute_ones_exactly(k):
    """Schema 2's steps between sorted log-probabilities give back schema 1's values, the
    floor (255) and ties included, and decode to the same logits bit for bit."""
    logits = _logits(scale=12.0)  # wide enough that some log-probabilities hit the floor
    delta, absolute = TopKCodec(k, 100), TopKCodec(k, 100, "absolute")
    stored, old = delta.encode(logits), absolute.encode(logits)
    assert np.array_equal(delta.quantised(stored), old["topk_logprobs"])
    assert (old["topk_logprobs"] == 255).any() or k < 100  # the floor is exercised
    assert np.array_equal(stored["topk_indices"], old["topk_indices"])
    assert delta.decode(stored).tobytes() == absolute.decode(old).tobytes()


def test_int8_is_within_half_a_step_and_decodes_in_float32_order():
    logits = _logits(scale=6.0)
    logits[0, 0] = 3.5  # a view whose logits are all equal: scale 1, every step 0, decoded exactly
    codec = parse_codec("dense-int8", classes=100)
    fields = codec.encode(logits)
    assert fields["logits"].dtype == np.int8 and fields["logits"].min() >= -127
    assert (fields["logits"].min(-1)[1:] == -127).all() and (fields["logits"].max(-1)[1:] == 127).all()
    decoded = codec.decode(fields)
    steps = (logits.max(-1) - logits.min(-1))[..., None] / 254
    assert (np.abs(decoded - logits) <= steps / 2 + 1e-5).all()
    assert (decoded[0, 0] == 3.5).all()
    product = fields["logits"].astype(np.float32) * fields["logits_scale"][..., None]
    by_hand = product + fields["logits_offset"][..., None]
    assert decoded.dtype == np.float32 and decoded.tobytes() == by_hand.tobytes()
    assert Int8Codec.from_dict(codec.to_dict(), 100) == codec


def test_wide_class_counts_use_wider_indices():
    assert TopKCodec(5, 70_000).fields(2, 70_000)["topk_indices"][1] == np.uint32


@pytest.mark.parametrize("name", ["topk:0", "topk:x", "dense", "zstd", "dense-int4"])
def test_bad_codec_names_are_refused(name):
    with pytest.raises(ConfigError, match="codec"):
        parse_codec(name, classes=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_student_trains_from_a_topk_archive(image_folder, tmp_path, backend):
    common = ["--epochs", 2, "--views-per-sample", 2, "--size", 16, "--workers", 0]
    dense = cli_json("cache-teacher", "--data", image_folder, "--teacher", "kdpipe:cnn", "--out", tmp_path / "d",
                     "--format", backend, *common)
    topk = cli_json("cache-teacher", "--data", image_folder, "--teacher", "kdpipe:cnn", "--out", tmp_path / "k",
                    "--format", backend, "--codec", "topk:2", *common)
    assert topk["views"] == dense["views"]
    summary = cli_json("train-student", "--data", image_folder, "--student", "kdpipe:mlp", "--cache", tmp_path / "k",
                       "--out", tmp_path / "run", "--epochs", 2, "--workers", 0)
    assert summary["mode"] == "cached" and (tmp_path / "run" / "student.pt").exists()
