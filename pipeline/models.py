"""Model loading: timm and torchvision models by name (with their published weights),
built-in demo nets, user factories, weights from files, each model's preprocessing,
and the teacher's fingerprint.

Every model is wrapped in `Normalized`, so normalisation is part of the model and the
views stay plain [0, 1] pixels. Checkpoints hold the inner network's state_dict, so a
student trained here loads into a plain timm or torchvision model.
"""

from __future__ import annotations

import contextvars
import copy
import difflib
import hashlib
import importlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import distributed
from .config import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ModelSpec, Preprocessing, canonical_json
from .errors import ModelError, first_line
from .progress import say

if TYPE_CHECKING:
    from .store import TeacherInfo

# On the CPU the teacher runs on chunks of about this many pixels (8 views of 224 px).
# A bigger batch makes activation tensors above glibc's mmap threshold (32 MB), which
# are mapped fresh, page-faulted and unmapped on every pass: a ResNet-50 on 2 cores
# ran 13 views/s in batches of 64 views of 224 px and 23 views/s in chunks of 8. With
# freed memory kept (host.keep_freed_memory) chunks still fit the caches better: 23.4
# views/s in batches of 64, 26.2 in chunks of 16, 26.4 in chunks of 8.
CPU_CHUNK_PIXELS = 8 * 224 * 224


def accelerated(device: torch.device) -> bool:
    """Whether models on `device` run the GPU path: bf16 autocast and channels-last
    memory (faster on tensor cores). On the CPU they run in float32, the default layout.
    One predicate for the teacher and the student, so a test can run the GPU path's
    code on the CPU."""
    return device.type == "cuda"


# Keys under which checkpoints commonly keep their state_dict: kdpipe's own "model"
# first, then timm's training checkpoints (their EMA weights first, as timm loads them).
_STATE_DICT_KEYS = ("model", "state_dict_ema", "model_ema", "state_dict", "model_state_dict", "student", "net")

# The preprocessing of models that record none. kdpipe's built-ins and plain factories:
# ImageNet normalisation and the 32-pixel views kdpipe used before models had their own.
# torchvision's classification models without weights: its ImageNet evaluation recipe
# (resize to 256, centre crop of 224).
KDPIPE_PREPROCESSING = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1.0, 32)
IMAGENET_PREPROCESSING = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875, 224)


