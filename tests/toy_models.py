"""User-code model factories for tests (loaded as `tests.toy_models:NAME`, like a user's own)."""

import hashlib
import os
import resource
import signal
import time
from collections import defaultdict, namedtuple

import torch
from torch import nn

from pipeline.models import small_cnn, small_mlp

# role -> sha256 of every input image the model saw, in order
SEEN: dict[str, list[str]] = defaultdict(list)


class Recording(nn.Module):
    """Records a hash of every input image it sees (when `should_record` says so)."""

    def __init__(self, role: str, net: nn.Module):
        super().__init__()
        self.role, self.net = role, net

    def forward(self, x):
        # kdpipe probes a model with a batch of equal (zero) images to count its outputs; skip those
        if not (x == x[0]).all():
            SEEN[self.role].extend(hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in x.detach())
        return self.net(x)


class Slow(nn.Module):
    """A teacher slow enough to be killed mid-run."""

    def __init__(self, net: nn.Module, delay: float):
        super().__init__()
        self.net, self.delay = net, delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


class Scaled(nn.Module):
    """Multiplies its logits by `factor` on real batches (not on the one-image probe)."""

    def __init__(self, num_classes: int, factor: float):
        super().__init__()
        self.linear, self.factor = nn.Linear(3, num_classes), factor

    def forward(self, x):
        out = self.linear(x.mean((2, 3))) + 1.0
        return out * self.factor if x.shape[0] > 1 else out


def recording_teacher(num_classes: int) -> nn.Module:
    return Recording("teacher", small_cnn(num_classes, width=8))


def recording_student(num_classes: int) -> nn.Module:
    return Recording("student", small_mlp(num_classes, hidden=16))


def slow_teacher(num_classes: int) -> nn.Module:
    return Slow(small_cnn(num_classes, width=8), delay=0.3)


def slow_student(num_classes: int) -> nn.Module:
    return Slow(small_mlp(num_classes, hidden=16), delay=0.1)


def nan_teacher(num_classes: int) -> nn.Module:
    return Scaled(num_classes, float("nan"))


def huge_teacher(num_classes: int) -> nn.Module:
    return Scaled(num_classes, 1e6)  # finite in float32, beyond float16's range


def tiny_cnn(num_classes: int) -> nn.Module:
    return small_cnn(num_classes, width=8)


def not_a_module(num_classes: int):
    return "nope"


def no_class_count():
    return nn.Linear(3, 3)


class Paced(nn.Module):
    """A teacher that takes `delay` seconds (or $KDPIPE_TEST_PACE) per batch, so a run lasts long enough to be
    killed at chosen moments. With KDPIPE_TEST_DISK_FULL_AFTER=K in the environment, the
    disk "fills up" after K batches: the process's file-size limit drops to 0 bytes, so
    every later write fails with EFBIG, as on a full disk (deleting still works)."""

    def __init__(self, net: nn.Module, delay: float):
        super().__init__()
        self.net, self.delay, self.batches = net, delay, 0

    def forward(self, x):
        if x.shape[0] > 1:  # not the one-image probe that counts the outputs
            self.batches += 1
            full_after = os.environ.get("KDPIPE_TEST_DISK_FULL_AFTER")
            if full_after is not None and self.batches > int(full_after):
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill the process
                resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        time.sleep(float(os.environ.get("KDPIPE_TEST_PACE", self.delay)))  # a test may slow it further
        return self.net(x)


def paced_teacher(num_classes: int) -> nn.Module:
    return Paced(small_cnn(num_classes, width=8), delay=0.1)


def dropout_mlp(num_classes: int) -> nn.Module:
    """A student with a random layer: its training steps depend on torch's generator."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(32, num_classes))


def dict_output(num_classes: int) -> nn.Module:
    """A model whose forward returns a dict (as detection and Hugging Face models do)."""

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, num_classes)

        def forward(self, x):
            return {"logits": self.linear(x.mean((2, 3)))}

    return DictOut()


AuxOutputs = namedtuple("AuxOutputs", ["logits", "aux_logits"])  # like torchvision's InceptionOutputs


class Returns(nn.Module):
    """A model whose forward returns `wrap(logits)` instead of its logits; with
    `training_only`, only in training mode (as inception_v3 and googlenet do)."""

    def __init__(self, num_classes: int, wrap, training_only: bool = False):
        super().__init__()
        self.linear, self.wrap, self.training_only = nn.Linear(3, num_classes), wrap, training_only

    def forward(self, x):
        logits = self.linear(x.mean((2, 3)))
        return logits if self.training_only and not self.training else self.wrap(logits)


def tuple_output(num_classes: int) -> nn.Module:
    return Returns(num_classes, lambda logits: (logits, logits))


def list_output(num_classes: int) -> nn.Module:
    return Returns(num_classes, lambda logits: [logits])


def map_output(num_classes: int) -> nn.Module:
    """Returns a (batch, classes, 4, 4) map, as a segmentation head would."""
    return Returns(num_classes, lambda logits: logits[:, :, None, None].expand(-1, -1, 4, 4))


def aux_in_training(num_classes: int) -> nn.Module:
    """Logits in eval mode, (logits, aux_logits) in training mode."""
    return Returns(num_classes, lambda logits: AuxOutputs(logits, logits), training_only=True)


def with_pretrained_cfg(num_classes: int) -> nn.Module:
    return small_mlp(num_classes, hidden=16)


# a factory can say what input its weights expect, as timm's models do
with_pretrained_cfg.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 24, 24),
                                      "interpolation": "bicubic", "crop_pct": 0.9}


def slow_bn_cnn(num_classes: int) -> nn.Module:
    """A small CNN whose BatchNorm momentum is 0.01, as MobileNetV3's: a short run leaves
    its running statistics near their start (mean 0, variance 1)."""
    net = small_cnn(num_classes, width=8)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.01
    return net


class ColourShares(nn.Module):
    """An oracle on images of pure red, green and blue (classes 0, 1, 2), given with
    --mean 0,0,0 --std 1,1,1: its distribution is each channel's share of the view, so a
    mixed view gets the lam-weighted one-hot of its two labels."""

    def __init__(self):
        super().__init__()
        self.register_buffer("floor", torch.tensor(1e-6))  # something for the teacher's fingerprint to hash

    def forward(self, x):
        return (x.mean((2, 3)) + self.floor).log()


def colour_oracle(num_classes: int) -> nn.Module:
    assert num_classes == 3, "red, green and blue"
    return ColourShares()


class _Pair(nn.Module):
    """Gives its input twice, as a tuple (a module whose output is no tensor)."""

    def forward(self, x):
        return x, x


class _First(nn.Module):
    def forward(self, pair):
        return torch.nan_to_num(pair[0], posinf=1.0, neginf=-1.0)


def nan_inside(num_classes: int) -> nn.Module:
    """A teacher whose module 1 computes Inf (and NaN) that module 3 turns back into finite
    numbers, so its logits are finite; module 2 gives a tuple."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Scale(), _Pair(), _First(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


class _Scale(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x * float("inf"), x)
