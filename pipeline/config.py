"""Frozen specs for every stage, their canonical JSON form, and fingerprints.

Every spec is a frozen dataclass with `to_dict` / `from_dict`, so it can be written
into an archive manifest or a run directory and read back unchanged. A fingerprint
is the sha256 of the canonical JSON of what it describes.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

UNLABELLED = -1  # the label of a sample that has none
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


MAX_VIEW_SIZE = 8192  # pixels per side of a rendered view: beyond this a typo, not a model's input
MAX_EPOCHS = 100_000  # of views cached or trained: beyond this a typo (200000 for 200)
MAX_VIEWS_PER_SAMPLE = 1024
MAX_WORKERS = 512


def check_number(option: str, value: Any, low: float | None = None, high: float | None = None,
                 above: bool = False, below: bool = False) -> None:
    """Refuse an option's value that is not a finite number in [low, high] (or the open
    side where `above`/`below`), naming the option: a NaN or an infinity passes every
    comparison-based check and then fails far from where it was typed."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value < high if below else value <= high
    if not ok:
        lower = "" if low is None else f"{'>' if above else '>='} {low:g}"
        upper = "" if high is None else f"{'<' if below else '<='} {high:g}"
        allowed = " and ".join(part for part in (lower, upper) if part)
        raise ConfigError(f"{option} must be a finite number{' ' + allowed if allowed else ''}, got {value!r}")