class Normalized(nn.Module):
    """Applies (x - mean) / std before the wrapped network; `preprocessing` is where
    mean and std come from (kept to be recorded with the model)."""

    def __init__(self, net: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.net, self.preprocessing = net, preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _conv_block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(num_classes: int, width: int = 32) -> nn.Module:
    """A five-layer CNN for small images (any input size); the quickstart's teacher."""
    return nn.Sequential(
        *_conv_block(3, width), *_conv_block(width, width), nn.MaxPool2d(2),
        *_conv_block(width, 2 * width), *_conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
        *_conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def small_mlp(num_classes: int, hidden: int = 128) -> nn.Module:
    """A one-hidden-layer MLP on an 8x8 pooled image; the quickstart's student."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def narrow_mlp(num_classes: int) -> nn.Module:
    """`small_mlp` with 16 hidden units: a student with a wide gap to the cnn, for
    teacher-assistant chains (kdpipe:cnn -> kdpipe:mlp -> kdpipe:mlp-small)."""
    return small_mlp(num_classes, hidden=16)


BUILTIN_MODELS = {"cnn": small_cnn, "mlp": small_mlp, "mlp-small": narrow_mlp}


def _split_name(name: str) -> tuple[str, str]:
    """(source, rest) of a model name such as `timm:resnet50`."""
    prefix, _, rest = name.partition(":")
    if not rest:
        raise ModelError(
            f"bad model name {name!r}; use timm:NAME, torchvision:NAME, kdpipe:NAME ({', '.join(BUILTIN_MODELS)}) "
            "or package.module:factory"
        )
    return prefix, rest


def _timm_name(spec: ModelSpec) -> str:
    """The timm model to create: `architecture.tag` when a tag is given (in the name, or
    by `pretrained`), else the architecture (timm then takes its default tag). Refuses
    an unknown architecture or tag, listing some valid ones."""
    import timm

    architecture, _, tag = _split_name(spec.name)[1].partition(".")
    if not timm.is_model(architecture):
        similar = timm.list_models(f"*{architecture}*")[:6]
        hint = f"similar: {', '.join(similar)}" if similar else "see timm.list_models()"
        raise ModelError(f"unknown timm model {architecture!r}; {hint}")
    if spec.pretrained is not None and spec.pretrained.lower() != "default":
        if tag and tag != spec.pretrained:
            raise ModelError(f"{spec.name} names the pretrained tag {tag!r} and --pretrained {spec.pretrained!r}; "
                             "give the tag once")
        tag = spec.pretrained
    tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{architecture}.*")]
    if tag and tag not in tags or spec.pretrained is not None and not tags:
        valid = f"its tags: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}" if tags else "it has none"
        raise ModelError(f"timm model {architecture} has no pretrained weights {tag or 'default'!r} ({valid}); "
                         f"see timm.list_pretrained('{architecture}.*')")
    return f"{architecture}.{tag}" if tag else architecture


def _create_timm(spec: ModelSpec, num_classes: int) -> nn.Module:
    """timm.create_model with the published weights when `pretrained` is given, loaded
    from the Hugging Face cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE honoured) or
    downloaded into it. timm drops a classifier head of another class count itself."""
    import timm

    name = _timm_name(spec)
    if spec.pretrained is not None:
        _check_hub_reachable(name)
    try:
        net = timm.create_model(name, pretrained=spec.pretrained is not None, num_classes=num_classes)
    except OSError as exc:  # not in the cache and not downloadable (a full disk has an errno: not ours)
        if exc.errno is not None:
            raise
        raise ModelError(_missing_timm_weights(name, exc)) from None
    except Exception as exc:  # noqa: BLE001 - a damaged cached file raises what its reader raises
        raise ModelError(f"cannot read the weights of timm:{name} from the Hugging Face cache ({_first_line(exc)}); "
                         "delete the damaged file from the cache so that it is fetched again") from None
    cfg = net.pretrained_cfg
    if spec.pretrained is not None and cfg.get("num_classes") not in (None, num_classes):
        classifiers = cfg.get("classifier") or ()
        own = net.state_dict()
        keys = [key for head in ([classifiers] if isinstance(classifiers, str) else classifiers)
                for key in (f"{head}.weight", f"{head}.bias") if key in own]
        _say_reinitialised(spec.name, keys, cfg["num_classes"], num_classes)
    return net


def _check_hub_reachable(name: str) -> None:
    """Refuse at once, in one line, timm weights that are not in the Hugging Face cache
    when the hub cannot be reached: huggingface_hub would retry for about a minute,
    warning on every try, before failing."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if constants.HF_HUB_OFFLINE or not cfg.hf_hub_id:
        return  # offline: huggingface_hub fails at once; a plain URL: torch's download says why
    file = cfg.hf_hub_filename or "model.safetensors"
    if isinstance(try_to_load_from_cache(cfg.hf_hub_id, file), str):
        return
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=10).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except (urllib.error.URLError, OSError) as exc:
        raise ModelError(_missing_timm_weights(name, exc)) from None


def _missing_timm_weights(name: str, exc: OSError) -> str:
    """One line: the hub repository and file timm looked for, and where to put them."""
    import timm
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(name)
    repo, file = cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"
    if not repo:
        return f"cannot download the weights of timm:{name} from {cfg.url} ({_first_line(exc)}); check the network"
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _first_line(exc)
    return (f"the weights of timm:{name} are not in the Hugging Face cache {constants.HF_HUB_CACHE} and cannot be "
            f"downloaded ({why}): fetch {file} of the hub repository {repo} into that cache "
            f"(hf download {repo} {file}, with HF_HUB_CACHE or HF_HOME pointing there), or go online")


