"""Logit codecs: how a view's pre-softmax logits become stored arrays, and back.

- `dense-fp32`: the logits as float32, lossless.
- `dense-fp16`: the logits as float16 (the default; half the bytes, relative rounding error at most 2^-11).
- `dense-int8`: the logits as int8 with a float32 scale and offset per view (a quarter
  of float32's bytes; each logit within half a step, (max - min) / 254, of the truth).
- `none`: no logits at all, for an archive of feature outputs alone (a detector's neck
  features: a detector has no per-view logits to store). Never chosen on the command
  line: cache-teacher picks it for a detector teacher.
- `topk:K`: the K most likely classes of each view as indices (uint16, or uint32 past
  65,536 classes) and their log-probabilities quantised to uint8 in steps of 1/16 nat,
  plus the log of the tail mass (float16). Decoding rebuilds a full logit vector: the
  top K at their log-probabilities, the other C-K classes sharing the tail mass
  equally. Log-probabilities are logits up to a constant, so any temperature applied at
  training time sees the teacher's top-K ratios exactly, and the tail's total mass is
  kept at T = 1 (the tail's shape is what is lost). Schema 2 stores the quantised
  log-probabilities as steps from the previous class's (`logprob_coding` "delta": they
  are sorted, so the steps are small numbers and compress about a quarter smaller);
  schema-1 archives store them as they are ("absolute").

A codec names its fields (shape after (positions,), dtype); backends store each field
as an array or record member, so adding a codec touches no backend. Each codec class
parses its own command-line name (`from_name`) and its manifest entry (`from_dict`,
where the strict checks live) and writes that entry back (`to_dict`); `parse_codec`
and `codec_from_dict` only pick the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelError
from .layout import ManifestError, parse_int, parse_object

LOGPROB_STEP = 1 / 16  # nats per uint8 step: log-probabilities down to -15.9 are kept
LOG_TAIL_FLOOR = -60.0  # the log tail mass of a view whose tail underflows
ENCODE_ROWS = 4096  # positions encoded at a time


DENSE_NAMES = {"dense-fp16": "float16", "dense-fp32": "float32"}  # name -> dtype of the stored logits
INT8_NAME = "dense-int8"
INT8_LEVELS = 127  # stored values -127..127: the view's range in 254 steps, symmetric about its middle
TOPK_PREFIX = "topk:"
NO_LOGITS = "none"


@dataclass(frozen=True)
class DenseCodec:
    dtype: str  # "float16" or "float32"

    def __post_init__(self):
        if self.dtype not in DENSE_NAMES.values():
            raise ConfigError(f"a dense codec stores float16 or float32, not {self.dtype!r}")

    @property
    def name(self) -> str:
        return "dense-fp16" if self.dtype == "float16" else "dense-fp32"

    @staticmethod
    def claims(name: Any) -> bool:
        """Whether `name` (a CLI name or a manifest's codec.name) is a dense codec's."""
        return name in DENSE_NAMES

    @classmethod
    def from_name(cls, name: str, classes: int) -> DenseCodec:
        return cls(DENSE_NAMES[name])

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Any, classes: int) -> DenseCodec:
        """The codec of a manifest entry; its dtype must be the one its name says."""
        data = parse_object(data, "codec", ("name", "dtype"))
        name, dtype = data["name"], data["dtype"]
        if DENSE_NAMES.get(name) != dtype:
            raise ManifestError(f"codec.dtype {dtype!r} contradicts codec.name {name!r}")
        return cls(dtype)

    def fields(self, views: int, classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"logits": ((views, classes), np.dtype(self.dtype))}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """(n, V, C) float32 logits into stored fields; refuses values the dtype cannot hold."""
        with np.errstate(over="ignore"):
            stored = logits.astype(self.dtype)
        if not np.isfinite(stored).all():
            raise ModelError(f"the teacher's logits exceed the {self.dtype} range; use --codec dense-fp32")
        return {"logits": stored}

    def decode(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        return fields["logits"].astype(np.float32, copy=False)


@dataclass(frozen=True)
class Int8Codec:
    """Every logit as int8 with a float32 scale and offset per view: `logits * scale +
    offset`, for teachers whose whole distribution matters at a quarter of fp32's bytes."""

    name = INT8_NAME

    @staticmethod
    def claims(name: Any) -> bool:
        return name == INT8_NAME

    @classmethod
    def from_name(cls, name: str, classes: int) -> Int8Codec:
        return cls()

    def to_dict(self) -> dict:
        return {"name": INT8_NAME, "dtype": "int8", "scale": "per-view"}

    @classmethod
    def from_dict(cls, data: Any, classes: int) -> Int8Codec:
        data = parse_object(data, "codec", ("name", "dtype", "scale"))
        if data["dtype"] != "int8" or data["scale"] != "per-view":
            raise ManifestError(f"codec {INT8_NAME} stores dtype 'int8' with scale 'per-view', got "
                                f"{data['dtype']!r} and {data['scale']!r}")
        return cls()

    def fields(self, views: int, classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"logits": ((views, classes), np.dtype(np.int8)), "logits_scale": ((views,), np.dtype(np.float32)),
                "logits_offset": ((views,), np.dtype(np.float32))}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """(n, V, C) float32 logits into int8 steps of each view's range: offset is its
        middle, scale its width over 254 (1 for a view whose logits are all equal)."""
        low, high = logits.min(-1), logits.max(-1)
        offset = (low / 2 + high / 2).astype(np.float32)  # halves first: no overflow near the float32 limit
        width = high.astype(np.float64) - low
        scale = np.where(width > 0, width / (2 * INT8_LEVELS), 1.0).astype(np.float32)
        steps = np.rint((logits - offset[..., None].astype(np.float64)) / scale[..., None])
        stored = np.clip(steps, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        return {"logits": stored, "logits_scale": scale, "logits_offset": offset}

    def decode(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """float32 `logits * scale + offset`: the product rounded to float32, then the sum."""
        product = fields["logits"].astype(np.float32) * fields["logits_scale"][..., None]
        return product + fields["logits_offset"][..., None]


@dataclass(frozen=True)
class TopKCodec:
    k: int  # classes kept per view (at most the class count)
    classes: int
    logprob_coding: str = "delta"  # how topk_logprobs holds the quantised log-probabilities

    @property
    def name(self) -> str:
        return f"{TOPK_PREFIX}{self.k}"

    @staticmethod
    def claims(name: Any) -> bool:
        return isinstance(name, str) and name.startswith(TOPK_PREFIX)

    @classmethod
    def from_name(cls, name: str, classes: int) -> TopKCodec:
        """`topk:K` with K capped at the class count."""
        try:
            k = int(name[len(TOPK_PREFIX):])
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"--codec {name}: K must be a positive integer, e.g. topk:10")
        return cls(min(k, classes), classes)

    def to_dict(self) -> dict:
        """The manifest entry; a schema-1 ("absolute") entry has no `logprob_coding`."""
        data = {"name": self.name, "k": self.k, "logprob_step": LOGPROB_STEP, "tail": "uniform"}
        return data if self.logprob_coding == "absolute" else data | {"logprob_coding": self.logprob_coding}

    @classmethod
    def from_dict(cls, data: Any, classes: int) -> TopKCodec:
        """The codec of a manifest entry: K a positive integer, at most the class count and
        the one its name says, with the quantisation step and tail this kdpipe decodes."""
        data = parse_object(data, "codec", ("name", "k", "logprob_step", "tail"), optional=("logprob_coding",))
        k = parse_int(data["k"], "codec.k", minimum=1)
        if data["name"] != f"{TOPK_PREFIX}{k}":
            raise ManifestError(f"codec.k {k} contradicts codec.name {data['name']!r}")
        if k > classes:
            raise ManifestError(f"codec.k {k} exceeds layout.num_classes {classes}")
        if data["logprob_step"] != LOGPROB_STEP or isinstance(data["logprob_step"], bool):
            raise ManifestError(f"codec.logprob_step must be {LOGPROB_STEP}, got {data['logprob_step']!r}")
        if data["tail"] != "uniform":
            raise ManifestError(f"codec.tail must be 'uniform', got {data['tail']!r}")
        if data.get("logprob_coding", "delta") != "delta":
            raise ManifestError(f"codec.logprob_coding must be 'delta' (or absent), got {data['logprob_coding']!r}")
        return cls(k, classes, data.get("logprob_coding", "absolute"))

    def _index_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.classes <= 1 << 16 else np.uint32)

    def fields(self, views: int, classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            "topk_indices": ((views, self.k), self._index_dtype()),
            "topk_logprobs": ((views, self.k), np.dtype(np.uint8)),
            "tail_logmass": ((views,), np.dtype(np.float16)),
        }

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """(n, V, C) float32 logits into the top-k fields, a slice of rows at a time (the
        float64 work arrays are several times the input)."""
        parts = [self._encode(logits[i: i + ENCODE_ROWS]) for i in range(0, len(logits), ENCODE_ROWS)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        z = logits.astype(np.float64)
        log_probs = z - _logsumexp(z, axis=-1)[..., None]
        top = np.argpartition(-log_probs, self.k - 1, axis=-1)[..., : self.k]
        top_log_probs = np.take_along_axis(log_probs, top, -1)
        order = np.argsort(-top_log_probs, axis=-1, kind="stable")
        top = np.take_along_axis(top, order, -1)
        top_log_probs = np.take_along_axis(top_log_probs, order, -1)
        quantised = np.clip(np.rint(-top_log_probs / LOGPROB_STEP), 0, 255).astype(np.uint8)
        if self.logprob_coding == "delta":  # non-decreasing along K: each step from the one before
            quantised = np.diff(quantised, axis=-1, prepend=np.uint8(0))
        if self.k < self.classes:
            rest = log_probs.copy()
            np.put_along_axis(rest, top, -np.inf, -1)
            tail = np.maximum(_logsumexp(rest, axis=-1), LOG_TAIL_FLOOR)
        else:
            tail = np.full(logits.shape[:-1], LOG_TAIL_FLOOR)
        return {
            "topk_indices": top.astype(self._index_dtype()),
            "topk_logprobs": quantised,
            "tail_logmass": tail.astype(np.float16),
        }

    def decode(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """Full (n, V, C) float32 logits: log-probabilities for the top K, the tail mass
        spread equally over the rest."""
        indices = fields["topk_indices"].astype(np.int64)
        tail = fields["tail_logmass"].astype(np.float32)
        rest = max(self.classes - self.k, 1)
        out = np.empty(indices.shape[:-1] + (self.classes,), dtype=np.float32)
        out[...] = (tail - np.float32(np.log(rest)))[..., None]
        np.put_along_axis(out, indices, self.stored_log_probs(fields), -1)
        return out

    def quantised(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """The stored classes' quantised log-probabilities q (log p = -q * step), uint8."""
        stored = fields["topk_logprobs"]
        return np.cumsum(stored, axis=-1, dtype=np.uint8) if self.logprob_coding == "delta" else stored

    def stored_log_probs(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """The stored classes' log-probabilities as float32, in the order of `topk_indices`."""
        return -self.quantised(fields).astype(np.float32) * np.float32(LOGPROB_STEP)


@dataclass(frozen=True)
class NoLogitsCodec:
    """No logits: the archive holds the teacher's feature outputs alone (`teacher.outputs`
    "features"). Its manifest entry is {"name": "none"}; it stores no field."""

    name = NO_LOGITS

    @staticmethod
    def claims(name: Any) -> bool:
        return name == NO_LOGITS

    def to_dict(self) -> dict:
        return {"name": NO_LOGITS}

    @classmethod
    def from_dict(cls, data: Any, classes: int) -> NoLogitsCodec:
        parse_object(data, "codec", ("name",))
        return cls()

    def fields(self, views: int, classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def decode(self, fields: dict[str, np.ndarray]) -> None:
        return None


Codec = DenseCodec | Int8Codec | TopKCodec | NoLogitsCodec
CODEC_NAMES = "dense-fp32, dense-fp16, dense-int8 or topk:K"


CODECS = (DenseCodec, Int8Codec, TopKCodec)  # those a user names; `none` only a detector teacher's archive has


def parse_codec(name: str, classes: int) -> Codec:
    """A codec from its command-line name; K is capped at the class count."""
    for kind in CODECS:
        if kind.claims(name):
            return kind.from_name(name, classes)
    raise ConfigError(f"unknown codec {name!r}; use {CODEC_NAMES}")


def check_codec_name(name: str) -> None:
    """Refuse a bad command-line codec name before the class count is known (and before
    any I/O): the name alone decides whether it parses."""
    parse_codec(name, classes=1)


def codec_from_dict(data: Any, classes: int) -> Codec:
    """The codec of a manifest's `codec` entry, for an archive of `classes` classes."""
    name = data.get("name") if isinstance(data, dict) else None
    for kind in (*CODECS, NoLogitsCodec):
        if kind.claims(name):
            return kind.from_dict(data, classes)
    raise ManifestError(f"codec {name!r} is unknown to this kdpipe; upgrade kdpipe")


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - peak), axis=axis)) + np.squeeze(peak, axis)