def check_path(option: str, value: str | None) -> None:
    """Refuse an empty path or URL: "" would mean the current folder, or "/" once a
    trailing slash is stripped (a whole filesystem to list or to write into)."""
    if value is not None and not str(value).strip():
        raise ConfigError(f"{option} is empty; give a folder or URL")


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute, links resolved (a URL or None unchanged): what a
    manifest or a run's config records, so that it means the same place from any working
    folder, however it was reached."""
    return path if path is None or "://" in path else os.path.realpath(path)


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
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # how the renderer resizes a crop
# RandAugment's ops. An archive's view parameters number them by their place here
# (docs/format.md), so the table is only ever appended to.
RANDAUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
DEFAULT_RANDAUGMENT_OPS = RANDAUGMENT_OPS[:14]  # torchvision's RandAugment; timm's also inverts
MAX_RANDAUGMENT_MAGNITUDE = 30  # torchvision's 31 magnitude bins, 0..30
MAX_RANDAUGMENT_OPS = 16  # per view: beyond this a typo, and each takes two view-parameter columns


def check_randaugment(randaugment: Any) -> None:
    """Refuse a RandAugment setting that is not {"num_ops": N, "magnitude": M, "ops": [...]}
    with N ops per view, a magnitude M in [0, 30] and op names from RANDAUGMENT_OPS; an
    unknown name is refused with the nearest valid ones."""
    if not isinstance(randaugment, dict) or set(randaugment) != {"num_ops", "magnitude", "ops"}:
        raise ConfigError(f"randaugment must be {{'num_ops': N, 'magnitude': M, 'ops': [NAME, ...]}}, got {randaugment!r}")
    num_ops, ops = randaugment["num_ops"], randaugment["ops"]
    if not isinstance(num_ops, int) or isinstance(num_ops, bool) or not 1 <= num_ops <= MAX_RANDAUGMENT_OPS:
        raise ConfigError(f"--randaugment N,M needs N (ops per view) from 1 to {MAX_RANDAUGMENT_OPS}, got {num_ops!r}")
    check_number("--randaugment N,M magnitude M", randaugment["magnitude"], 0, MAX_RANDAUGMENT_MAGNITUDE)
    if not isinstance(ops, (list, tuple)) or not ops:
        raise ConfigError(f"--randaugment-ops needs at least one of {', '.join(RANDAUGMENT_OPS)}, got {ops!r}")
    lowered = {op.lower(): op for op in RANDAUGMENT_OPS}
    for name in ops:
        if name not in RANDAUGMENT_OPS:
            near = [lowered[match] for match in difflib.get_close_matches(str(name).lower(), lowered, n=3)]
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            raise ConfigError(f"--randaugment-ops has no op {name!r}{hint} (ops: {', '.join(RANDAUGMENT_OPS)})")


DETECTION_DEFAULTS = {"scale": (0.5, 1.5), "min_visible": 0.3}  # the CLI's detection views
MAX_DETECTION_ZOOM = 10  # a detection view's zoom: beyond this a typo, and the window a few pixels


def check_detection(detection: Any) -> dict:
    """Refuse a detection setting that is not {"scale": [lo, hi], "min_visible": f} with a
    zoom range 0 < lo <= hi <= MAX_DETECTION_ZOOM and a visible share f in [0, 1]; return
    it with `scale` as a tuple, so a recipe read back from JSON equals the one written."""
    if not isinstance(detection, dict) or set(detection) != {"scale", "min_visible"}:
        raise ConfigError(f"detection must be {{'scale': [LO, HI], 'min_visible': F}}, got {detection!r}")
    scale = detection["scale"]
    if not isinstance(scale, (list, tuple)) or len(scale) != 2:
        raise ConfigError(f"--scale of detection views needs two zooms LO,HI, got {scale!r}")
    for value in scale:
        check_number("--scale (a detection view's zoom)", value, 0, MAX_DETECTION_ZOOM, above=True)
    if scale[0] > scale[1]:
        raise ConfigError(f"--scale of detection views must satisfy 0 < LO <= HI <= {MAX_DETECTION_ZOOM}, got {tuple(scale)}")
    check_number("detection min_visible (a share of a box's area)", detection["min_visible"], 0, 1)
    return {"scale": tuple(scale), "min_visible": detection["min_visible"]}


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
    mixed pixels, so the student is taught on exactly those. `interpolation` is how a
    crop is resized to `size` (antialiased), by default the teacher's own (its
    preprocessing); archives made before it was recorded read as "bilinear".

    `randaugment`, when set, is {"num_ops": N, "magnitude": M, "ops": [NAME, ...]}: each
    view gets N ops drawn from `ops` (names from RANDAUGMENT_OPS) at magnitude M of 30.
    `random_erase` is the probability that a view has a box of it replaced by noise.
    Both are drawn per view and recorded with its parameters, so the teacher sees what
    the student replays; off by default, and then left out of `to_dict`, so recipes
    without them keep the JSON and fingerprints they had before kdpipe knew them.

    `detection`, when set, is {"scale": (LO, HI), "min_visible": F} (DETECTION_DEFAULTS):
    views are then box-aware windows instead of inception crops (`views.sample_view`), the
    image zoomed by a factor in [LO, HI] (1: its longer side fills the view) and never
    stretched; a box stays when at least F of its area is still in view (`views.view_boxes`).
    `scale` and `ratio` are then unused. Mixing, RandAugment and erasing move or blend
    pixels without the boxes, so a detection recipe has none of them. Left out of
    `to_dict` when None, as the augmentations that are off.
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
    interpolation: str = "bilinear"
    randaugment: dict | None = None
    random_erase: float = 0.0
    detection: dict | None = None

    def __post_init__(self):
        check_number("--size", self.size, 1, MAX_VIEW_SIZE)
        if self.randaugment is not None:
            check_randaugment(self.randaugment)
        check_number("--random-erase", self.random_erase, 0, 1)
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        for option, values in (("--scale", self.scale), ("--ratio", self.ratio)):
            for value in values:
                check_number(option, value, 0, above=True)
        check_number("--flip-prob", self.flip_prob, 0, 1)
        check_number("--color-jitter", self.color_jitter, 0, 1, below=True)
        check_number("--views-per-sample", self.views_per_sample, 1, MAX_VIEWS_PER_SAMPLE)
        check_number("--epochs", self.epochs, 1, MAX_EPOCHS)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ConfigError(f"--scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"--ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.mixup is not None:
            mode, alpha = self.mixup.get("mode"), self.mixup.get("alpha")
            if set(self.mixup) != {"mode", "alpha"} or mode not in MIX_MODES:
                raise ConfigError(f"mixing must be one of {', '.join(MIX_MODES)}, got {self.mixup}")
            if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
                raise ConfigError(f"--mix-alpha must be 0 (lam uniform) or positive (Beta(alpha, alpha)), got {alpha}")
        if self.detection is not None:
            object.__setattr__(self, "detection", check_detection(self.detection))  # frozen: normalised once, here
            self._check_detection_augmentations()

    def _check_detection_augmentations(self) -> None:
        """Refuse, with detection views, an augmentation that would move or blend pixels
        without moving the boxes: the targets would no longer match the image."""
        for option, on in (("--mixup", self.mixup is not None), ("--randaugment", self.randaugment is not None),
                           ("--random-erase", self.random_erase > 0)):
            if on:
                raise ConfigError(f"detection views cannot use {option}: it changes pixels without their boxes; drop {option}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe's JSON form. Augmentations that are off are left out, as in the
        archives made before kdpipe had them; from_dict reads them back as off."""
        data = dataclasses.asdict(self)
        for name, off in (("randaugment", None), ("random_erase", 0.0), ("detection", None)):
            if data[name] == off:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewRecipe:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its input: normalisation (`mean`, `std` of [0, 1] pixels),
    and the evaluation transform it was made for (resize with `interpolation` to
    `input_size` / `crop_pct`, centre crop of `input_size` pixels a side). kdpipe applies
    the normalisation inside the model; `input_size` is the default view size of
    cache-teacher; the rest is recorded so the archive says what the teacher expects."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    input_size: int

    def __post_init__(self):
        for option, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ConfigError(f"preprocessing {option} needs 3 numbers (R, G, B), got {values!r}")
            for value in values:
                check_number(f"preprocessing {option}", value, 0, above=option == "std")
        check_number("preprocessing crop_pct", self.crop_pct, 0, above=True)
        check_number("preprocessing input_size", self.input_size, 1, MAX_VIEW_SIZE)
        if not isinstance(self.interpolation, str) or not self.interpolation:
            raise ConfigError(f"preprocessing interpolation must be a name (bilinear, bicubic, ...), got {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: `timm:NAME`, `torchvision:NAME`, `kdpipe:NAME` (built-in) or
    `module:factory`.

    `pretrained` names published weights to start from: a timm pretrained tag, a
    torchvision weights enum member, or "default". `weights` is a file holding a
    state_dict (or a checkpoint that holds one). Normalisation (applied to [0, 1]
    pixels) is part of the model: `mean` and `std` override the model's own
    (`models.preprocessing`); None keeps it. Older manifests and run configs hold
    explicit lists, which read back as overrides of the same values.
    """

    name: str
    num_classes: int | None = None
    weights: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pretrained: str | None = None

    def __post_init__(self):
        if self.pretrained is not None and self.weights is not None:
            raise ConfigError(f"model {self.name}: give pretrained weights (--pretrained {self.pretrained}) or a weights "
                              f"file ({self.weights}), not both")
        if self.pretrained is not None and not self.pretrained.strip():
            raise ConfigError(f"model {self.name}: --pretrained is empty; give a tag, or 'default'")

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
    features: tuple[str, ...] = ()  # feature outputs to cache too, each `MODULE[=CODEC]` (store.parse_output)

    def __post_init__(self):
        # the codec and format names are the store's to check: cache_teacher does, before any I/O
        if self.embedding_layer is not None and self.codec.startswith("topk:"):
            raise ConfigError(f"--codec {self.codec} keeps the largest logits; embeddings are stored with a dense codec")
        check_teacher_name(self.teacher_name)
        check_path("--data", self.data)
        check_path("--out", self.out)
        check_number("--batch-size", self.batch_size, 1)
        check_number("--workers", self.workers, 0, MAX_WORKERS)
        if self.positions_per_shard is not None:
            check_number("--shard-size", self.positions_per_shard, 1)


FEATURE_SYNTAX = "LOSS:TEACHER_MODULE[:STUDENT_MODULE][@WEIGHT][,KEY=VALUE...]"


@dataclass(frozen=True)
class FeatureSpec:
    """One feature-distillation term of train-student (--feature): the feature loss `loss`
    between the output of the teacher's module `teacher_module` and the student's
    `student_module` (module names as named_modules() gives them), times `weight`, with
    the loss's `options`. `name` is the term's name in metrics.jsonl."""

    loss: str
    teacher_module: str
    student_module: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        modules = self.teacher_module if self.student_module == self.teacher_module else \
            f"{self.teacher_module}:{self.student_module}"
        return f"{self.loss}:{modules}"

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        """A --feature value: e.g. `hint:layer3:features.6@0.5` or `rkd:fc@1,angle_weight=0`;
        the student's module is the teacher's when left out, the weight 1."""
        head, *pairs = text.split(",")
        modules, at, weight = head.partition("@")
        parts = modules.split(":")
        if not 2 <= len(parts) <= 3 or not all(part.strip() for part in parts) or (at and not weight):
            raise ConfigError(f"--feature {text!r} must be {FEATURE_SYNTAX}, e.g. hint:8:6@0.5")
        options = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            options[key.strip()] = _feature_number(text, value)
        spec = cls(parts[0], parts[1], parts[-1], _feature_number(text, weight) if at else 1.0, options)
        check_number(f"the weight of --feature {text}", spec.weight, 0, above=True)
        return spec


def _feature_number(text: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--feature {text!r}: {value!r} is not a number ({FEATURE_SYNTAX})") from None


MODES = ("cached", "online", "supervised")
DEFAULT_EPOCHS = 10  # of train-student without an archive or a schedule to take them from
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
    epochs: int | None = None  # None: the archive's epochs in cached mode, the schedule's sum, else DEFAULT_EPOCHS
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
    precise_bn: int = 1024  # training views BatchNorm statistics are recomputed on before scoring and saving; 0: off
    warmup_epochs: float = 0.0  # linear warmup of the learning rate over this many epochs, then cosine decay
    label_smoothing: float = 0.0  # of the cross-entropy term on labels
    ema: float = 0.0  # decay of the EMA of the student's weights (e.g. 0.999); 0: no EMA
    accumulate: int = 1  # batches whose gradients are summed into one optimizer step
    clip_norm: float = 1.0  # the gradient norm is clipped to this; 0: no clipping
    features: tuple[FeatureSpec, ...] = ()  # feature-distillation terms added to the loss (online or cached)
    neck_weight: float | None = None  # a detector student: weight of its neck term (MTPD); None: 1 (a classifier: none)

    def __post_init__(self):
        self._check_features()
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
            total = sum(e for _, e in self.schedule)
            if any(epochs < 1 for _, epochs in self.schedule) or self.epochs not in (None, total):
                raise ConfigError(f"--schedule must give each teacher at least 1 epoch and {self.epochs} (--epochs) in all")
        if self.loss == "seed" and (self.mode == "supervised" or self.alpha > 0):
            raise ConfigError("--loss seed distils a teacher's embeddings: use it with --cache or --teacher and --alpha 0")
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
        for option, path in (("--data", self.data), ("--out", self.out), ("--cache", self.cache), ("--val", self.val),
                             ("--local-cache", self.local_cache), ("--probe-data", self.probe_data)):
            check_path(option, path)
        if self.epochs is not None:
            check_number("--epochs", self.epochs, 1, MAX_EPOCHS)
        check_number("--batch-size", self.batch_size, 1)
        check_number("--workers", self.workers, 0, MAX_WORKERS)
        check_number("--lr", self.lr, 0, above=True)
        check_number("--weight-decay", self.weight_decay, 0)
        check_number("--momentum", self.momentum, 0, 1, below=True)
        check_number("--temperature", self.temperature)
        check_number("--alpha", self.alpha)
        if self.neck_weight is not None:
            check_number("--neck-weight", self.neck_weight, 0)
        check_number("--init-seed", self.seed, 0)
        check_number("--precise-bn", self.precise_bn, 0)
        check_number("--warmup-epochs", self.warmup_epochs, 0)
        check_number("--label-smoothing", self.label_smoothing, 0, 1, below=True)
        check_number("--ema", self.ema, 0, 1, below=True)
        check_number("--accumulate", self.accumulate, 1)
        check_number("--clip-norm", self.clip_norm, 0)
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} must be fewer than --epochs {self.epochs}")
        if self.student_size is not None:
            check_number("--student-size", self.student_size, 1, MAX_VIEW_SIZE)
        if self.teacher_batch_size is not None and (self.teacher_batch_size < 1 or self.mode != "online"):
            raise ConfigError("--teacher-batch-size must be at least 1 and is used only in online mode")
        if "://" in str(self.out):
            raise ConfigError(f"--out {self.out} must be a local folder: a run directory is written on this machine")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not (0 <= self.alpha <= 1):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    def _check_features(self) -> None:
        """--feature needs the teacher's feature outputs: a live teacher's, or an archive's
        (cache-teacher --outputs); two terms of one name would log as one."""
        if self.features and self.mode == "supervised":
            raise ConfigError("--feature distils a teacher's features: use it with --mode online and --teacher, "
                              "or --mode cached and an archive of them (cache-teacher --outputs)")
        names = [feature.name for feature in self.features]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"--feature {name} is given twice")

    def to_dict(self) -> dict[str, Any]:
        """The run's configuration, without storage options (they may hold credentials);
        the recipe as an archive's manifest records it (fields that are off left out)."""
        data = dataclasses.asdict(self)
        del data["storage_options"]
        return data | {"recipe": self.recipe.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        data = dict(data)
        data["student"] = ModelSpec.from_dict(data["student"])
        data["recipe"] = ViewRecipe.from_dict(data["recipe"])
        if data.get("teacher") is not None:
            data["teacher"] = ModelSpec.from_dict(data["teacher"])
        data["features"] = tuple(_from_dict(FeatureSpec, feature) for feature in data.get("features", ()))
        return _from_dict(cls, data)
