"""Distillation losses: small pure functions of logits or features, found through plain dicts.

A logit loss takes (student_logits, teacher_logits, labels=None, **hparams) and returns a
scalar tensor averaged over the batch, computed in float32 whatever the logits' dtype. A loss
takes only the keyword hyper-parameters listed for it in LOSS_OPTIONS, so the CLI can pass
exactly those that apply. Every default temperature is 1.0, as in `kd_loss`. A feature loss
(FEATURE_LOSSES) takes (student_feature, teacher_feature, **hparams) likewise.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .config import UNLABELLED
from .errors import ConfigError

# Added to the standard deviation in `ls_loss`, so that a constant logit vector gives zeros
# instead of 0/0. The same value as the authors' code.
STD_EPS = 1e-7
# Added to the product of norms in the Pearson correlation of `dist_loss`, as in the authors' code.
PEARSON_EPS = 1e-8
# How near alpha must be to 0 or 1 for `alpha_loss` to use the divergence's limit there (a
# KL) instead of its formula, whose 1 / (alpha (alpha - 1)) blows up; the authors' value.
ALPHA_LIMIT = 1e-3


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hinton's KD term: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes and
    averaged over the batch. The T^2 keeps gradient sizes comparable across temperatures."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
    temperature: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): T^2 * (alpha * TCKD + beta * NCKD), batch mean.

    KD's KL splits exactly into KL(b_t || b_s) + (1 - p_target_teacher) * KL(n_t || n_s),
    where b is the binary (target, not target) distribution and n the distribution over
    the non-target classes alone (the target removed, the rest renormalised). TCKD is the
    first KL and NCKD the second without its teacher-confidence weight, which DKD replaces
    by the free weight beta. So alpha=1, beta=1-p_target_teacher gives back `kd_loss`.

    temperature: softmax temperature, shared by student and teacher (the authors used 4 on
        CIFAR-100 and 1 on ImageNet).
    alpha: weight of TCKD.
    beta: weight of NCKD (the authors' CIFAR-100 default, 8; they used 0.5 on ImageNet).

    Needs the true class of every sample: raises ConfigError without labels.
    """
    if labels is None or bool((labels == UNLABELLED).any()):
        raise ConfigError("the dkd loss needs labelled data (a true class for every sample); "
                          "use kd, dist, ls or mse for unlabelled data")
    student = student_logits.float() / temperature
    teacher = teacher_logits.float() / temperature
    is_target = F.one_hot(labels.long(), student.shape[-1]).bool()

    def binary_and_non_target(scaled_logits):
        # Log-probabilities of (target, not target), computed in log space so a confident
        # prediction does not round 1 - p to 0, and of each non-target class among them.
        non_target = scaled_logits[~is_target].view(len(scaled_logits), -1)
        log_total = torch.logsumexp(scaled_logits, -1)
        log_binary = torch.stack(
            [scaled_logits[is_target] - log_total, torch.logsumexp(non_target, -1) - log_total], -1
        )
        return log_binary, F.log_softmax(non_target, -1)

    log_binary_student, log_non_target_student = binary_and_non_target(student)
    log_binary_teacher, log_non_target_teacher = binary_and_non_target(teacher)
    tckd = _kl_rows(log_binary_teacher, log_binary_student).mean()
    nckd = _kl_rows(log_non_target_teacher, log_non_target_student).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b. A row with no spread
    has correlation 0 (its centred vector is zero and the eps keeps the division finite)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + PEARSON_EPS)


