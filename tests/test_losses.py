"""The distillation losses against numbers worked out by hand in plain Python, their
defining identities and invariances, and finite gradients."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.losses import (
    LOSS_OPTIONS, LOSSES, PEARSON_EPS, STD_EPS, dist_loss, dkd_loss, get_loss, kd_loss, ls_loss, mse_loss,
)

STUDENT = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
TEACHER = [[3.0, 1.0, 0.0], [2.0, 0.0, 1.0]]
LABELS = [0, 2]


# Plain-Python references: lists of floats in, a float out, no torch.

def softmax(row, temperature=1.0):
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def mean(values):
    return sum(values) / len(values)


def pearson(a, b):
    """Pearson correlation with the loss's eps in the denominator."""
    a = [x - mean(a) for x in a]
    b = [x - mean(b) for x in b]
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (norm + PEARSON_EPS)


def tensors(*rows):
    return [torch.tensor(r) for r in rows]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_is_t_squared_times_kl_by_hand(temperature):
    student, teacher = tensors(STUDENT, TEACHER)
    kls = [kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(STUDENT, TEACHER)]
    expected = temperature**2 * mean(kls)
    assert kd_loss(student, teacher, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(teacher, teacher, temperature=temperature).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dkd_matches_hand_computed_tckd_and_nckd(temperature):
    alpha, beta = 0.7, 2.5
    tckds, nckds = [], []
    for s, t, target in zip(STUDENT, TEACHER, LABELS):
        p_s, p_t = softmax(s, temperature), softmax(t, temperature)
        # binary (target, not target) distributions
        tckds.append(kl([p_t[target], 1 - p_t[target]], [p_s[target], 1 - p_s[target]]))
        # the non-target classes alone, renormalised
        rest_s = [p for c, p in enumerate(p_s) if c != target]
        rest_t = [p for c, p in enumerate(p_t) if c != target]
        nckds.append(kl([p / sum(rest_t) for p in rest_t], [p / sum(rest_s) for p in rest_s]))
    expected = temperature**2 * (alpha * mean(tckds) + beta * mean(nckds))
    student, teacher, labels = tensors(STUDENT, TEACHER, LABELS)
    got = dkd_loss(student, teacher, labels, temperature=temperature, alpha=alpha, beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("sample", [0, 1])
def test_dkd_with_teacher_weighted_nckd_is_kd(temperature, sample):
    """KL(p || q) = KL(b_p || b_q) + (1 - p_target) * KL(n_p || n_q), with b the binary
    (target, rest) distributions and n the renormalised non-target ones: for a class
    i != target, p_i = (1 - p_target) * n_p,i, so its KL summand splits into
    (1 - p_target) * n_p,i * [log((1 - p_target)/(1 - q_target)) + log(n_p,i / n_q,i)],
    and summing over i gives the rest-part of the binary KL plus the weighted NCKD.
    Every probability here is at temperature T and both terms carry the same T^2, so
    DKD with alpha = 1 and beta = 1 - p_target(teacher at T) equals KD at any T.
    One sample, so that beta is a scalar. The tolerance is float32's: the two sides sum
    different near-cancelling logs (in float64 they agree to 1e-15)."""
    student, teacher = tensors([STUDENT[sample]], [TEACHER[sample]])
    target = LABELS[sample]
    beta = 1 - softmax(TEACHER[sample], temperature)[target]
    dkd = dkd_loss(student, teacher, torch.tensor([target]), temperature=temperature, alpha=1.0, beta=beta)
    kd = kd_loss(student, teacher, temperature=temperature)
    assert dkd.item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
    # with the default beta it is not KD: the identity above is what the test checks
    default = dkd_loss(student, teacher, torch.tensor([target]), temperature=temperature)
    assert default.item() != pytest.approx(dkd.item(), rel=1e-3)


@pytest.mark.parametrize("labels", [None, torch.tensor([0, -1])])
def test_dkd_refuses_unlabelled_data(labels):
    student, teacher = tensors(STUDENT, TEACHER)
    with pytest.raises(ConfigError, match="dkd loss needs labelled data"):
        dkd_loss(student, teacher, labels)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dist_matches_hand_computed_relations(temperature):
    beta, gamma = 1.5, 0.5
    y_s = [softmax(row, temperature) for row in STUDENT]
    y_t = [softmax(row, temperature) for row in TEACHER]
    inter = 1 - mean([pearson(s, t) for s, t in zip(y_s, y_t)])
    columns = range(len(y_s[0]))
    intra = 1 - mean([pearson([row[c] for row in y_s], [row[c] for row in y_t]) for c in columns])
    expected = temperature**2 * (beta * inter + gamma * intra)
    student, teacher = tensors(STUDENT, TEACHER)
    got = dist_loss(student, teacher, temperature=temperature, beta=beta, gamma=gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_at_equality_and_positive_otherwise():
    teacher = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [-1.0, 0.5, 2.0]])
    assert dist_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # at T=4 the columns barely vary across the batch, so the correlation's eps shows
    assert dist_loss(teacher, teacher, temperature=4.0).item() == pytest.approx(0.0, abs=1e-4)
    student = teacher + torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    assert dist_loss(student, teacher).item() > 1e-3


def test_dist_intra_term_is_constant_for_a_batch_of_one():
    """As documented: one sample leaves every class without spread across the batch."""
    teacher = torch.tensor([[3.0, 1.0, 0.0]])
    assert dist_loss(teacher, teacher, gamma=1.0, temperature=2.0).item() == pytest.approx(4.0, rel=1e-6)
    assert dist_loss(teacher, teacher, gamma=0.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ls_matches_hand_computed_standardised_kd(temperature):
    def standardise(row):
        centred = [x - mean(row) for x in row]
        std = math.sqrt(sum(x * x for x in centred) / (len(row) - 1))  # Bessel-corrected
        return [x / (std + STD_EPS) for x in centred]

    kls = [kl(softmax(standardise(t), temperature), softmax(standardise(s), temperature))
           for s, t in zip(STUDENT, TEACHER)]
    expected = temperature**2 * mean(kls)
    student, teacher = tensors(STUDENT, TEACHER)
    assert ls_loss(student, teacher, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (3.0, -2.0), (0.25, 5.0)])
def test_ls_ignores_positive_affine_maps_of_the_teacher(scale, shift):
    teacher = torch.tensor(TEACHER)
    student = scale * teacher + shift
    assert ls_loss(student, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-5)
    # plain KD does see the difference (except for the identity)
    if scale != 1.0:
        assert kd_loss(student, teacher).item() > 1e-3


def test_ls_is_positive_when_not_a_positive_affine_copy():
    teacher = torch.tensor(TEACHER)
    assert ls_loss(-teacher, teacher).item() > 1e-3  # negative scale
    assert ls_loss(teacher + torch.tensor([0.0, 0.5, 0.0]), teacher).item() > 1e-3  # not affine
    assert ls_loss(torch.tensor(STUDENT), teacher).item() > 1e-3


def test_mse_by_hand_and_zero_at_equality():
    squares = [(s - t) ** 2 for srow, trow in zip(STUDENT, TEACHER) for s, t in zip(srow, trow)]
    student, teacher = tensors(STUDENT, TEACHER)
    assert mse_loss(student, teacher).item() == pytest.approx(mean(squares), rel=1e-6)
    assert mse_loss(teacher, teacher).item() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_every_loss_has_finite_gradients(name, scale):
    """Random logits, and very confident ones (scale 60) where 1 - p rounds to 0 in float32."""
    generator = torch.Generator().manual_seed(0)
    student = (scale * torch.randn(8, 10, generator=generator)).requires_grad_()
    teacher = (scale * torch.randn(8, 10, generator=generator)).requires_grad_()
    labels = torch.randint(0, 10, (8,), generator=generator)
    options = {"temperature": 2.0} if "temperature" in LOSS_OPTIONS[name] else {}
    loss = get_loss(name)(student, teacher, labels, **options)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_computes_in_float32(name):
    student, teacher, labels = tensors(STUDENT, TEACHER, LABELS)
    low = get_loss(name)(student.bfloat16(), teacher.bfloat16(), labels)
    full = get_loss(name)(student.bfloat16().float(), teacher.bfloat16().float(), labels)
    assert low.dtype == torch.float32
    assert low.item() == full.item()


def test_loss_options_name_each_loss_keywords_exactly():
    assert LOSS_OPTIONS.keys() == LOSSES.keys()
    for name, loss in LOSSES.items():
        parameters = list(inspect.signature(loss).parameters)
        assert parameters[:3] == ["student_logits", "teacher_logits", "labels"]
        assert tuple(parameters[3:]) == LOSS_OPTIONS[name]


def test_get_loss_finds_each_and_lists_the_names_for_an_unknown_one():
    assert get_loss("kd") is kd_loss
    assert all(get_loss(name) is loss for name, loss in LOSSES.items())
    with pytest.raises(ConfigError, match="unknown loss 'kld'; choose one of kd, dkd, dist, ls, mse"):
        get_loss("kld")
