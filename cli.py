"""The kdpipe command line: each command parses its options, builds a spec and calls
one function in `pipeline`. User errors print one line on stderr and exit 2."""

from __future__ import annotations

import difflib
import errno
import functools
import json
import os
import signal
import sys
import threading
from typing import Annotated, Optional

import click
import typer

from pipeline.config import (
    DEFAULT_RANDAUGMENT_OPS, FEATURE_SYNTAX, RANDAUGMENT_OPS, CacheSpec, FeatureSpec, ModelSpec, TrainSpec,
    check_number, check_randaugment, parse_storage_options,
)
from pipeline.errors import NO_SPACE, ConfigError, KdpipeError, first_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Knowledge distillation for vision: cache a teacher's logits per augmented view, replay them into students.",
)


# Failures of the machine rather than of kdpipe: a full disk, a read-only place.
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# Signals that stop a run like Ctrl-C: a cluster scheduler's SIGTERM, a closed terminal's
# SIGHUP. The exit code is 128 + the signal's number, as a shell reports it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal, raised wherever the main thread is, so the run unwinds as from
    Ctrl-C: the writer lease is released and the DataLoader workers are shut down."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


def _environment_error(exc: BaseException) -> str | None:
    """One line of advice for a failure of the machine's resources, or None."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in NO_SPACE + NOT_WRITABLE:
        where = f" ({exc.filename})" if exc.filename else ""
        advice = "free some space" if exc.errno in NO_SPACE else "choose a writable location"
        return f"{exc.strerror}{where}; {advice}, then re-run"
    if any(sign in text for sign in ("shared memory", "/dev/shm", "</torch_", "torch_shm_manager")):
        return ("the DataLoader workers ran out of shared memory (/dev/shm is too small, as in a default container); "
                "pass --workers 0, or give the machine more shared memory (docker run --shm-size 8g)")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in text.lower()):
        return "out of memory; lower --batch-size (or --teacher-batch-size, --size), then re-run"
    return None


def _user_errors(command):
    """Turn a KdpipeError, or a failure of the machine's resources, into one line on
    stderr and exit code 2; a stop signal into one line and 128 + its number."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # (a command run in-process may not be)
            handlers = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS[1:]}
        try:
            return command(*args, **kwargs)
        except KdpipeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            what = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
            typer.echo(f"{what}; re-run the same command to continue (train-student: add --resume)", err=True)
            raise typer.Exit(128 + signum) from None
        except (OSError, RuntimeError, MemoryError) as exc:
            message = _environment_error(exc)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    return wrapper


def _read_config_file(path: str) -> dict:
    """The options in a TOML or YAML file (by its suffix) as a mapping."""
    try:
        with open(path, "rb") as file:
            if path.endswith(".toml"):
                import tomllib

                options = tomllib.load(file)
            elif path.endswith((".yaml", ".yml")):
                import yaml

                options = yaml.safe_load(file) or {}
            else:
                raise ConfigError(f"--config {path} must be a .toml, .yaml or .yml file")
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # tomllib's and yaml's parse errors are ValueErrors
        raise ConfigError(f"--config {path} is not valid {path.rsplit('.', 1)[-1].upper()}: {first_line(exc)}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--config {path} must map option names to values, e.g. lr = 0.001")
    return options


def _config_defaults(ctx: click.Context, path: str) -> dict:
    """The command's options read from a --config file, by parameter name: keys are the
    option names (`batch-size`, `--batch-size` or `batch_size`); a list is a repeatable
    option's values, or for another option joined with commas (`mean = [0.5, 0.5, 0.5]`)."""
    params = {opt[2:]: param for param in ctx.command.params for opt in param.opts if opt.startswith("--")}
    params.pop("config", None)
    defaults = {}
    for key, value in _read_config_file(path).items():
        flag = str(key).removeprefix("--").replace("_", "-")
        if flag not in params:
            nearest = difflib.get_close_matches(flag, list(params), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(nearest)}?" if nearest else f"; the options are {', '.join(sorted(params))}"
            raise ConfigError(f"--config {path}: {key!r} is not an option of kdpipe {ctx.info_name}{hint}")
        param = params[flag]
        if isinstance(value, list) and not param.multiple:
            value = ",".join(str(v) for v in value)
        defaults[param.name] = value
    return defaults