def dist_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
    temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): match relations, not exact probabilities.

    With y = softmax(logits / T): inter = 1 - mean over samples of the Pearson correlation
    between the student's and teacher's class-probability vectors; intra = 1 - mean over
    classes of the correlation between their columns across the batch. The loss is
    T^2 * (beta * inter + gamma * intra). A Pearson correlation is unchanged by shifting or
    scaling either side, so the student need not match the teacher's confidence.

    temperature, beta, gamma: default 1, 1, 1 as in the authors' code and ImageNet setting.

    The intra term needs a batch: a class whose probability is the same in every sample of
    the batch (always so with one sample) has correlation 0, so it adds gamma * T^2 / classes
    and no gradient, even when student and teacher agree.
    """
    y_student = F.softmax(student_logits.float() / temperature, -1)
    y_teacher = F.softmax(teacher_logits.float() / temperature, -1)
    inter = 1 - _pearson_rows(y_student, y_teacher).mean()
    intra = 1 - _pearson_rows(y_student.T, y_teacher.T).mean()
    return (beta * inter + gamma * intra) * temperature**2


def _standardise(logits: torch.Tensor) -> torch.Tensor:
    """Z-score of each logit vector: minus its mean, over its (Bessel-corrected) std + eps."""
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + STD_EPS)


def ls_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KD on standardised logits (Sun et al., CVPR 2024, "Logit Standardization in KD").

    Each logit vector, the student's and the teacher's, is z-scored before `kd_loss`, so the
    student matches the teacher's ranking and relative gaps, not its logit range: a student
    with s = a*t + b (a > 0) has zero loss. The std is Bessel-corrected as in the authors'
    code (torch.std); any fixed choice keeps that invariance.

    temperature: softmax temperature on the standardised logits (the authors' CIFAR-100
        recipe used 2), with the T^2 factor of KD.
    """
    return kd_loss(_standardise(student_logits.float()), _standardise(teacher_logits.float()),
                   temperature=temperature)


def mse_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the logits, averaged over classes and batch. No hyper-parameters."""
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def _alpha_branch(log_student: torch.Tensor, log_teacher: torch.Tensor, alpha: float,
                  clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The alpha-divergence D_alpha(p || q) of each row, p the teacher's distribution and q
    the student's, and a surrogate whose gradient is the divergence's with the importance
    weights (p/q)^alpha clipped to [0, clip] (AlphaNet's clipping; `alpha_loss`). Near
    alpha = 0 and 1 the limits KL(q || p) and KL(p || q), as in the authors' code."""
    q, p = log_student.exp().detach(), log_teacher.exp().detach()
    log_ratio = (log_teacher - log_student).detach()
    if abs(alpha) < ALPHA_LIMIT:
        clipped = log_ratio.clamp(max=math.log(clip))
        value, pull = -(q * clipped).sum(-1), q * (clipped - 1)
    elif abs(alpha - 1) < ALPHA_LIMIT:  # q * (p / q) written as p: q may underflow to 0 where p / q overflows
        value, pull = (p * log_ratio).sum(-1), p
    else:
        weight = (alpha * log_ratio).exp().clamp(0, clip)
        value = (q * (weight - 1)).sum(-1) / (alpha * (alpha - 1))
        pull = q * (weight / alpha + 1 / (alpha * (alpha - 1)))
    # d value / d logits = -sum_i pull_i * d log q_i / d logits, with the weights clipped
    return value, -(pull * log_student).sum(-1)


def alpha_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
    alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0,
) -> torch.Tensor:
    """AlphaNet's adaptive alpha-divergence (Wang et al., "AlphaNet: Improved Training of
    Supernets with Alpha-Divergence", ICML 2021), batch mean.

    With p the teacher's and q the student's softmax, D_alpha(p || q) =
    sum_i q_i ((p_i / q_i)^alpha - 1) / (alpha (alpha - 1)), which tends to KL(q || p) as
    alpha -> 0 and to KL(p || q) as alpha -> 1. Per sample the loss is the larger of
    D_alpha_min and D_alpha_max, so the student is pushed both to cover the teacher's
    modes (a positive alpha penalises q_i << p_i) and not to spread probability where the
    teacher puts none (a negative alpha penalises q_i >> p_i). The gradient is
    the divergence's with each importance weight (p_i / q_i)^alpha clipped to [0, clip],
    which keeps it bounded where q_i is tiny; the value is the divergence computed with the
    same clipped weights (exact wherever no weight reaches `clip`), as in the authors' code.

    alpha_min, alpha_max, clip: the paper's ImageNet defaults -1, 1 and 5. No temperature.
    """
    if not clip > 0:
        raise ConfigError(f"the alpha loss needs clip > 0, got {clip}")
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    low, low_surrogate = _alpha_branch(log_student, log_teacher, alpha_min, clip)
    high, high_surrogate = _alpha_branch(log_student, log_teacher, alpha_max, clip)
    use_low = low > high
    value, surrogate = torch.where(use_low, low, high), torch.where(use_low, low_surrogate, high_surrogate)
    # the divergence's value, with the clipped divergence's gradient
    return (value + surrogate - surrogate.detach()).mean()


# kd first: it is the default, and the error for an unknown name lists them in this order.
LOSSES = {"kd": kd_loss, "dkd": dkd_loss, "dist": dist_loss, "ls": ls_loss, "mse": mse_loss, "alpha": alpha_loss}