def _torchvision_weights(spec: ModelSpec):
    """The torchvision weights enum member `pretrained` names (None without it); refuses
    an unknown model or member, listing the members."""
    import torchvision

    _, name = _split_name(spec.name)
    if name not in torchvision.models.list_models(module=torchvision.models):
        if name in torchvision.models.list_models(module=torchvision.models.detection):
            raise ModelError(f"{spec.name} is a detector; detectors learn from COCO detection data "
                             "(--data coco:ANNOTATIONS.json), so give a classifier here")
        raise ModelError(f"unknown torchvision classification model {name!r}; see torchvision.models.list_models()")
    return _weights_member(name, spec.pretrained)


def _weights_member(name: str, pretrained: str | None):
    """The member `pretrained` names ("default" for DEFAULT) of the weights enum of the
    torchvision model `name` (None without it); refuses an unknown one, listing them."""
    import torchvision

    if pretrained is None:
        return None
    members = torchvision.models.get_model_weights(name).__members__
    member = "DEFAULT" if pretrained.lower() == "default" else pretrained
    if member not in members:
        raise ModelError(f"torchvision {name} has no weights {pretrained!r}; choose one of {', '.join(members)}")
    return members[member]


def _create_torchvision(spec: ModelSpec, num_classes: int) -> nn.Module:
    """A torchvision model, with its published weights when `pretrained` is given: built
    by torchvision itself (a pretrained model may need other arguments, as inception_v3's
    transform_input), the file read from or downloaded to $TORCH_HOME/hub/checkpoints.
    A head of another class count than `num_classes` is replaced by a fresh one."""
    import torchvision

    _, name = _split_name(spec.name)
    weights = _torchvision_weights(spec)
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    net = _pretrained_torchvision(name, weights)
    classes = len(weights.meta["categories"])
    if classes != num_classes:
        _replace_head(spec.name, net, classes, num_classes)
    return net


