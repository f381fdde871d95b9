"""Frozen specs for every stage, their canonical JSON form, and fingerprints.

Every spec is a frozen dataclass with `to_dict` / `from_dict`, so it can be written
into an archive manifest or a run directory and read back unchanged. A fingerprint
is the sha256 of the canonical JSON of what it describes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable content hash of a JSON-able object, prefixed with its algorithm."""
    return "sha256:" + sha256_hex(canonical_json(obj).encode())


def _from_dict(cls, data: dict[str, Any]):
    """Build a frozen dataclass from a dict, turning lists back into tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def parse_storage_options(pairs: list[str] | None) -> dict:
    """`KEY=VALUE` pairs into fsspec storage options. Values are read as JSON when they
    parse (numbers, true/false), else kept as text; `a.b=VALUE` nests (`client_kwargs.region_name=...`)."""
    options: dict = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return options


def first_difference(expected: Any, actual: Any, prefix: str = "") -> str | None:
    """The dotted name of the first field where two JSON-like values differ, or None."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            where = f"{prefix}.{key}" if prefix else key
            if key not in expected or key not in actual:
                return where
            found = first_difference(expected[key], actual[key], where)
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return prefix
        for i, (a, b) in enumerate(zip(expected, actual)):
            found = first_difference(a, b, f"{prefix}[{i}]")
            if found:
                return found
        return None
    return None if expected == actual else prefix


MIX_MODES = ("mixup", "cutmix")