def _use_config(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
    """--config FILE: its options become the command's defaults, so options given on the
    command line override them (click reads the other options after this eager one)."""
    if path is not None:
        try:
            ctx.default_map = (ctx.default_map or {}) | _config_defaults(ctx, path)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            ctx.exit(2)
    return path


ConfigOpt = Annotated[Optional[str], typer.Option(is_eager=True, callback=_use_config, help="A TOML or YAML file of this command's options (keys are the option names, e.g. batch-size = 64); options given on the command line override it.")]


def _given_options(ctx: click.Context) -> dict:
    """The command's options as it ran (from the command line, --config or defaults),
    by option name, unset ones left out: a --config file that reproduces the run."""
    flags = {param.name: param.opts[0].removeprefix("--") for param in ctx.command.params}
    return {flags[name]: value for name, value in ctx.params.items()
            if value is not None and name not in ("config", "resume")}


def _floats(text: str | None, count: int, option: str) -> tuple[float, ...] | None:
    """Parse 'a,b[,c]' into a tuple of `count` floats."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{option} takes {count} comma-separated numbers, got {text!r}")
    return values


def _recipe_options(**options) -> dict:
    """The view-recipe options given on the command line, parsed; unset ones left out."""
    parsed = {
        "size": options["size"],
        "scale": _floats(options["scale"], 2, "--scale"),
        "ratio": _floats(options["ratio"], 2, "--ratio"),
        "flip_prob": options["flip_prob"],
        "color_jitter": options["color_jitter"],
        "interpolation": options["interpolation"],
        "views_per_sample": options["views_per_sample"],
        "seed": options["seed"],
        "mixup": None if options["mixup"] is None else {"mode": options["mixup"], "alpha": options["mix_alpha"] or 0.0},
        "randaugment": _randaugment(options["randaugment"], options["randaugment_ops"]),
        "random_erase": options["random_erase"],
    }
    if options["random_erase"] is not None:
        check_number("--random-erase", options["random_erase"], 0, 1)
    if options["mix_alpha"] is not None and options["mixup"] is None:
        raise ConfigError("--mix-alpha sets how views are mixed: add --mixup mixup or --mixup cutmix")
    return {k: v for k, v in parsed.items() if v is not None}


def _randaugment(text: str | None, ops: str | None) -> dict | None:
    """ViewRecipe.randaugment for --randaugment N,M and --randaugment-ops NAME,... (by
    default torchvision's ops), checked here so that a cached run refuses a bad value as
    such rather than as a mismatch with its archive."""
    if text is None:
        if ops is not None:
            raise ConfigError("--randaugment-ops chooses RandAugment's ops: add --randaugment N,M")
        return None
    num_ops, magnitude = _floats(text, 2, "--randaugment")
    if not num_ops.is_integer():
        raise ConfigError(f"--randaugment N,M needs a whole number of ops N, got {text!r}")
    names = [name.strip() for name in ops.split(",")] if ops is not None else list(DEFAULT_RANDAUGMENT_OPS)
    randaugment = {"num_ops": int(num_ops), "magnitude": magnitude, "ops": names}
    check_randaugment(randaugment)
    return randaugment


def _outputs(text: str, layer: str | None) -> tuple[str, str | None, tuple[str, ...]]:
    """--outputs and --embedding-layer as (the archive's main output, CacheSpec.embedding_layer,
    CacheSpec.features): `logits` (the default) or `embeddings` first, then any feature
    outputs `MODULE[=CODEC]`; embedding_layer is None for logits, "" for the penultimate features."""
    entries = [entry.strip() for entry in text.split(",")]
    mains = [entry for entry in entries if entry in ("logits", "embeddings")]
    if len(mains) > 1:
        raise ConfigError(f"--outputs {text!r} names {mains[0]} and {mains[1]}: an archive holds logits or embeddings")
    main = mains[0] if mains else "logits"
    features = tuple(entry for entry in entries if entry not in mains)
    if main == "logits":
        if layer is not None:
            raise ConfigError("--embedding-layer chooses what embeddings to cache: add --outputs embeddings")
        return main, None, features
    return main, layer or "", features


def _schedule(text: str | None) -> tuple[tuple[str, int], ...] | None:
    """--schedule NAME:EPOCHS,... as (name, epochs) pairs."""
    if text is None:
        return None
    try:
        return tuple((name, int(epochs)) for name, epochs in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise ConfigError(f"--schedule {text!r} must be NAME:EPOCHS,..., e.g. resnet152:10,resnet50:20") from None


def _loss_options(pairs: list[str] | None) -> dict[str, float]:
    """--loss-option KEY=VALUE pairs as numbers."""
    options = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--loss-option {pair!r} must be KEY=NUMBER, e.g. beta=8") from None
    return options


def _model_spec(name: str, num_classes: int | None, weights: str | None, mean: str | None, std: str | None,
                pretrained: str | None = None) -> ModelSpec:
    """The ModelSpec of a model's options; unset --mean/--std keep the model's own."""
    return ModelSpec(name=name, num_classes=num_classes, weights=weights, mean=_floats(mean, 3, "--mean"),
                     std=_floats(std, 3, "--std"), pretrained=pretrained)


def _teacher_spec(name: str | None, num_classes: int | None, weights: str | None, mean: str | None, std: str | None,
                  pretrained: str | None, outputs: str) -> ModelSpec | None:
    """train-student's --teacher and its options as a ModelSpec (None without --teacher,
    where the teacher's options are refused); a kdpipe run directory or student file is
    that student, teaching `outputs` (embeddings for --loss seed)."""
    if name is None:
        if weights or pretrained or mean or std:
            raise ConfigError("--weights, --teacher-pretrained, --teacher-mean and --teacher-std describe a teacher: "
                              "add --teacher MODEL")
        return None
    return _teacher_model(name, outputs, {"--weights": weights, "--teacher-pretrained": pretrained,
                                          "--teacher-mean": mean, "--teacher-std": std}) \
        or _model_spec(name, num_classes, weights, mean, std, pretrained)


DataOpt = Annotated[str, typer.Option(help="Image folder (one subfolder per class, or images alone when unlabelled); a label file labels.csv|labels.jsonl[?root=DIR&classes=FILE]; WebDataset shards 'train-{000..009}.tar'[?classes=FILE], local or remote; a Hugging Face dataset [hf:]PATH[?split=NAME] (save_to_disk folder or parquet); or synthetic:N:C[:SIZE].")]
SizeOpt = Annotated[Optional[int], typer.Option(help="Side of each rendered view in pixels. [default: the archive's in cached mode, else the input size of the teacher (online) or the student]")]
ScaleOpt = Annotated[Optional[str], typer.Option(help="Random-resized-crop area range MIN,MAX. [default: 0.08,1.0] On COCO data: the zoom range LO,HI of the box-aware views (1: the image's longer side fills the view). [default: 0.5,1.5]")]
RatioOpt = Annotated[Optional[str], typer.Option(help="Random-resized-crop aspect-ratio range MIN,MAX. [default: 0.75,1.333]")]
FlipOpt = Annotated[Optional[float], typer.Option(help="Horizontal flip probability. [default: 0.5]")]
InterpolationOpt = Annotated[Optional[str], typer.Option(help="How each crop is resized to the view size: bilinear, bicubic or nearest (antialiased). [default: the teacher's own (its pretrained config), in cached mode the archive's]")]
JitterOpt = Annotated[Optional[float], typer.Option(help="Colour jitter strength j: brightness, contrast, saturation in [1-j, 1+j]. [default: 0]")]
RandAugmentOpt = Annotated[Optional[str], typer.Option(metavar="N,M", help="RandAugment: N ops per view, drawn from --randaugment-ops, at magnitude M of 30 (torchvision's scale; timm's rand-m9-n2 is about 2,27). Recorded with each view, so the teacher sees what the student replays. [default: off]")]
RandAugmentOpsOpt = Annotated[Optional[str], typer.Option(metavar="NAMES", help=f"RandAugment's ops, comma-separated, from {', '.join(RANDAUGMENT_OPS)}. [default: all but Invert, as torchvision's]")]
EraseOpt = Annotated[Optional[float], typer.Option(metavar="P", help="Random erasing: with probability P, a box of each view (2% to 33% of it, as timm's) is replaced by uniform noise. Recorded with each view. [default: 0, off]")]
MixupOpt = Annotated[Optional[str], typer.Option(help="Mix each view with the same view of a seeded partner: mixup or cutmix (the teacher sees the mixed pixels). [default: no mixing]")]
MixAlphaOpt = Annotated[Optional[float], typer.Option(help="lam ~ Beta(A, A) for A > 0; 0 draws lam ~ U(0, 1), as in function matching. [default: 0]")]
ViewsOpt = Annotated[Optional[int], typer.Option(help="Views per sample and epoch. [default: 1]")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed of the view stream and epoch order. [default: 0]")]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader worker processes (0 = decode in the main process).")]
MeanOpt = Annotated[Optional[str], typer.Option(help="Input normalisation mean R,G,B. [default: the model's own]")]
StorageOpt = Annotated[Optional[list[str]], typer.Option(help="fsspec storage option KEY=VALUE for the archive's store (repeatable), e.g. endpoint_url=http://127.0.0.1:9000.")]
LocalCacheOpt = Annotated[Optional[str], typer.Option(help="Folder keeping verified copies of a remote archive's objects, so each is downloaded once.")]
StdOpt = Annotated[Optional[str], typer.Option(help="Input normalisation std R,G,B. [default: the model's own]")]
ModelHelp = "timm:NAME, torchvision:NAME, kdpipe:cnn|mlp|mlp-small, or package.module:factory."
RunTeacherHelp = (" Or a kdpipe run directory (its student.pt) or student file (student_best.pt, student_ema.pt): "
                  "that student teaches, with its weights, classes, normalisation and view size (born-again "
                  "generations, teacher-assistant chains).")
PretrainedHelp = ("Published weights to start from: a timm pretrained tag (a1_in1k) or a torchvision weights name "
                  "(IMAGENET1K_V2), or 'default'; read from the Hugging Face or torch hub cache, else downloaded.")


@app.command("cache-teacher")
@_user_errors
def cache_teacher_command(
    data: DataOpt,
    teacher: Annotated[str, typer.Option(help=ModelHelp + RunTeacherHelp)],
    out: Annotated[str, typer.Option(help="Archive to write: a local folder, or an s3:// or gs:// URL.")],
    weights: Annotated[Optional[str], typer.Option(help="Teacher weights: a state_dict, a checkpoint holding one, or a .safetensors file.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help=PretrainedHelp)] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Teacher classes. [default: the data's class count]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of views to cache. [default: 1; with --teacher-name, the archive's]")] = None,
    views_per_sample: ViewsOpt = None,
    mixup: MixupOpt = None,
    mix_alpha: MixAlphaOpt = None,
    seed: SeedOpt = None,
    size: Annotated[Optional[int], typer.Option(help="Side of each rendered view in pixels. [default: the teacher's input size; with --teacher-name, the archive's]")] = None,
    scale: ScaleOpt = None,
    ratio: RatioOpt = None,
    flip_prob: FlipOpt = None,
    color_jitter: JitterOpt = None,
    randaugment: RandAugmentOpt = None,
    randaugment_ops: RandAugmentOpsOpt = None,
    random_erase: EraseOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    codec: Annotated[str, typer.Option(help="How logits are stored: dense-fp16, dense-fp32 (lossless), dense-int8 (a scale and offset per view) or topk:K (K classes per view plus the tail mass).")] = "dense-fp16",
    format: Annotated[str, typer.Option("--format", help="Archive format: zarr (random access) or webdataset (tar shards for streaming).")] = "zarr",
    storage_option: StorageOpt = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Positions per shard. [default: about 16 MiB of logits]")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per teacher batch (each gives its views).")] = 256,
    workers: WorkersOpt = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing archive at --out.")] = False,
    teacher_name: Annotated[str, typer.Option(help="Name of this teacher. Another name than 'main' adds it to the finished archive at --out, on the same views.")] = "main",
    teacher_classes: Annotated[Optional[str], typer.Option(help="Class names of the teacher's outputs, comma-separated, when it knows a subset of the data's classes. [default: the data's class folders]")] = None,
    outputs: Annotated[str, typer.Option(help="What to cache, comma-separated: logits, or embeddings (a layer's L2-normalised output, for --loss seed), and any feature outputs MODULE[=CODEC] for train-student --feature: a module name (from model.named_modules(), or a timm model's feature_info index), its codec a chain of pool:HxW, pca:K and fp32, fp16 (the default) or int8, e.g. logits,layer3=pca:32+int8.")] = "logits",
    embedding_layer: Annotated[Optional[str], typer.Option(help="With --outputs embeddings: the module whose output is cached (a name from model.named_modules()). [default: the input of the last Linear layer]")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the teacher over a seeded stream of augmented views and store its logits per view.

    Re-running an interrupted command completes the archive; a finished archive is
    left alone unless --overwrite is given.
    """
    from pipeline import distributed
    from pipeline.cache import cache_recipe, cache_teacher
    from pipeline.detection import is_detection_data

    main_output, embedding_layer, features = _outputs(outputs, embedding_layer)
    if is_detection_data(data):
        main_output = "features"  # a detector teacher's neck
    teacher_spec = _teacher_model(teacher, main_output, {"--weights": weights, "--pretrained": pretrained,
                                                     "--num-classes": num_classes, "--mean": mean, "--std": std}) \
        or _model_spec(teacher, num_classes, weights, mean, std, pretrained)
    options = ({} if epochs is None else {"epochs": epochs}) | _recipe_options(
        size=size, scale=scale, ratio=ratio, flip_prob=flip_prob, color_jitter=color_jitter, interpolation=interpolation,
        views_per_sample=views_per_sample, seed=seed, mixup=mixup, mix_alpha=mix_alpha,
        randaugment=randaugment, randaugment_ops=randaugment_ops, random_erase=random_erase,
    )
    recipe = cache_recipe(teacher_spec, options, teacher_name, out, parse_storage_options(storage_option), data)
    spec = CacheSpec(
        data=data, teacher=teacher_spec, out=out, recipe=recipe,
        codec=codec, format=format, storage_options=parse_storage_options(storage_option), positions_per_shard=shard_size, batch_size=batch_size, workers=workers, overwrite=overwrite,
        teacher_name=teacher_name, teacher_classes=tuple(teacher_classes.split(",")) if teacher_classes else None,
        embedding_layer=embedding_layer, features=features,
    )
    with distributed.job() as ranks:
        result = cache_teacher(spec)
    if ranks.main:
        typer.echo(json.dumps(result))


@app.command("train-student")
@_user_errors
def train_student_command(
    data: DataOpt,
    student: Annotated[str, typer.Option(help=ModelHelp)],
    out: Annotated[str, typer.Option(help="Run directory to write.")],
    mode: Annotated[Optional[str], typer.Option(help="cached (logits from --cache), online (teacher runs live) or supervised (labels only). [default: cached with --cache, else online with --teacher, else supervised]")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Archive written by cache-teacher (cached mode): a local folder, or an s3://, gs:// or http(s):// URL.")] = None,
    storage_option: StorageOpt = None,
    local_cache: LocalCacheOpt = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model: runs live in online mode; in cached mode it is checked against the archive." + RunTeacherHelp)] = None,
    weights: Annotated[Optional[str], typer.Option(help="Teacher weights file.")] = None,
    teacher_pretrained: Annotated[Optional[str], typer.Option(help="The teacher's published weights: a timm pretrained tag, a torchvision weights name, or 'default'.")] = None,
    teacher_mean: Annotated[Optional[str], typer.Option(help="Teacher normalisation mean R,G,B. [default: the teacher's own]")] = None,
    teacher_std: Annotated[Optional[str], typer.Option(help="Teacher normalisation std R,G,B. [default: the teacher's own]")] = None,
    student_weights: Annotated[Optional[str], typer.Option(help="Initial student weights.")] = None,
    student_pretrained: Annotated[Optional[str], typer.Option(help="Initial student weights, published: a timm pretrained tag, a torchvision weights name, or 'default'.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes. [default: the teacher's, else the data's class count]")] = None,
    val: Annotated[Optional[str], typer.Option(help="Labelled images scored after each epoch (val_top1, val_top5) on the standard evaluation view (see eval).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs. [default: the archive's epochs in cached mode, the sum of --schedule, else 10]")] = None,
    cycle_epochs: Annotated[bool, typer.Option(help="Replay the archive's epochs in a cycle when --epochs exceeds them.")] = False,
    batch_size: Annotated[int, typer.Option(help="Samples per step (each gives its views).")] = 128,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (with momentum).")] = "adamw",
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay to 0).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 0.05,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    teachers: Annotated[Optional[str], typer.Option(help="Teachers of the archive to learn from, comma-separated: main (the one it was made with) and those added with cache-teacher --teacher-name. [default: main]")] = None,
    combine: Annotated[str, typer.Option(help="How several teachers are combined: mean (of their probabilities; teachers of different classes each teach theirs).")] = "mean",
    schedule: Annotated[Optional[str], typer.Option(help="Progressive distillation: one teacher at a time, NAME:EPOCHS,... summing to --epochs (see order-teachers).")] = None,
    loss: Annotated[str, typer.Option(help="Distillation loss: kd (Hinton), dkd (decoupled KD), dist (DIST), ls (logit standardisation + KD), mse (on logits), alpha (AlphaNet's adaptive alpha-divergence), or seed (SEED, on an archive of embeddings).")] = "kd",
    loss_option: Annotated[Optional[list[str]], typer.Option(help="A loss hyper-parameter KEY=VALUE (repeatable): dkd alpha, beta; dist beta, gamma; alpha alpha_min, alpha_max, clip; seed queue, teacher_temperature, student_temperature.")] = None,
    feature: Annotated[Optional[list[str]], typer.Option(metavar=FEATURE_SYNTAX, help="Online, or cached from an archive of the teacher's feature outputs (cache-teacher --outputs): add a feature-distillation term (repeatable): the feature loss hint (FitNets), at (attention transfer), sp (similarity-preserving) or rkd (relational) between the outputs of a module of the teacher and one of the student (named as named_modules() names them; the student's is the teacher's by default), times WEIGHT (default 1); loss options KEY=VALUE: at p; rkd distance_weight, angle_weight.")] = None,
    neck_weight: Annotated[Optional[float], typer.Option(help="A detector student (COCO --data): weight of the neck-feature term (MTPD: the mean squared error between each level of the teacher's neck and the student's, through a 1 x 1 adapter, summed over levels) beside its own detection loss. [default: 1]")] = None,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 1.0,
    alpha: Annotated[float, typer.Option(help="Weight of cross-entropy on labels (0 = pure function matching).")] = 0.0,
    init_seed: Annotated[int, typer.Option(help="Seed of the student's initialisation.")] = 0,
    views_per_sample: ViewsOpt = None,
    mixup: MixupOpt = None,
    mix_alpha: MixAlphaOpt = None,
    seed: SeedOpt = None,
    size: SizeOpt = None,
    scale: ScaleOpt = None,
    ratio: RatioOpt = None,
    flip_prob: FlipOpt = None,
    color_jitter: JitterOpt = None,
    randaugment: RandAugmentOpt = None,
    randaugment_ops: RandAugmentOpsOpt = None,
    random_erase: EraseOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    workers: WorkersOpt = 2,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the student with torch.compile (pays a start-up cost once).")] = False,
    teacher_batch_size: Annotated[Optional[int], typer.Option(help="Views per teacher forward pass in online mode. [default: the whole step; on the CPU, about 8 views of 224 px]")] = None,
    probe_data: Annotated[Optional[str], typer.Option(help="--loss seed: labelled images the linear probe (the val_top1 of an embedding student) is fitted on. [default: --data]")] = None,
    student_size: Annotated[Optional[int], typer.Option(help="Side of the student's views in pixels, rendered from the same view parameters as the teacher's. [default: --size, or the archive's]")] = None,
    precise_bn: Annotated[int, typer.Option(metavar="VIEWS", help="Before each evaluation and checkpoint, recompute the student's BatchNorm statistics on this many of the epoch's training views (precise BN); 0: off, keeping the running averages of training.")] = 1024,
    warmup_epochs: Annotated[float, typer.Option(help="Epochs of linear learning-rate warmup before the cosine decay (fractions allowed).")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy term on labels (with --alpha above 0, or supervised).")] = 0.0,
    ema: Annotated[float, typer.Option(metavar="DECAY", help="Keep an exponential moving average of the student's weights with this decay (e.g. 0.999), scored on --val each epoch (val_top1_ema) and saved as student_ema.pt; 0: none.")] = 0.0,
    accumulate: Annotated[int, typer.Option(metavar="BATCHES", help="Sum the gradients of this many batches into one optimizer step: a global batch of --batch-size x BATCHES samples that need not fit in memory at once.")] = 1,
    clip_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this before each optimizer step; 0: no clipping.")] = 1.0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last epoch.")] = False,
    config: ConfigOpt = None,
    ctx: typer.Context = None,
) -> None:
    """Train a student on the views of a teacher archive (cached), with a live teacher
    (online), or on labels alone (supervised).

    In cached mode the view recipe is the archive's; view options given here must agree
    with it.
    """
    from pipeline import distributed
    from pipeline.detection import is_detection_data, train_detector
    from pipeline.train import train_student

    spec, recipe_options = _train_spec(ctx.params)
    train = train_detector if is_detection_data(spec.data) else train_student
    with distributed.job() as ranks:
        summary = train(spec, recipe_options, resume=resume, options=_given_options(ctx))
    if ranks.main:
        typer.echo(json.dumps(summary))


def _taught(p: dict) -> str:
    """What train-student's teacher teaches: a detector's neck features (detection data),
    embeddings (--loss seed) or logits."""
    from pipeline.detection import is_detection_data

    return "features" if is_detection_data(p["data"]) else "embeddings" if p["loss"] == "seed" else "logits"


def _train_spec(p: dict) -> tuple[TrainSpec, dict]:
    """train-student's TrainSpec and view-recipe options from its options `p` (by name)."""
    mode = p["mode"] if p["mode"] is not None else "cached" if p["cache"] else "online" if p["teacher"] else "supervised"
    teacher = _teacher_spec(p["teacher"], p["num_classes"], p["weights"], p["teacher_mean"], p["teacher_std"],
                            p["teacher_pretrained"], _taught(p))
    student = _model_spec(p["student"], p["num_classes"], p["student_weights"], p["mean"], p["std"],
                          p["student_pretrained"])
    same = ("data", "out", "cache", "local_cache", "val", "epochs", "cycle_epochs", "batch_size", "optimizer", "lr",
            "weight_decay", "momentum", "temperature", "alpha", "workers", "compile", "teacher_batch_size",
            "student_size", "loss", "combine", "probe_data", "precise_bn", "warmup_epochs", "label_smoothing", "ema",
            "accumulate", "clip_norm", "neck_weight")
    spec = TrainSpec(
        **{name: p[name] for name in same}, student=student, mode=mode, teacher=teacher, seed=p["init_seed"],
        storage_options=parse_storage_options(p["storage_option"]), loss_options=_loss_options(p["loss_option"]),
        teachers=tuple(p["teachers"].split(",")) if p["teachers"] else None, schedule=_schedule(p["schedule"]),
        features=tuple(FeatureSpec.parse(text) for text in p["feature"] or ()),
    )
    recipe = ("size", "scale", "ratio", "flip_prob", "color_jitter", "interpolation", "views_per_sample", "seed",
              "mixup", "mix_alpha", "randaugment", "randaugment_ops", "random_erase")
    return spec, _recipe_options(**{name: p[name] for name in recipe})


@app.command("inspect")
@_user_errors
def inspect_command(
    archive: Annotated[str, typer.Argument(help="Archive: a local folder, or an s3://, gs:// or http(s):// URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    stats: Annotated[bool, typer.Option(help="Read every view for agreement and entropy statistics.")] = True,
    storage_option: StorageOpt = None,
    local_cache: LocalCacheOpt = None,
) -> None:
    """Describe an archive: recipe, teacher and dataset fingerprints, shapes, codec,
    completeness, bytes per view, and the teacher's agreement with the labels (a mixed
    view's label is its dominant component's) and entropy."""
    from pipeline.audit import inspect_archive

    report = inspect_archive(archive, parse_storage_options(storage_option), local_cache, stats=stats)
    typer.echo(json.dumps(report, indent=1) if as_json else _format_report(report))


@app.command("verify")
@_user_errors
def verify_command(
    archive: Annotated[str, typer.Argument(help="Archive: a local folder, or an s3://, gs:// or http(s):// URL.")],
    teacher: Annotated[Optional[str], typer.Option(help="Another teacher to recompute views with. [default: the archive's, as its manifest records it]")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Teacher weights file. [default: the file the manifest records, e.g. when it has moved]")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="The teacher's published weights (with --teacher), as given to cache-teacher --pretrained.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Teacher classes (with --teacher). [default: the data's class count]")] = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    data: Annotated[Optional[str], typer.Option(help="The data to recompute views from. [default: where the manifest says the archive was cached from]")] = None,
    recompute: Annotated[int, typer.Option(help="Recompute this many random samples (all their views) with the teacher.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed choosing the samples to recompute.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Check every object of an archive against its sha256 and, with --recompute N,
    compare N freshly computed samples with the stored logits (the teacher and the data
    are those the manifest records, unless given).

    Exit code 0 when the archive is sound, 1 when something failed (each listed).
    """
    from pipeline.audit import verify_archive

    if recompute < 0:
        raise ConfigError("--recompute must be a non-negative number of samples")
    if teacher is None and (num_classes or mean or std or pretrained):
        raise ConfigError("--num-classes, --pretrained, --mean and --std describe another teacher: add --teacher MODEL")
    spec = _model_spec(teacher, num_classes, weights, mean, std, pretrained) if teacher else None
    report = verify_archive(archive, parse_storage_options(storage_option), spec, data, recompute, seed, weights)
    typer.echo(json.dumps(report, indent=1) if as_json else _format_report(report))
    if report["problems"]:
        raise typer.Exit(1)


@app.command("eval")
@_user_errors
def eval_command(
    model: Annotated[str, typer.Option(help=f"{ModelHelp} Or a kdpipe student: a run directory (its student.pt) or a student file (student_best.pt, student_ema.pt), which brings its weights, classes and evaluation view.")],
    data: DataOpt,
    weights: Annotated[Optional[str], typer.Option(help="Model weights: a student.pt, a state_dict, a checkpoint holding one, or a .safetensors file.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help=PretrainedHelp)] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Model classes; must be the data's class count. [default: the data's class count]")] = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    teacher: Annotated[Optional[str], typer.Option(help="A teacher to compare with: its own accuracy, the model's top-1 agreement with it and the mean KL(teacher || model); a model, or a kdpipe run directory or student file, seen through its own evaluation view. [default: none]")] = None,
    teacher_weights: Annotated[Optional[str], typer.Option(help="Teacher weights file.")] = None,
    teacher_pretrained: Annotated[Optional[str], typer.Option(help="The teacher's published weights: a timm pretrained tag, a torchvision weights name, or 'default'.")] = None,
    teacher_size: Annotated[Optional[int], typer.Option(help="Side of the teacher's evaluation view in pixels (its crop_pct and interpolation are its own). [default: the teacher's input size]")] = None,
    size: Annotated[Optional[int], typer.Option(help="Side of the model's evaluation view in pixels. [default: the model's input size]")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="The centre crop's share of the resized shorter side (which is size / crop_pct). [default: the model's own, e.g. 0.875]")] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="How images are resized: bilinear, bicubic or nearest (antialiased). [default: the model's own]")] = None,
    eval_resize: Annotated[str, typer.Option(help="crop: shorter side to size / crop_pct, then the centre (timm's and torchvision's protocol); squash: the whole image to size x size.")] = "crop",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: WorkersOpt = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of text.")] = False,
    out: Annotated[Optional[str], typer.Option(help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Evaluate a model (a teacher, or a kdpipe student: --model RUN_DIR) on labelled
    images with the standard evaluation view: top-1, top-5 and per-class accuracy, and
    with --teacher the agreement with it and KL(teacher || model). A detector on COCO
    data (--data coco:ANNOTATIONS.json): COCO mAP, AP50 and AP75 on the whole images."""
    from pipeline.detection import evaluate_detector, format_detection_eval, is_detection_data
    from pipeline.evaluation import EvalSpec, evaluate_model, format_eval

    if teacher is None and (teacher_weights or teacher_pretrained or teacher_size):
        raise ConfigError("--teacher-weights, --teacher-pretrained and --teacher-size describe a teacher: add --teacher MODEL")
    teacher_spec = None if teacher is None else (
        _student_path("--teacher", teacher, {"--teacher-weights": teacher_weights,
                                             "--teacher-pretrained": teacher_pretrained})
        or _model_spec(teacher, num_classes, teacher_weights, None, None, teacher_pretrained))
    spec = EvalSpec(
        model=_student_path("--model", model, {"--weights": weights, "--pretrained": pretrained,
                                              "--num-classes": num_classes, "--mean": mean, "--std": std})
        or _model_spec(model, num_classes, weights, mean, std, pretrained), data=data, teacher=teacher_spec,
        size=size, crop_pct=crop_pct, interpolation=interpolation, resize=eval_resize, teacher_size=teacher_size,
        batch_size=batch_size, workers=workers,
    )
    if is_detection_data(data):
        if teacher is not None or crop_pct is not None or eval_resize != "crop":
            raise ConfigError("--teacher, --crop-pct and --eval-resize are for classifiers; a detector is scored on "
                              "whole images (evaluate each detector on its own)")
        report = evaluate_detector(spec.model, data, size, batch_size, interpolation)
    else:
        report = evaluate_model(spec)
    if out:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
    typer.echo(json.dumps(report, indent=1) if as_json else
               (format_detection_eval if is_detection_data(data) else format_eval)(report))


def _student_path(option: str, name: str, model_options: dict[str, object]) -> str | None:
    """`name`, given to `option`, when it is a kdpipe student (a run directory or a
    student file), else None (a model name): a student is a path that exists, or a name
    without the SOURCE: every model name has. A student brings its own weights, classes
    and normalisation, so the options that give those (`model_options`, by flag) are
    refused with it."""
    if ":" in name and not os.path.exists(name):
        return None
    given = [flag for flag, value in model_options.items() if value]
    if given:
        raise ConfigError(f"{option} {name} is a kdpipe student, which brings its own weights, classes and "
                          f"normalisation: drop {' and '.join(given)}")
    return name


def _teacher_model(name: str, outputs: str, model_options: dict[str, object]) -> ModelSpec | None:
    """--teacher RUN_DIR (see `_student_path`): that run's student as a teacher of
    `outputs` (deploy.student_teacher); None for a model name."""
    path = _student_path("--teacher", name, model_options)
    if path is None:
        return None
    from pipeline.deploy import student_teacher

    return student_teacher(path, outputs)


StudentArg = Annotated[str, typer.Argument(help="A kdpipe student: a run directory (its student.pt) or a student file (student.pt, student_best.pt, student_ema.pt).")]


@app.command("export")
@_user_errors
def export_command(
    student: StudentArg,
    out: Annotated[str, typer.Option(help="The file to write.")],
    export_format: Annotated[str, typer.Option("--format", help="torchscript (torch.jit.load) or onnx (needs pip install 'kdpipe[onnx]').")] = "torchscript",
    size: Annotated[Optional[int], typer.Option(help="Side of the input images in pixels the model is exported for. [default: the student's view size]")] = None,
) -> None:
    """Export a student for deployment: a TorchScript or ONNX model of float32 RGB pixels
    in [0, 1], (N, 3, size, size) for any N, to its logits (N, C), normalisation inside.
    The file describes itself: kdpipe.json (TorchScript extra file, ONNX metadata) holds
    its class names and preprocessing (the view size, crop_pct and interpolation)."""
    from pipeline.deploy import export_student

    typer.echo(json.dumps(export_student(student, export_format, out, size)))


@app.command("predict")
@_user_errors
def predict_command(
    student: StudentArg,
    data: Annotated[str, typer.Option(help="The images: every image below a folder (any layout; labels unused), or any --data of train-student.")],
    top: Annotated[int, typer.Option(help="Classes to give per image, most probable first.")] = 5,
    out: Annotated[Optional[str], typer.Option(help="Write the predictions to this .jsonl or .csv file (path, class_1, probability_1, ...). [default: JSON Lines on stdout]")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: WorkersOpt = 2,
) -> None:
    """Run a student on every image of a folder, seen through its evaluation view, and
    give per image its path, its top classes and their softmax probabilities: JSON Lines
    on stdout, or with --out a file, and then a one-line JSON report on stdout."""
    from pipeline.deploy import predict_images

    report = predict_images(student, data, out, top, batch_size, workers)
    if out is not None:  # else stdout holds the predictions
        typer.echo(json.dumps(report))


def _format_report(report: dict, indent: str = "") -> str:
    """A nested report as indented `key: value` lines."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(_format_report(value, indent + "  "))
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            lines.append(f"{indent}{key}: {'none' if not value else ''}".rstrip())
            lines.extend(f"{indent}  - {item}" for item in value)
        elif isinstance(value, float):
            lines.append(f"{indent}{key}: {value:,.4g}")
        else:
            lines.append(f"{indent}{key}: {value if isinstance(value, str) else json.dumps(value)}")
    return "\n".join(lines)


@app.command("report")
@_user_errors
def report_command(
    run_dirs: Annotated[list[str], typer.Argument(help="train-student run directories (--out folders), finished or still training.")],
    out: Annotated[str, typer.Option(help="Folder for report.png and report.md (those two files are replaced).")] = "kdpipe-report",
) -> None:
    """Plot train-student runs side by side: loss, val top-1 (and the EMA student's),
    val top-5, agreement with the teacher and KL per epoch, a line per run, into
    report.png; their final figures as a markdown table into report.md (also printed)."""
    from pipeline.progress import say
    from pipeline.report import write_report

    report = write_report(run_dirs, out)
    typer.echo(report["markdown"])
    say(f"wrote {report['plot']} and {report['table']}")


@app.command("quickstart")
@_user_errors
def quickstart_command(
    out: Annotated[str, typer.Option(help="Folder for the data, archive, runs and summary.json.")] = "kdpipe-quickstart",
    seeds: Annotated[int, typer.Option(help="Student seeds per mode; figures are means over them.")] = 1,
    task: Annotated[str, typer.Option(help="classification (digits) or detection (digits pasted on photographs, COCO format).")] = "classification",
) -> None:
    """Distil on scikit-learn's bundled digits: train a teacher, cache it, and train the
    same student supervised, online and cached, with labels for only a few images. With
    --task detection: digits pasted on scikit-learn's sample photographs, a detector
    student trained alone and distilled MTPD-style from one cached teacher (and online)
    and progressively from two; COCO mAP of each."""
    from pipeline.quickstart import run_detection_quickstart, run_quickstart

    if task not in ("classification", "detection"):
        raise ConfigError(f"--task must be classification or detection, got {task!r}")
    (run_detection_quickstart if task == "detection" else run_quickstart)(out, seeds=seeds)


@app.command("order-teachers")
@_user_errors
def order_teachers_command(
    data: DataOpt,
    cache: Annotated[str, typer.Option(help="Archive holding the candidate teachers (main and those added by name).")],
    student: Annotated[str, typer.Option(help="The student model the order is for.")],
    student_weights: Annotated[Optional[str], typer.Option(help="Student weights. [default: its seeded initialisation]")] = None,
    student_pretrained: Annotated[Optional[str], typer.Option(help="The student's published weights: a timm pretrained tag, a torchvision weights name, or 'default'.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Student classes. [default: the data's class count]")] = None,
    teachers: Annotated[Optional[str], typer.Option(help="Candidate teachers, comma-separated. [default: all in the archive]")] = None,
    target: Annotated[str, typer.Option(help="The teacher the sequence ends with (the accurate, complex one).")] = "main",
    samples: Annotated[int, typer.Option(help="Samples of epoch 0 whose views the maps are fitted (3/4) and scored (1/4) on.")] = 512,
    epochs: Annotated[Optional[int], typer.Option(help="Also print a --schedule sharing these training epochs evenly.")] = None,
    storage_option: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Order teachers for progressive distillation (after MTPD's Backward Greedy Selection):
    a chain built backward from --target, each step the cheapest adaptation, where the
    cost is the held-out error of a linear map between two models' outputs."""
    from pipeline.order import format_order, order_teachers

    report = order_teachers(
        data, cache, _model_spec(student, num_classes, student_weights, None, None, student_pretrained),
        tuple(teachers.split(",")) if teachers else None, samples, parse_storage_options(storage_option), epochs, target,
    )
    typer.echo(json.dumps(report, indent=1) if as_json else format_order(report))


@app.command("bench")
@_user_errors
def bench_command(
    teacher: Annotated[str, typer.Option(help="Teacher model (random weights: speed does not depend on them).")] = "torchvision:resnet50",
    student: Annotated[str, typer.Option(help="Student model.")] = "torchvision:mobilenet_v3_small",
    samples: Annotated[int, typer.Option(help="JPEG images to write and train on.")] = 256,
    classes: Annotated[int, typer.Option(help="Classes of the images.")] = 10,
    image_size: Annotated[int, typer.Option(help="Side of each JPEG image in pixels.")] = 320,
    size: Annotated[int, typer.Option(help="Side of each rendered view in pixels.")] = 224,
    views_per_sample: Annotated[int, typer.Option(help="Views rendered per decode (V).")] = 4,
    epochs: Annotated[int, typer.Option(help="Epochs of each training case.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Samples per step (each gives V views).")] = 32,
    teacher_batch_size: Annotated[Optional[int], typer.Option(help="Views per teacher forward pass. [default: the whole batch; on the CPU, about 8 views of 224 px]")] = None,
    workers: WorkersOpt = 2,
    repeats: Annotated[int, typer.Option(help="Measure every case this many times; report the best.")] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the student with torch.compile.")] = False,
    workdir: Annotated[Optional[str], typer.Option(help="Folder for the images, archives and runs (kept). [default: a temporary folder, removed]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Measure, side by side on this machine, supervised, cached-KD and online-KD training,
    the teacher alone, cache-teacher and logit reads; print the speeds and their ratios."""
    import tempfile

    from pipeline.bench import BenchSpec, format_bench, run_bench

    if min(samples, classes, image_size, size, views_per_sample, epochs, batch_size, repeats) < 1:
        raise ConfigError("bench sizes and counts must be at least 1")
    if workdir and os.path.isdir(workdir) and os.listdir(workdir):
        raise ConfigError(f"--workdir {workdir} is not empty: give bench a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as scratch:
        spec = BenchSpec(
            teacher=_model_spec(teacher, classes, None, None, None), student=_model_spec(student, classes, None, None, None),
            workdir=workdir or scratch, num_samples=samples, num_classes=classes, image_size=image_size, size=size,
            views_per_sample=views_per_sample, epochs=epochs, batch_size=batch_size,
            teacher_batch_size=teacher_batch_size, workers=workers, repeats=repeats, compile=compile,
        )
        report = run_bench(spec)
    typer.echo(json.dumps(report, indent=1) if as_json else format_bench(report))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