def _pretrained_torchvision(name: str, weights) -> nn.Module:
    """torchvision's model `name` built by torchvision with `weights`, their file read from
    $TORCH_HOME/hub/checkpoints, or downloaded there first."""
    import torchvision

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    file = os.path.basename(urllib.parse.urlparse(weights.url).path)
    if not os.path.isfile(os.path.join(folder, file)):  # downloaded here, where torchvision looks, without its chatter
        os.makedirs(folder, exist_ok=True)
        digest = torch.hub.HASH_REGEX.search(file)
        try:
            torch.hub.download_url_to_file(weights.url, os.path.join(folder, file), digest and digest.group(1),
                                           progress=sys.stderr.isatty())
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ModelError(f"the weights {weights} are not in {folder} and cannot be downloaded "
                             f"({_first_line(exc)}): put {file} (from {weights.url}) into {folder} "
                             "($TORCH_HOME/hub/checkpoints)") from None
    try:
        net = torchvision.models.get_model(name, weights=weights, progress=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises what torch.load raises
        raise ModelError(f"cannot read the weights {weights} from {os.path.join(folder, file)} ({_first_line(exc)}); "
                         "delete that file so that it is downloaded again, or put a good copy there") from None
    return net


def _create_from_factory(name: str, num_classes: int) -> nn.Module:
    factory = _factory(name)
    try:
        net = factory(num_classes=num_classes)
    except TypeError as exc:
        raise ModelError(f"model factory {name!r} must accept num_classes=N: {exc}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _factory(name: str) -> Any:
    """The user's `package.module:factory`, importable from the working directory like `python -m` would."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module, _, attribute = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot load model factory {name!r}: {exc}") from None


def _build_net(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The network of `spec` with `num_classes` outputs, with its published weights when
    `spec.pretrained` names them."""
    prefix, rest = _split_name(spec.name)
    if prefix == "timm":
        return _create_timm(spec, num_classes)
    if prefix == "torchvision":
        return _create_torchvision(spec, num_classes)
    if spec.pretrained is not None:
        raise ModelError(f"{spec.name} has no published weights to load (--pretrained {spec.pretrained}: timm and "
                         "torchvision models only); give a weights file instead")
    if prefix == "kdpipe":
        if rest not in BUILTIN_MODELS:
            raise ModelError(f"unknown built-in classifier {rest!r}; choose one of {', '.join(BUILTIN_MODELS)} "
                             "(kdpipe's detectors, det-tiny, det-small and det-wide, learn from COCO data)")
        return BUILTIN_MODELS[rest](num_classes)
    return _create_from_factory(spec.name, num_classes)


def _from_config(config: dict, fallback: Preprocessing) -> Preprocessing:
    """A Preprocessing from a timm-style config dict (mean, std, interpolation, crop_pct,
    input_size as (channels, height, width) or a side), `fallback` filling what it lacks.
    A non-square input size gives its larger side."""
    size = config.get("input_size", fallback.input_size)
    return Preprocessing(
        mean=tuple(float(v) for v in config.get("mean", fallback.mean)),
        std=tuple(float(v) for v in config.get("std", fallback.std)),
        interpolation=str(config.get("interpolation") or fallback.interpolation),
        crop_pct=float(config.get("crop_pct") or fallback.crop_pct),
        input_size=int(max(size[1:]) if isinstance(size, (tuple, list)) else size),
    )


def _own_preprocessing(spec: ModelSpec) -> Preprocessing | None:
    """The preprocessing the model's library records for it, or None: timm's pretrained
    config (for a model without weights too), the transforms of torchvision's weights,
    a factory's (or its module's) timm-style `pretrained_cfg` / `default_cfg` dict.
    Cheap: nothing is downloaded or built."""
    prefix, _ = _split_name(spec.name)
    if prefix == "timm":
        import timm
        import timm.data

        cfg = timm.models.get_pretrained_cfg(_timm_name(spec))
        if cfg is None:
            return None
        return _from_config(timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict()), IMAGENET_PREPROCESSING)
    if prefix == "torchvision":
        weights = _torchvision_weights(spec)
        if weights is None:
            return None
        transform = weights.transforms()  # torchvision's ImageClassification preset for these weights
        return Preprocessing(mean=tuple(transform.mean), std=tuple(transform.std),
                             interpolation=transform.interpolation.value,
                             crop_pct=transform.crop_size[0] / transform.resize_size[0],
                             input_size=transform.crop_size[0])
    if prefix == "kdpipe":
        return None
    factory = _factory(spec.name)
    module = sys.modules[factory.__module__] if hasattr(factory, "__module__") else None
    for owner in (factory, module):
        for attribute in ("pretrained_cfg", "default_cfg"):
            config = getattr(owner, attribute, None)
            if isinstance(config, dict):
                return _from_config(config, KDPIPE_PREPROCESSING)
    return None


def preprocessing(spec: ModelSpec, warn: bool = False) -> Preprocessing:
    """The preprocessing the model of `spec` expects: its library's own (see
    `_own_preprocessing`), else torchvision's ImageNet recipe for a torchvision model
    and kdpipe's defaults for the rest, with `spec.mean` / `spec.std` overriding the
    normalisation. With `warn`, an override that contradicts the model's own config is
    said as a warning (the weights were trained with the other values)."""
    own = _own_preprocessing(spec)
    base = own or (IMAGENET_PREPROCESSING if _split_name(spec.name)[0] == "torchvision" else KDPIPE_PREPROCESSING)
    resolved = replace(base, mean=tuple(spec.mean or base.mean), std=tuple(spec.std or base.std))
    if warn and own is not None and (resolved.mean, resolved.std) != (own.mean, own.std):
        say(f"warning: {spec.name} was made for mean {_numbers(own.mean)} and std {_numbers(own.std)}, but it is given "
            f"mean {_numbers(resolved.mean)} and std {_numbers(resolved.std)}; drop --mean/--std to use its own")
    return resolved


def recipe_defaults(spec: ModelSpec) -> dict:
    """The view-recipe fields a model's own preprocessing decides unless given: the view
    size, and the interpolation when the renderer has it (else bilinear)."""
    own = preprocessing(spec)
    interpolation = own.interpolation if own.interpolation in INTERPOLATIONS else "bilinear"
    return {"size": own.input_size, "interpolation": interpolation}


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _head(net: nn.Module) -> tuple[str, nn.Module]:
    """The classifier head: the last module (in definition order) with parameters of its own."""
    owners = [(name, module) for name, module in net.named_modules() if next(module.parameters(recurse=False), None) is not None]
    if not owners:
        raise ModelError("the model has no parameters, so no classifier head to fit to the class count")
    return owners[-1]


# Set while a teacher of logits is built: its head must come with its weights.
_TEACHING = contextvars.ContextVar("kdpipe_teaching", default=False)


def _say_reinitialised(model: str, keys: list[str], file_classes: int, num_classes: int) -> None:
    """Say which layers a head replacement re-initialised; refuse it for a teacher of
    logits, whose re-initialised head would teach noise."""
    if _TEACHING.get():
        raise ModelError(f"the teacher {model} has {file_classes} classes in its weights but {num_classes} are asked for: "
                         "a re-initialised head teaches nothing; fine-tune it first (train-student --mode supervised "
                         "--student-pretrained ...) and cache with its student.pt as --weights")
    say(f"{model}: re-initialised {', '.join(keys)} (the weights have {file_classes} classes, the model {num_classes})")


def _replace_head(model: str, net: nn.Module, classes: int, num_classes: int) -> None:
    """Swap a pretrained network's head of `classes` outputs for a freshly initialised one
    of `num_classes` (drawn from torch's generator, which build_model seeds)."""
    name, head = _head(net)
    if isinstance(head, nn.Linear) and head.out_features == classes:
        fresh = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    elif isinstance(head, nn.Conv2d) and head.out_channels == classes and head.groups == 1:
        fresh = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride, head.padding,
                          bias=head.bias is not None)
    else:
        raise ModelError(f"{model}'s last layer {name} ({type(head).__name__}) is not a classifier of {classes} classes "
                         "kdpipe can replace; pass --num-classes " + str(classes))
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent), leaf, fresh.to(head.weight.device, head.weight.dtype))
    _say_reinitialised(model, [f"{name}.{key}" for key, _ in fresh.named_parameters()], classes, num_classes)