# The keyword hyper-parameters each loss accepts; pass only these.
LOSS_OPTIONS = {
    "kd": ("temperature",),
    "dkd": ("temperature", "alpha", "beta"),
    "dist": ("temperature", "beta", "gamma"),
    "ls": ("temperature",),
    "mse": (),
    "alpha": ("alpha_min", "alpha_max", "clip"),
}


# --- feature losses: (student feature, teacher feature, **hparams) -> scalar ------------------
# Each compares what one module of the student computed with what one of the teacher computed,
# for the same views; `features` taps the modules and aligns the student's map first (a
# learnable connector for `hint`, the teacher's spatial size for the spatial losses).

# Keeps `rkd_loss` finite: under the square root of a squared distance, and under the mean
# distance a batch of identical embeddings divides by. As in the authors' code.
RKD_EPS = 1e-12


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets' hint (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the mean
    squared error between the teacher's feature map and the student's, the student's first
    mapped to the teacher's shape by the learnable regressor (connector) the caller applies.
    A mean over every element, as common implementations do (the paper's 1/2 * sum squared
    differs by a constant factor). No hyper-parameters."""
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def _attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """The spatial attention map of (batch, channels, height, width) features: the mean over
    channels of |A|^p at each position, flattened and L2-normalised per sample."""
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention",
    ICLR 2017): the student's spatial attention map, sum over channels of |A|^p normalised
    to unit L2 norm, should match the teacher's. As in the authors' code, the loss is the
    mean over samples and positions of the squared difference of the two maps (the paper
    weights it by beta / 2 = 500 per layer pair). The channel counts may differ; the spatial
    sizes must agree. p: the paper's 2."""
    return (_attention_map(student_feature, p) - _attention_map(teacher_feature, p)).pow(2).mean()


def _similarity(feature: torch.Tensor) -> torch.Tensor:
    """The batch's Gram matrix of flattened features, each row L2-normalised."""
    flat = feature.float().flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): views the teacher finds similar
    should look similar to the student. With G the batch x batch Gram matrix of the
    flattened features, each row L2-normalised, the loss is ||G_t - G_s||_F^2 / batch^2 (the
    paper weights it by gamma = 3000). Any shapes with the same batch compare. With one
    sample both matrices are [[1]] (or [[0]] for a zero feature) and the loss 0."""
    return (_similarity(student_feature) - _similarity(teacher_feature)).pow(2).sum() / len(student_feature) ** 2


def _distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances over their mean over distinct pairs (0 on the diagonal)."""
    squared = (embeddings[:, None] - embeddings[None]).pow(2).sum(-1)
    off_diagonal = ~torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    distances = squared.clamp(min=RKD_EPS).sqrt() * off_diagonal
    return distances / (distances[off_diagonal].mean() + RKD_EPS)


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k, for every (i, j, k): the dot product of the
    unit vectors from j to i and from j to k (0 where a vector is zero)."""
    unit = F.normalize(embeddings[None] - embeddings[:, None], dim=2)  # [j, i] = unit(e_i - e_j)
    return unit @ unit.transpose(1, 2)


def rkd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019): the
    student's embeddings (features flattened per sample) should relate to each other as the
    teacher's do. Distance term: the Huber (smooth L1) loss between the two batches'
    pairwise distances, each over its mean distance; angle term: between the cosines of the
    angles every triple of samples forms. Means over all pairs and triples, as in the
    authors' code. distance_weight, angle_weight: the paper's 25 and 50. Needs two samples:
    with one there is no relation and the loss is 0."""
    student, teacher = student_feature.float().flatten(1), teacher_feature.float().flatten(1)
    if len(student) < 2:
        return student.sum() * 0
    distance = F.smooth_l1_loss(_distances(student), _distances(teacher))
    angle = F.smooth_l1_loss(_angles(student), _angles(teacher))
    return distance_weight * distance + angle_weight * angle


# The feature losses by the name --feature gives, their options, and those that compare
# spatial maps (batch, channels, height, width) and so need both features of rank 4.
FEATURE_LOSSES = {"hint": hint_loss, "at": at_loss, "sp": sp_loss, "rkd": rkd_loss}
FEATURE_OPTIONS = {"hint": (), "at": ("p",), "sp": (), "rkd": ("distance_weight", "angle_weight")}
SPATIAL_LOSSES = ("hint", "at")


