"""Model loading: torchvision builders by name, built-in demo nets, user factories,
weights from files, and the teacher's fingerprint.

Every model is wrapped in `Normalized`, so normalisation is part of the model and the
views stay plain [0, 1] pixels. Checkpoints hold the inner network's state_dict, so a
student trained here loads into a plain torchvision model.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import ModelSpec
from .errors import ModelError

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


# Keys under which checkpoints commonly keep their state_dict, kdpipe's own "model" first.
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "student", "net")


class Normalized(nn.Module):
    """Applies (x - mean) / std before the wrapped network."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


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


BUILTIN_MODELS = {"cnn": small_cnn, "mlp": small_mlp}


def _build_net(name: str, num_classes: int) -> nn.Module:
    prefix, _, rest = name.partition(":")
    if not rest:
        raise ModelError(
            f"bad model name {name!r}; use torchvision:NAME, kdpipe:NAME ({', '.join(BUILTIN_MODELS)}) "
            "or package.module:factory"
        )
    if prefix == "torchvision":
        import torchvision

        if rest not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(
                f"unknown torchvision classification model {rest!r}; see torchvision.models.list_models()"
            )
        return torchvision.models.get_model(rest, weights=None, num_classes=num_classes)
    if prefix == "kdpipe":
        if rest not in BUILTIN_MODELS:
            raise ModelError(f"unknown built-in model {rest!r}; choose one of {', '.join(BUILTIN_MODELS)}")
        return BUILTIN_MODELS[rest](num_classes)
    # User code, importable from the working directory like `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(prefix), rest)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot load model factory {name!r}: {exc}") from None
    try:
        net = factory(num_classes=num_classes)
    except TypeError as exc:
        raise ModelError(f"model factory {name!r} must accept num_classes=N: {exc}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _state_dict_from(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return _state_dict_from(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            prefix = "module."  # saved from DistributedDataParallel
            return {k.removeprefix(prefix): v for k, v in obj.items()}
    raise ModelError(f"{path} holds no state_dict (looked at the file and its keys {', '.join(_STATE_DICT_KEYS)})")


def load_weights(net: nn.Module, path: str) -> None:
    """Load a state_dict, or a checkpoint holding one, into `net` (strict)."""
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise ModelError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    try:
        net.load_state_dict(_state_dict_from(obj, path))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(f"weights in {path} do not fit the model (wrong model or --num-classes?): {detail}") from None


def build_model(spec: ModelSpec, seed: int = 0) -> Normalized:
    """Build the model of `spec` with `spec.num_classes` outputs, initialised from `seed`
    (so a run is reproducible) and then from `spec.weights` when given."""
    if spec.num_classes is None or spec.num_classes < 1:
        raise ModelError(f"model {spec.name} needs a class count: pass --num-classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _build_net(spec.name, spec.num_classes)
    if spec.weights:
        load_weights(net, spec.weights)
    return Normalized(net, spec.mean, spec.std)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in the state_dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def output_classes(model: nn.Module, size: int, role: str = "teacher") -> int:
    """How many logits the model gives for an image of `size` x `size` pixels: one dry
    forward pass in eval mode (no statistics updated, no random draws), so a model that
    cannot take such views, or returns something other than (batch, classes) logits, is
    refused before any work is done."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, 3, size, size, device=next(model.parameters(), torch.zeros(0)).device))
    except Exception as exc:  # noqa: BLE001 - a user model failing on its input raises anything
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelError(f"the {role} cannot take views of {size} x {size} pixels ({reason}); "
                         "choose another --size (or --student-size) or another model") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the {role} returns {shape}; kdpipe needs (batch, classes) logits from its forward pass")
    return int(out.shape[1])


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


class _Tap:
    """Keeps what one module of a network computed in the last forward pass: the input
    of the last Linear layer (the penultimate features) for name "", else the output of
    the module called `name`."""

    def __init__(self, net: nn.Module, name: str):
        self.value: torch.Tensor | None = None
        if name == "":
            linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ModelError("the teacher has no Linear layer to take penultimate features from; pass --embedding-layer")
            linears[-1].register_forward_pre_hook(self._keep_input)
            return
        modules = dict(net.named_modules())
        if name not in modules:
            names = ", ".join(list(n for n in modules if n)[-8:])
            raise ModelError(f"the teacher has no layer {name!r}; its last layers are: {names}")
        modules[name].register_forward_hook(self._keep_output)

    def _keep_input(self, module, inputs) -> None:
        self.value = inputs[0]

    def _keep_output(self, module, inputs, output) -> None:
        self.value = output


class Teacher:
    """A model run for its outputs only: eval mode, inference mode; on a GPU, bf16
    autocast and channels-last memory. The outputs are its logits, or with `embedding`
    (a layer name, "" for the penultimate features) that layer's L2-normalised output."""

    def __init__(self, spec: ModelSpec, size: int, device: torch.device | None = None, embedding: str | None = None):
        self.spec, self.embedding = spec, embedding
        self.device = device or distributed.device()
        self.model = build_model(spec).eval()
        self.fingerprint = model_fingerprint(self.model)
        self._tap = _Tap(self.model.net, embedding) if embedding is not None else None
        if embedding is None:
            self.num_classes = output_classes(self.model, size)
            if self.num_classes != spec.num_classes:
                raise ModelError(f"model {spec.name} gives {self.num_classes} logits, not the {spec.num_classes} classes asked for")
        self.model.to(self.device)
        if accelerated(self.device):
            self.model.to(memory_format=torch.channels_last)
        if embedding is not None:
            self.num_classes = self(torch.zeros(1, 3, size, size)).shape[1]  # the embedding's width

    def describe(self) -> dict:
        outputs = {"outputs": "logits"} if self.embedding is None else {"outputs": "embeddings", "embedding_layer": self.embedding}
        return {"spec": self.spec.to_dict(), "fingerprint": self.fingerprint, "num_classes": self.num_classes} | outputs

    def __call__(self, views: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """float32 logits for a batch of [0, 1] views, on the teacher's device; computed
        `batch_size` views at a time when given (a big teacher may need smaller batches
        than its student), and on the CPU in chunks of CPU_CHUNK_PIXELS otherwise."""
        if batch_size is None and self.device.type == "cpu":
            batch_size = max(1, CPU_CHUNK_PIXELS // (views.shape[-2] * views.shape[-1]))
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
