"""Feature codecs: how a teacher's named intermediate output (a feature map, or a
vector, per view) becomes stored arrays, and back (`cache-teacher --outputs MODULE=CODEC`).

A feature codec is a chain of up to three steps, written `pool:HxW+pca:K+DTYPE`, each
optional and always in that order:

- `pool:HxW` (or `pool:S` for S x S): a map (C, H, W) average-pooled to H x W with the
  bins of adaptive average pooling (`torch.nn.functional.adaptive_avg_pool2d`'s). Not
  undone on reading: the archive holds the pooled map, and the student's map is aligned
  to its size.
- `pca:K`: the C channels projected on the teacher's K principal directions. They are
  fitted on a seeded sample of views before the first shard is computed (`fit_projection`)
  and stored in the archive as one float32 array (K + 1, C): the mean, then the K
  directions. Reading maps the coefficients back: mean + directions^T @ coefficients.
- the stored number type: `fp32` (lossless), `fp16` (the default) or `int8`. int8 keeps
  each view's channel (or PCA component) as steps about a float16 offset with a float16
  scale per view and channel: `value = offset + scale * step`, steps -127..127, so every
  value is within half a step of the truth. A vector (no spatial dimensions) has one
  offset and scale per view.

A codec names its fields (shape after (positions,), dtype) like a logit codec does, so
backends store them without knowing what they are.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .codecs import INT8_LEVELS
from .layout import ManifestError, parse_int, parse_object, parse_typed

DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}  # codec part -> stored dtype
FEATURE_CODEC_NAMES = "a chain of pool:HxW, pca:K and fp32, fp16 or int8, e.g. pool:7+pca:32+int8"
FLOAT16_TINY = float(np.finfo(np.float16).tiny)
VALUES, SCALE, OFFSET = "feature.", "feature_scale.", "feature_offset."  # stored array name = prefix + module
PROJECTIONS = "projections/"  # a pca codec's projection object: projections/MODULE.npy
LOGIT_CODEC = re.compile(r"^(dense-|topk:)")


@dataclass(frozen=True)
class FeatureCodec:
    """How the output of teacher module `module`, `shape` per view (channels first), is stored."""

    module: str
    shape: tuple[int, ...]
    dtype: str = "float16"
    pool: tuple[int, int] | None = None
    components: int | None = None

    @property
    def name(self) -> str:
        parts = [] if self.pool is None else [f"pool:{self.pool[0]}x{self.pool[1]}"]
        parts += [] if self.components is None else [f"pca:{self.components}"]
        return "+".join(parts + [next(part for part, dtype in DTYPES.items() if dtype == self.dtype)])

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape per view of the stored values: (components or C, pooled or own spatial size)."""
        spatial = self.pool if self.pool is not None else self.shape[1:]
        return (self.components or self.shape[0], *spatial)

    @property
    def decoded_shape(self) -> tuple[int, ...]:
        """The shape per view reading gives back: the teacher's channels at the stored size."""
        return (self.shape[0], *self.stored_shape[1:])

    @property
    def projection_key(self) -> str | None:
        """The archive object holding the PCA projection; None without `pca`."""
        return None if self.components is None else f"{PROJECTIONS}{self.module}.npy"

    @classmethod
    def from_name(cls, module: str, name: str, shape: tuple[int, ...] | None) -> FeatureCodec:
        """The codec `name` (FEATURE_CODEC_NAMES) for module `module`; with `shape`, checked
        to apply to the module's output (pooling needs a map, PCA at most C components)."""
        if LOGIT_CODEC.match(name):
            raise ConfigError(f"--outputs {module}={name}: {name} is a codec of logits; a feature map is stored "
                              f"with {FEATURE_CODEC_NAMES}")
        pool = components = None
        dtype = "float16"
        parts = name.split("+")
        for index, part in enumerate(parts):
            kind, _, value = part.partition(":")
            last = index == len(parts) - 1
            if kind == "pool" and index == 0 and value:
                pool = _pool_size(module, name, value)
            elif kind == "pca" and index == (pool is not None) and value:
                components = _positive(module, name, value)
            elif part in DTYPES and last:
                dtype = DTYPES[part]
            else:
                raise ConfigError(f"--outputs {module}={name}: cannot read {part!r}; the codec is {FEATURE_CODEC_NAMES}")
        codec = cls(module, tuple(shape or ()), dtype, pool, components)
        if shape is not None:
            codec.check_applies()
        return codec

    def check_applies(self) -> None:
        """Refuse a codec that does not apply to this output: pooling a vector or to a
        larger size, more PCA components than channels."""
        where = f"--outputs {self.module}={self.name}"
        if not self.shape:
            raise ConfigError(f"{where}: the module gives a scalar per view, which is no feature to distil")
        if self.pool is not None and len(self.shape) != 3:
            raise ConfigError(f"{where}: pooling applies to feature maps (channels, height, width), but {self.module!r} "
                              f"gives {_shape(self.shape)} per view; drop pool:")
        if self.pool is not None and (self.pool[0] > self.shape[1] or self.pool[1] > self.shape[2]):
            raise ConfigError(f"{where}: {self.module!r} gives maps of {self.shape[1]} x {self.shape[2]}, smaller "
                              f"than pool:{self.pool[0]}x{self.pool[1]}")
        if self.components is not None and len(self.shape) == 2:
            raise ConfigError(f"{where}: pca projects the channels of vectors (C,) and maps (C, H, W), but "
                              f"{self.module!r} gives {_shape(self.shape)} per view (a transformer's tokens?); "
                              "store it without pca")
        if self.components is not None and self.components > self.shape[0]:
            raise ConfigError(f"{where}: {self.module!r} has {self.shape[0]} channels, fewer than pca:{self.components}")

    def to_dict(self) -> dict:
        return {"module": self.module, "shape": list(self.shape),
                "codec": {"name": self.name, "dtype": self.dtype, "pool": None if self.pool is None else list(self.pool),
                          "components": self.components}}

    @classmethod
    def from_dict(cls, data: Any, index: int) -> FeatureCodec:
        """A manifest's `features[index]`; its codec's name must be the one its parts say."""
        where = f"features[{index}]"
        data = parse_object(data, where, ("module", "shape", "codec"))
        shape = parse_typed(data["shape"], f"{where}.shape", list)
        shape = tuple(parse_int(size, f"{where}.shape", minimum=1) for size in shape)
        codec = parse_object(data["codec"], f"{where}.codec", ("name", "dtype", "pool", "components"))
        if codec["dtype"] not in DTYPES.values():
            raise ManifestError(f"{where}.codec.dtype must be one of {', '.join(DTYPES.values())}, got {codec['dtype']!r}")
        pool = codec["pool"]
        if pool is not None:
            pool = parse_typed(pool, f"{where}.codec.pool", list)
            if len(pool) != 2:
                raise ManifestError(f"{where}.codec.pool must be [height, width], got {pool!r}")
            pool = tuple(parse_int(size, f"{where}.codec.pool", minimum=1) for size in pool)
        components = codec["components"]
        if components is not None:
            components = parse_int(components, f"{where}.codec.components", minimum=1)
        module = parse_typed(data["module"], f"{where}.module", str)
        if not module or "/" in module:
            raise ManifestError(f"{where}.module must be a module name (not empty, no '/'), got {module!r}")
        feature = cls(module, shape, codec["dtype"], pool, components)
        if codec["name"] != feature.name:
            raise ManifestError(f"{where}.codec.name {codec['name']!r} contradicts its parts ({feature.name!r})")
        try:
            feature.check_applies()
        except ConfigError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        return feature

    def fields(self, views: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        fields = {VALUES + self.module: ((views, *self.stored_shape), np.dtype(self.dtype))}
        if self.dtype == "int8":
            scales = (views, self.stored_shape[0]) if len(self.shape) > 1 else (views,)
            fields |= {SCALE + self.module: (scales, np.dtype(np.float16)),
                       OFFSET + self.module: (scales, np.dtype(np.float16))}
        return fields

    def pooled(self, values: np.ndarray) -> np.ndarray:
        """(n, V, *shape) float32 outputs pooled to `pool` (as they are without it)."""
        return values if self.pool is None else adaptive_average_pool(values, self.pool)

    def reduce(self, values: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
        """(n, V, *shape) float32 outputs pooled and projected: what is quantised, float32."""
        values = self.pooled(values)
        if self.components is not None:
            values = np.einsum("kc,nvc...->nvk...", projection[1:], values - _channels(projection[0], values.ndim - 2),
                               optimize=True).astype(np.float32)
        return values

    def encode(self, values: np.ndarray, projection: np.ndarray | None) -> dict[str, np.ndarray]:
        """(n, V, *shape) float32 outputs into stored fields."""
        reduced = self.reduce(values, projection)
        if self.dtype != "int8":
            with np.errstate(over="ignore"):
                stored = reduced.astype(self.dtype)
            if not np.isfinite(stored).all():
                raise ConfigError(f"the teacher's {self.module!r} outputs exceed the {self.dtype} range; store it "
                                  "with fp32 (or int8)")
            return {VALUES + self.module: stored}
        axes = tuple(range(3, reduced.ndim)) if len(self.shape) > 1 else (2,)
        low, high = reduced.min(axis=axes), reduced.max(axis=axes)
        with np.errstate(over="ignore"):
            offset = (low / 2 + high / 2).astype(np.float16)
        if not np.isfinite(offset).all():
            raise ConfigError(f"the teacher's {self.module!r} outputs exceed the float16 range of int8's offsets; "
                              "store it with fp32")
        reach = np.maximum(high - offset.astype(np.float32), offset.astype(np.float32) - low)
        with np.errstate(over="ignore"):
            scale = _round_up_float16(np.maximum(reach / INT8_LEVELS, FLOAT16_TINY))
        if not np.isfinite(scale).all():
            raise ConfigError(f"the teacher's {self.module!r} outputs span more than int8's float16 scale can hold; "
                              "store it with fp32")
        shape = offset.shape + (1,) * len(axes)
        steps = np.rint((reduced - offset.astype(np.float32).reshape(shape)) / scale.astype(np.float32).reshape(shape))
        stored = np.clip(steps, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        return {VALUES + self.module: stored, SCALE + self.module: scale, OFFSET + self.module: offset}

    def dequantise(self, fields: dict[str, np.ndarray]) -> np.ndarray:
        """(n, V, *stored_shape) float32: the stored values as numbers, before any PCA is
        undone (what `reduce` gave, within the number type's error)."""
        values = fields[VALUES + self.module]
        if self.dtype != "int8":
            return values.astype(np.float32, copy=False)
        scale, offset = fields[SCALE + self.module], fields[OFFSET + self.module]
        shape = scale.shape + (1,) * (values.ndim - scale.ndim)
        values = values.astype(np.float32) * scale.astype(np.float32).reshape(shape)
        return values + offset.astype(np.float32).reshape(shape)

    def decode(self, fields: dict[str, np.ndarray], projection: np.ndarray | None) -> np.ndarray:
        """(n, V, *decoded_shape) float32 outputs from stored fields."""
        values = self.dequantise(fields)
        if self.components is not None:
            values = np.einsum("kc,nvk...->nvc...", projection[1:], values, optimize=True).astype(np.float32)
            values += _channels(projection[0], values.ndim - 2)
        return values


def _channels(vector: np.ndarray, dims: int) -> np.ndarray:
    """A per-channel vector (C,) shaped to broadcast over (..., C, *spatial) of `dims` dims per view."""
    return vector.reshape((-1,) + (1,) * (dims - 1))


def _round_up_float16(values: np.ndarray) -> np.ndarray:
    """`values` as float16, each rounded up where float16 rounding would make it smaller
    (a scale must never shrink, or a value would fall outside the 127 steps)."""
    rounded = values.astype(np.float16)
    smaller = rounded.astype(np.float32) < values
    rounded[smaller] = np.nextafter(rounded[smaller], np.float16(np.inf))
    return rounded


def adaptive_average_pool(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average-pool the last two dimensions of `values` to `size`, with adaptive average
    pooling's bins: output row i averages input rows floor(i H / h) to ceil((i + 1) H / h)."""
    height, width = values.shape[-2:]
    rows = [(i * height // size[0], -(-(i + 1) * height // size[0])) for i in range(size[0])]
    columns = [(j * width // size[1], -(-(j + 1) * width // size[1])) for j in range(size[1])]
    out = np.empty(values.shape[:-2] + tuple(size), dtype=np.float32)
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(columns):
            out[..., i, j] = values[..., top:bottom, left:right].mean(axis=(-2, -1), dtype=np.float64)
    return out


def fit_projection(samples: np.ndarray, components: int) -> np.ndarray:
    """The PCA projection of `samples` (m, C): float32 (components + 1, C), the mean then
    the principal directions by decreasing variance, each signed so that its largest
    entry is positive (an eigen-solver's sign is arbitrary; the stored one is not)."""
    samples = samples.astype(np.float64)
    mean = samples.mean(axis=0)
    centred = samples - mean
    covariance = centred.T @ centred / max(len(samples) - 1, 1)
    variances, vectors = np.linalg.eigh(covariance)
    directions = vectors[:, np.argsort(variances)[::-1][:components]].T
    signs = np.sign(directions[np.arange(len(directions)), np.abs(directions).argmax(axis=1)])
    return np.vstack([mean, directions * signs[:, None]]).astype(np.float32)


def projection_samples(values: np.ndarray) -> np.ndarray:
    """The C-vectors PCA is fitted on, from (n, V, C, ...) outputs: every view's vector, or
    of a map every position's."""
    channels = values.shape[2]
    return np.moveaxis(values, 2, -1).reshape(-1, channels)


def projection_bytes(projection: np.ndarray) -> bytes:
    """The stored form of a projection: a .npy file (format 1.0, little-endian float32)."""
    out = io.BytesIO()
    np.lib.format.write_array(out, np.ascontiguousarray(projection, dtype="<f4"), version=(1, 0), allow_pickle=False)
    return out.getvalue()


def read_projection(data: bytes, feature: FeatureCodec) -> np.ndarray:
    """A stored projection, checked to be (components + 1, C) float32."""
    try:
        projection = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ManifestError(f"{feature.projection_key} is not a .npy array ({exc})") from None
    expected = (feature.components + 1, feature.shape[0])
    if projection.shape != expected or projection.dtype != np.dtype("<f4"):
        raise ManifestError(f"{feature.projection_key} holds {projection.dtype} {projection.shape}, not float32 {expected}")
    return projection


def parse_output(text: str) -> tuple[str, str]:
    """(module, codec name) of one `--outputs` entry other than `logits`: `MODULE` or
    `MODULE=CODEC` (fp16 when no codec is given)."""
    module, _, name = text.partition("=")
    if not module:
        raise ConfigError(f"--outputs {text!r}: name a module, e.g. layer3=pca:32+int8")
    return module, name or "fp16"


def _positive(module: str, name: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"--outputs {module}={name}: {value!r} is not a positive integer")
    return int(value)


def _pool_size(module: str, name: str, value: str) -> tuple[int, int]:
    height, cross, width = value.partition("x")
    return _positive(module, name, height), _positive(module, name, width if cross else height)


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))