def get_feature_loss(name: str, options: dict):
    """Feature loss `name` with `options` bound; an unknown name, or an option it does not
    take, is refused with the valid ones."""
    if name not in FEATURE_LOSSES:
        raise ConfigError(f"unknown feature loss {name!r}; choose one of {', '.join(FEATURE_LOSSES)}")
    for option in options:
        if option not in FEATURE_OPTIONS[name]:
            known = ", ".join(FEATURE_OPTIONS[name]) or "none"
            raise ConfigError(f"the {name} feature loss has no option {option!r} (its options: {known})")
    return functools.partial(FEATURE_LOSSES[name], **options)


class SeedLoss:
    """SEED (Fang et al., ICLR 2021): self-supervised distillation of embeddings.

    The teacher's L2-normalised embedding t of a view and the student's s are each
    compared with a FIFO queue of the teacher's past embeddings (and with t itself);
    the loss is the cross-entropy between the teacher's similarity distribution,
    softmax(t . [queue, t] / teacher_temperature), and the student's,
    softmax(s . [queue, t] / student_temperature). The queue holds the last `queue`
    teacher embeddings seen, so the loss has state: one instance per run, checkpointed
    with it. The paper's defaults: teacher 0.01, student 0.2, a queue of 65,536 on
    ImageNet (a smaller one suits a small data set).
    """

    def __init__(self, queue: float = 4096, teacher_temperature: float = 0.01, student_temperature: float = 0.2):
        if queue < 1 or teacher_temperature <= 0 or student_temperature <= 0:
            raise ConfigError("seed needs queue >= 1 and positive temperatures")
        self.size, self.teacher_temperature, self.student_temperature = int(queue), teacher_temperature, student_temperature
        self.queue: torch.Tensor | None = None  # (size, D), filled from row 0
        self.filled = self.next = 0

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = F.normalize(student.float(), dim=1)
        t = F.normalize(teacher.float(), dim=1)
        # a copy: the queue is updated in place below, while backward still needs the bank
        bank = self.queue[: self.filled].clone() if self.queue is not None else t.new_zeros((0, t.shape[1]))
        own = (t * t).sum(1, keepdim=True)
        target = F.softmax(torch.cat([t @ bank.T, own], 1) / self.teacher_temperature, dim=1)
        log_student = F.log_softmax(torch.cat([s @ bank.T, (s * t).sum(1, keepdim=True)], 1) / self.student_temperature, dim=1)
        loss = -(target * log_student).sum(1).mean()
        self._enqueue(t.detach())
        return loss

    def _enqueue(self, embeddings: torch.Tensor) -> None:
        if self.queue is None:
            self.queue = embeddings.new_zeros((self.size, embeddings.shape[1]))
        newest = embeddings[-self.size:]
        rows = (self.next + torch.arange(len(newest), device=newest.device)) % self.size
        self.queue[rows] = newest
        self.next = (self.next + len(newest)) % self.size
        self.filled = min(self.filled + len(newest), self.size)

    def state_dict(self) -> dict:
        return {"queue": self.queue, "filled": self.filled, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.queue, self.filled, self.next = state["queue"], state["filled"], state["next"]


# Losses with state, built once per run; their options are their constructor's.
STATEFUL_LOSSES = {"seed": SeedLoss}
STATEFUL_OPTIONS = {"seed": ("queue", "teacher_temperature", "student_temperature")}


def loss_options(name: str) -> tuple[str, ...]:
    """The keyword hyper-parameters loss `name` takes."""
    get_loss(name)
    return LOSS_OPTIONS.get(name) or STATEFUL_OPTIONS.get(name, ())


def check_loss_options(name: str, options: dict) -> None:
    """Refuse an option that loss `name` does not take, or one that is not a number; the
    temperature is not a loss option (it is --temperature)."""
    allowed = [option for option in loss_options(name) if option != "temperature"]
    for option, value in options.items():
        if option not in allowed:
            known = ", ".join(allowed) or "none"
            raise ConfigError(f"the {name} loss has no option {option!r} (its options: {known}; T is --temperature)")
        if not isinstance(value, (int, float)):
            raise ConfigError(f"--loss-option {option} must be a number, got {value!r}")


def get_loss(name: str):
    """The loss function (or, for a stateful loss, its class) called `name`; an unknown
    name lists the valid ones."""
    if name not in LOSSES and name not in STATEFUL_LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join([*LOSSES, *STATEFUL_LOSSES])}")
    return LOSSES.get(name) or STATEFUL_LOSSES[name]