@dataclass(frozen=True)
class ViewRecipe:
    """How the stream of augmented views is drawn. Every view is a pure function of
    (recipe, epoch, sample index, view index, image size); see `views.sample_view`.

    `scale` and `ratio` are those of inception-style random-resized-crop (fraction of
    the image area, and aspect ratio). `color_jitter` j draws brightness, contrast and
    saturation factors uniformly from [1-j, 1+j]; 0 switches colour changes off.
    `mixup`, when set, is {"mode": "mixup" | "cutmix", "alpha": A}: every view is mixed
    with the same view of a partner sample (a seeded pairing per epoch), with lam ~
    U(0, 1) for A = 0 (as in function matching) or Beta(A, A). The teacher sees the
    mixed pixels, so the student is taught on exactly those.
    """

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter: float = 0.0
    views_per_sample: int = 1
    epochs: int = 1
    seed: int = 0
    mixup: dict | None = None

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"view size must be at least 1 pixel, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not (0 <= self.flip_prob <= 1):
            raise ConfigError(f"flip probability must be in [0, 1], got {self.flip_prob}")
        if not (0 <= self.color_jitter < 1):
            raise ConfigError(f"colour jitter must be in [0, 1), got {self.color_jitter}")
        if self.views_per_sample < 1 or self.epochs < 1:
            raise ConfigError("views per sample and epochs must be at least 1")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.mixup is not None:
            mode, alpha = self.mixup.get("mode"), self.mixup.get("alpha")
            if set(self.mixup) != {"mode", "alpha"} or mode not in MIX_MODES:
                raise ConfigError(f"mixing must be one of {', '.join(MIX_MODES)}, got {self.mixup}")
            if not isinstance(alpha, (int, float)) or alpha < 0:
                raise ConfigError(f"--mix-alpha must be 0 (lam uniform) or positive (Beta(alpha, alpha)), got {alpha}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewRecipe:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: `torchvision:NAME`, `kdpipe:NAME` (built-in) or `module:factory`.

    `weights` is a file holding a state_dict (or a checkpoint that holds one).
    Normalisation (mean/std, applied to [0, 1] pixels) is part of the model.
    """

    name: str
    num_classes: int | None = None
    weights: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return _from_dict(cls, data)


MAIN_TEACHER = "main"  # the teacher an archive was made with; further ones are added by name


def check_teacher_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"teacher name {name!r} must be letters, digits, '_', '.' or '-' (e.g. resnet50)")


@dataclass(frozen=True)
class CacheSpec:
    """Everything `cache-teacher` needs: what to run, over which views, where to store."""

    data: str
    teacher: ModelSpec
    out: str
    recipe: ViewRecipe = field(default_factory=ViewRecipe)
    codec: str = "dense-fp16"
    format: str = "zarr"
    storage_options: dict = field(default_factory=dict)
    positions_per_shard: int | None = None
    batch_size: int = 256
    workers: int = 2
    overwrite: bool = False
    teacher_name: str = MAIN_TEACHER
    teacher_classes: tuple[str, ...] | None = None
    embedding_layer: str | None = None  # cache this layer's L2-normalised output ("": penultimate) instead of logits

    def __post_init__(self):
        # the codec and format names are the store's to check: cache_teacher does, before any I/O
        if self.embedding_layer is not None and self.codec.startswith("topk:"):
            raise ConfigError(f"--codec {self.codec} keeps the largest logits; embeddings are stored with a dense codec")
        check_teacher_name(self.teacher_name)
        if self.batch_size < 1:
            raise ConfigError("batch size must be at least 1")
        if self.positions_per_shard is not None and self.positions_per_shard < 1:
            raise ConfigError("shard size must be at least 1 position")


MODES = ("cached", "online", "supervised")
COMBINES = ("mean",)
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainSpec:
    """Everything `train-student` needs. `batch_size` counts samples; each sample gives
    `recipe.views_per_sample` views, so a step sees batch_size * views_per_sample images."""

    data: str
    student: ModelSpec
    out: str
    mode: str = "cached"
    recipe: ViewRecipe = field(default_factory=ViewRecipe)
    cache: str | None = None
    storage_options: dict = field(default_factory=dict)
    local_cache: str | None = None
    teacher: ModelSpec | None = None
    val: str | None = None
    epochs: int = 10
    cycle_epochs: bool = False
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    temperature: float = 1.0
    alpha: float = 0.0
    seed: int = 0
    workers: int = 2
    compile: bool = False
    teacher_batch_size: int | None = None
    student_size: int | None = None
    loss: str = "kd"
    loss_options: dict = field(default_factory=dict)
    teachers: tuple[str, ...] | None = None
    combine: str = "mean"
    schedule: tuple[tuple[str, int], ...] | None = None
    probe_data: str | None = None  # labelled images the linear probe of a SEED student is fitted on

    def __post_init__(self):
        from .losses import loss_options

        if (self.teachers or self.schedule) and self.mode != "cached":
            raise ConfigError("--teachers and --schedule name teachers of an archive: use them with --cache")
        for name in self.teachers or ():
            check_teacher_name(name)
        if self.combine not in COMBINES:
            raise ConfigError(f"--combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if self.schedule is not None:
            names = [name for name, _ in self.schedule]
            if self.teachers is not None and not set(names) <= set(self.teachers):
                raise ConfigError(f"--schedule names a teacher not in --teachers {','.join(self.teachers)}")
            if any(epochs < 1 for _, epochs in self.schedule) or sum(e for _, e in self.schedule) != self.epochs:
                raise ConfigError(f"--schedule must give each teacher at least 1 epoch and {self.epochs} (--epochs) in all")
        if self.loss == "seed" and (self.mode == "supervised" or self.alpha > 0):
            raise ConfigError("--loss seed distils a teacher's embeddings: use it with --cache or --teacher and --alpha 0")
        allowed = [name for name in loss_options(self.loss) if name != "temperature"]
        for name, value in self.loss_options.items():
            if name not in allowed:
                known = ", ".join(allowed) or "none"
                raise ConfigError(f"the {self.loss} loss has no option {name!r} (its options: {known}; T is --temperature)")
            if not isinstance(value, (int, float)):
                raise ConfigError(f"--loss-option {name} must be a number, got {value!r}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.mode == "cached" and not self.cache:
            raise ConfigError("--mode cached needs --cache ARCHIVE")
        if self.mode == "online" and self.teacher is None:
            raise ConfigError("--mode online needs --teacher MODEL (and usually --weights CKPT)")
        if self.mode != "cached" and self.cache:
            raise ConfigError(f"--cache is used only with --mode cached, not {self.mode}")
        if self.mode == "supervised" and self.teacher is not None:
            raise ConfigError("--teacher is not used in supervised mode; drop it or choose --mode online")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1")
        if self.student_size is not None and self.student_size < 1:
            raise ConfigError(f"--student-size must be at least 1 pixel, got {self.student_size}")
        if self.teacher_batch_size is not None and (self.teacher_batch_size < 1 or self.mode != "online"):
            raise ConfigError("--teacher-batch-size must be at least 1 and is used only in online mode")
        if "://" in str(self.out):
            raise ConfigError(f"--out {self.out} must be a local folder: a run directory is written on this machine")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not (0 <= self.alpha <= 1):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        """The run's configuration, without storage options (they may hold credentials)."""
        data = dataclasses.asdict(self)
        del data["storage_options"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        data = dict(data)
        data["student"] = ModelSpec.from_dict(data["student"])
        data["recipe"] = ViewRecipe.from_dict(data["recipe"])
        if data.get("teacher") is not None:
            data["teacher"] = ModelSpec.from_dict(data["teacher"])
        return _from_dict(cls, data)
