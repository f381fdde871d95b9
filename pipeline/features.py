"""Feature distillation (train-student --feature): what named modules of the student
compute, compared with what named modules of the teacher computed on the same views.

`FeatureDistillation` taps the student's modules (`models.Tap`), aligns each tapped output
with the teacher's and gives each term's value by name (`FeatureSpec.name`); the objective
weights them and adds them to the loss. The teacher's features come in as a dict by module
name, whatever their source: a live teacher's taps (`Teacher.with_features`) in online
mode, an archive's feature outputs (cache-teacher --outputs) in cached mode. Aligning is a
learnable 1 x 1 convolution from the student's channels to the teacher's for `hint`
(FitNets' regressor), and for the spatial losses the student's map brought to the
teacher's height and width (`align`: average-pooled when larger, as an archive pools the
teacher's; else bilinear). The connectors train with the student (their parameters are in
the optimizer, their state in checkpoint.pt) but are no part of it: student.pt and
exports leave them out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FeatureSpec
from .errors import ConfigError, ModelError
from .losses import SPATIAL_LOSSES, get_feature_loss
from .models import Normalized, Tap, Teacher


def _describe(feature) -> str:
    return f"shape {tuple(feature.shape)}" if isinstance(feature, torch.Tensor) else type(feature).__name__


def teacher_feature_shapes(teacher: Teacher, size: int) -> dict[str, tuple[int, ...]]:
    """The shape per view of each of a live teacher's tapped outputs, by name, from one dry
    pass on a blank view (eval mode, inference mode: nothing of the teacher changes)."""
    _, features = teacher.with_features(torch.zeros(1, 3, size, size))
    return {name: tuple(feature.shape[1:]) for name, feature in features.items()}


def _check_pair(spec: FeatureSpec, student_feature, teacher_feature) -> None:
    """Refuse a pair of features the term cannot compare: anything but tensors with a batch
    dimension and at least one more, and for a spatial loss anything but maps of rank 4."""
    for role, module, feature in (("student", spec.student_module, student_feature),
                                  ("teacher", spec.teacher_module, teacher_feature)):
        if feature is None:
            raise ModelError(f"--feature {spec.name}: the {role}'s module {module!r} does not run in its forward pass")
        if not isinstance(feature, torch.Tensor) or feature.ndim < 2:
            raise ConfigError(f"--feature {spec.name}: the {role}'s module {module!r} gives {_describe(feature)}, "
                              "not a (batch, ...) tensor")
        if spec.loss in SPATIAL_LOSSES and feature.ndim != 4:
            raise ConfigError(f"--feature {spec.name}: {spec.loss} compares feature maps (batch, channels, height, "
                              f"width), but the {role}'s module {module!r} gives {_describe(feature)}; choose a "
                              "convolutional layer, or sp or rkd, which take features of any shape")


class FeatureDistillation(nn.Module):
    """The feature terms of a run (see the module's docstring). Built by `build` from a dry
    forward pass, which fixes the connectors' shapes; its state_dict is the connectors'."""

    def __init__(self, specs: tuple[FeatureSpec, ...], taps: dict[str, Tap], channels: dict[int, tuple[int, int]]):
        super().__init__()
        self.specs, self._taps = specs, taps
        self.losses = [get_feature_loss(spec.loss, spec.options) for spec in specs]
        # FitNets' regressor of each hint term, by the term's index: student channels -> teacher channels
        self.connectors = nn.ModuleDict({str(index): nn.Conv2d(student, teacher, 1)
                                         for index, (student, teacher) in channels.items()})

    @classmethod
    def build(cls, specs: tuple[FeatureSpec, ...], student: Normalized, student_size: int,
              teacher_shapes: dict[str, tuple[int, ...]], seed: int) -> FeatureDistillation:
        """Tap the student's modules and check every term against the teacher's feature
        shapes per view, by module (a live teacher's from `teacher_feature_shapes`, an
        archive's from its manifest), on one dry forward pass of the student on a blank view
        (eval mode, no gradients: nothing changes); the connectors are initialised from
        `seed`, so a run is reproducible."""
        modules = dict.fromkeys(spec.student_module for spec in specs)
        taps = {name: Tap(student.net, name, "student") for name in modules}
        was_training, device = student.training, next(student.parameters()).device
        with torch.no_grad():
            student.eval()(torch.zeros(1, 3, student_size, student_size, device=device))
            student.train(was_training)
        channels = {}
        for index, spec in enumerate(specs):
            student_feature = taps[spec.student_module].value
            teacher_feature = torch.zeros(1, *teacher_shapes[spec.teacher_module])
            _check_pair(spec, student_feature, teacher_feature)
            if spec.loss == "hint":
                channels[index] = (student_feature.shape[1], teacher_feature.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(specs, taps, channels).to(device)

    def student_features(self) -> dict[str, torch.Tensor]:
        """The outputs of the student's tapped modules in its last forward pass, by name."""
        return {name: tap.value for name, tap in self._taps.items()}

    def forward(self, student_features: dict[str, torch.Tensor],
                teacher_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each term's unweighted value, by its name, from both models' features by module name."""
        terms = {}
        for index, (spec, loss) in enumerate(zip(self.specs, self.losses)):
            student, teacher = student_features[spec.student_module].float(), teacher_features[spec.teacher_module]
            if str(index) in self.connectors:
                student = self.connectors[str(index)](student)
            if spec.loss in SPATIAL_LOSSES and student.shape[-2:] != teacher.shape[-2:]:
                student = align(student, tuple(teacher.shape[-2:]))
            terms[spec.name] = loss(student, teacher)
        return terms


def align(student: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The student's map (batch, channels, h, w) at the teacher's height and width: reduced
    as an archive's `pool:` reduces the teacher's map (adaptive average pooling, every
    input position counted) when it is at least as large in both dimensions, else
    enlarged by bilinear interpolation. Bilinear shrinking would sample only the middle of
    each bin beyond a factor of 2, and hold the student to another quantity than the
    teacher's pooled map."""
    if student.shape[-2] >= size[0] and student.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(student, size)
    return F.interpolate(student, size=size, mode="bilinear", align_corners=False)