def _fit_head(model: str, net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with a classifier head of another class count than the model's replaced by
    the model's own freshly initialised head. Only the head: any other misfit is left for
    the strict load to refuse."""
    own = net.state_dict()
    misfits = [key for key, tensor in state.items() if key in own and own[key].shape != tensor.shape]
    if not misfits:
        return state
    name, head = _head(net)
    keys = [f"{name}.{key}" for key, _ in head.named_parameters()]
    weight = f"{name}.weight"
    if not set(misfits) <= set(keys) or weight not in misfits or own[weight].shape[1:] != state[weight].shape[1:]:
        return state
    _say_reinitialised(model, keys, state[weight].shape[0], own[weight].shape[0])
    return state | {key: own[key] for key in keys}


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: a torch pickle (a state_dict or a checkpoint
    holding one) or a safetensors file."""
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            import safetensors.torch

            obj = safetensors.torch.load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged or foreign file
        raise ModelError(f"cannot read weights file {path}: {first_line(exc)}") from None
    return _state_dict_from(obj, path)


def _state_dict_from(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return _state_dict_from(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            prefix = "module."  # saved from DistributedDataParallel
            return {k.removeprefix(prefix): v for k, v in obj.items()}
    raise ModelError(f"{path} holds no state_dict (looked at the file and its keys {', '.join(_STATE_DICT_KEYS)})")


def load_weights(net: nn.Module, path: str, model: str = "the model") -> None:
    """Load a weights file into `net`, strictly, except that a classifier head of another
    class count is re-initialised (see `_fit_head`)."""
    state = _fit_head(model, net, _read_state_dict(path))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(f"weights in {path} do not fit the model (wrong model or --num-classes?): {detail}") from None


def build_model(spec: ModelSpec, seed: int = 0, teaching: bool = False) -> Normalized:
    """Build the model of `spec` with `spec.num_classes` outputs, initialised from `seed`
    (so a run is reproducible, a re-initialised head included), then from its published
    weights (`spec.pretrained`) or `spec.weights` when given, and normalised as its
    preprocessing says. `teaching`: the model teaches logits, so a head of another class
    count than its weights' is refused rather than re-initialised."""
    if spec.num_classes is None or spec.num_classes < 1:
        raise ModelError(f"model {spec.name} needs a class count: pass --num-classes")
    resolved = preprocessing(spec, warn=True)
    token = _TEACHING.set(teaching)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _build_net(spec, spec.num_classes)
            if spec.weights:
                load_weights(net, spec.weights, spec.name)
    finally:
        _TEACHING.reset(token)
    return Normalized(net, resolved)


def model_fingerprint(model: nn.Module, preprocessing: Preprocessing | None = None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in the state_dict,
    then, when given, one line with the canonical JSON of the preprocessing (see
    docs/format.md, Fingerprints). Archives made before kdpipe recorded preprocessing
    hold the state-dict-only form."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    if preprocessing is not None:
        digest.update(f"preprocessing|{canonical_json(preprocessing.to_dict())}\n".encode())
    return "sha256:" + digest.hexdigest()


def output_classes(model: nn.Module, size: int, role: str = "teacher") -> int:
    """How many logits the model gives for an image of `size` x `size` pixels, so a model
    that cannot take such views, or returns anything but (batch, classes) logits, is
    refused before any work is done. One dry forward pass in eval mode (no statistics
    updated, no random draws); a student, which trains, also one in training mode (some
    models, as torchvision's inception_v3, return other things then), run on a copy and
    with torch's generator restored, so its statistics and the run's draws are untouched."""
    classes = _dry_forward(model, size, role, training=False)
    if role == "student":
        device = _device_of(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _dry_forward(copy.deepcopy(model), size, role, training=True)
    return classes


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.zeros(0)).device


def _dry_forward(model: nn.Module, size: int, role: str, training: bool) -> int:
    """The class count of one forward pass on zero images in eval or training mode (two
    images there: batch norm needs more than one value per channel)."""
    was_training = model.training
    model.train(training)
    mode = " in training mode" if training else ""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2 if training else 1, 3, size, size, device=_device_of(model)))
    except Exception as exc:  # noqa: BLE001 - a user model failing on its input raises anything
        raise ModelError(f"the {role} cannot take views of {size} x {size} pixels{mode} ({_first_line(exc)}); "
                         "choose another --size (or --student-size) or another model") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ModelError(f"the {role} returns {_describe_output(out)}{mode}; kdpipe needs a (batch, classes) logits "
                         "tensor: wrap the model in a package.module:factory whose forward returns it (torchvision's "
                         "inception_v3 and googlenet: build them with aux_logits=False there)")
    return int(out.shape[1])


def _describe_output(out: Any) -> str:
    """What a forward pass returned, in a few words: `dict (keys: logits, aux)`,
    `InceptionOutputs (fields: logits, aux_logits)`, `list of 2`, `a tensor of shape (1, 3, 4, 4)`."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"dict (keys: {', '.join(map(str, out))})"
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return f"{type(out).__name__} (fields: {', '.join(out._fields)})"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)}"
    return type(out).__name__


def with_num_classes(spec: ModelSpec, classes: list[str] | None, role: str) -> ModelSpec:
    """`spec` with its class count resolved from the data's class folders, or a clear
    error when the two disagree or the data has no labels to count."""
    if spec.num_classes is None:
        if classes is None:
            raise ModelError(f"the data is unlabelled, so the {role}'s class count is unknown: pass --num-classes")
        return replace(spec, num_classes=len(classes))
    if classes is not None and spec.num_classes != len(classes):
        raise ModelError(
            f"the {role} has {spec.num_classes} classes but the data has {len(classes)} class folders; "
            "pass the matching --num-classes or the right data"
        )
    return spec


def resolve_module(net: nn.Module, name: str, role: str = "teacher") -> str:
    """The module a --outputs or --feature name means: a name from named_modules() as it
    is, or, for a timm model, a number that is no module's name: an index into its
    `feature_info` (the stages timm's features_only gives)."""
    info = getattr(net, "feature_info", None)
    if not name.isdigit() or name in dict(net.named_modules()) or not isinstance(info, (list, tuple)):
        return name
    if int(name) >= len(info):
        raise ModelError(f"the {role} has {len(info)} feature_info stages (0-{len(info) - 1}), not {name}; "
                         f"or name a module: {', '.join(entry['module'] for entry in info)}")
    return info[int(name)]["module"]


class Tap:
    """Keeps what one module of a network computed in the last forward pass: the input
    of the last Linear layer (the penultimate features) for name "", else the output of
    the module called `name` (an unknown name is refused with the nearest valid ones).
    SEED's embeddings and feature distillation's maps are taken this way."""

    def __init__(self, net: nn.Module, name: str, role: str = "teacher"):
        self.value: torch.Tensor | None = None
        self.module = name = resolve_module(net, name, role)
        if name == "":
            linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ModelError("the teacher has no Linear layer to take penultimate features from; pass --embedding-layer")
            linears[-1].register_forward_pre_hook(self._keep_input)
            return
        modules = dict(net.named_modules())
        if name not in modules:
            valid = [n for n in modules if n]
            nearest = difflib.get_close_matches(name, valid, n=4, cutoff=0.4)
            names = f"the nearest: {', '.join(nearest)}" if nearest else f"its last layers are: {', '.join(valid[-8:])}"
            raise ModelError(f"the {role} has no layer {name!r}; {names}")
        modules[name].register_forward_hook(self._keep_output)

    def _keep_input(self, module, inputs) -> None:
        self.value = inputs[0]

    def _keep_output(self, module, inputs, output) -> None:
        # a copy: the next layer may change its input in place (a ReLU(inplace=True) after a
        # BatchNorm, a residual sum), which would otherwise change what was kept
        self.value = output.clone() if isinstance(output, torch.Tensor) else output


class Teacher:
    """A model run for its outputs only: eval mode, inference mode; on a GPU, bf16
    autocast and channels-last memory. The outputs are its logits, or with `embedding`
    (a layer name, "" for the penultimate features) that layer's L2-normalised output;
    `with_features` also gives the outputs of the modules named in `features`."""

    def __init__(self, spec: ModelSpec, size: int, device: torch.device | None = None, embedding: str | None = None,
                 features: tuple[str, ...] = ()):
        self.spec, self.embedding = spec, embedding
        self.device = device or distributed.device()
        self.model = build_model(spec, teaching=embedding is None).eval()
        self.preprocessing = self.model.preprocessing
        self.fingerprint = model_fingerprint(self.model, self.preprocessing)
        self._tap = Tap(self.model.net, embedding) if embedding is not None else None
        self._feature_taps = {name: Tap(self.model.net, name) for name in features}
        if embedding is None:
            self.num_classes = output_classes(self.model, size)
            if self.num_classes != spec.num_classes:
                raise ModelError(f"model {spec.name} gives {self.num_classes} logits, not the {spec.num_classes} classes asked for")
        self.model.to(self.device)
        if accelerated(self.device):
            self.model.to(memory_format=torch.channels_last)
        if embedding is not None:  # what the forward pass returns does not matter: the layer's output is kept
            try:
                self.num_classes = self(torch.zeros(1, 3, size, size)).shape[1]  # the embedding's width
            except Exception as exc:  # noqa: BLE001 - a user model failing on its input raises anything
                raise ModelError(f"the teacher cannot take views of {size} x {size} pixels ({_first_line(exc)}); "
                                 "choose another --size or another model") from None

    def fingerprint_for(self, recorded: TeacherInfo) -> str:
        """This teacher's fingerprint in the form an archive's teacher `recorded`: archives
        made before kdpipe recorded preprocessing hold the state-dict-only hash."""
        if recorded.preprocessing is None:
            return model_fingerprint(self.model)
        return self.fingerprint

    def describe(self) -> dict:
        outputs = {"outputs": "logits"} if self.embedding is None else {"outputs": "embeddings", "embedding_layer": self.embedding}
        return {"spec": self.spec.to_dict(), "fingerprint": self.fingerprint, "num_classes": self.num_classes,
                "preprocessing": self.preprocessing.to_dict()} | outputs

    def __call__(self, views: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """float32 logits for a batch of [0, 1] views, on the teacher's device; computed
        `batch_size` views at a time when given (a big teacher may need smaller batches
        than its student), and on the CPU in chunks of CPU_CHUNK_PIXELS otherwise."""
        batch_size = self._chunk_size(views, batch_size)
        if batch_size is not None and len(views) > batch_size:
            return torch.cat([self(chunk, batch_size) for chunk in views.split(batch_size)])
        with torch.inference_mode():
            views = views.to(self.device, non_blocking=True)
            if accelerated(self.device):
                views = views.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=accelerated(self.device)):
                logits = self.model(views)
            if self._tap is not None:
                return torch.nn.functional.normalize(self._tap.value.flatten(1).float(), dim=1)
            return logits.float()

    def _chunk_size(self, views: torch.Tensor, batch_size: int | None) -> int | None:
        """Views per forward pass: `batch_size`, else on the CPU as many as CPU_CHUNK_PIXELS allows."""
        if batch_size is None and self.device.type == "cpu":
            return max(1, CPU_CHUNK_PIXELS // (views.shape[-2] * views.shape[-1]))
        return batch_size

    @property
    def feature_modules(self) -> dict[str, str]:
        """The module each name in `features` means (a timm feature_info index resolved)."""
        return {name: tap.module for name, tap in self._feature_taps.items()}

    def with_features(self, views: torch.Tensor,
                      batch_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The outputs (as a call gives them) and the float32 output of each module named in
        `features`, by name, for a batch of views: chunk by chunk as a call runs them."""
        chunk_size = self._chunk_size(views, batch_size) or len(views)
        outputs, features = [], {name: [] for name in self._feature_taps}
        for chunk in views.split(chunk_size):
            outputs.append(self(chunk, chunk_size))
            for name, tap in self._feature_taps.items():
                if tap.value is None:
                    raise ModelError(f"the teacher's module {tap.module!r} does not run in its forward pass; "
                                     "choose another")
                if not isinstance(tap.value, torch.Tensor):
                    raise ModelError(f"the teacher's module {tap.module!r} gives a {type(tap.value).__name__}, not a "
                                     "tensor; choose another")
                features[name].append(tap.value.float())
                tap.value = None  # the next chunk's, or nothing
        return torch.cat(outputs), {name: torch.cat(values) for name, values in features.items()}
