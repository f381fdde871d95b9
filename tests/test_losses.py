"""The distillation losses against numbers worked out by hand in plain Python, their
defining identities and invariances, and finite gradients."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.config import FeatureSpec
from pipeline.losses import (
    FEATURE_LOSSES, FEATURE_OPTIONS, LOSS_OPTIONS, LOSSES, PEARSON_EPS, STD_EPS, alpha_loss, at_loss, dist_loss,
    dkd_loss, get_feature_loss, get_loss, hint_loss, kd_loss, ls_loss, mse_loss, rkd_loss, sp_loss,
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
    # a loss may treat the teacher's logits as constants (alpha's clipped gradient does)
    assert torch.isfinite(student.grad).all() and (teacher.grad is None or torch.isfinite(teacher.grad).all())
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
    with pytest.raises(ConfigError, match="unknown loss 'kld'; choose one of kd, dkd, dist, ls, mse, alpha"):
        get_loss("kld")


# --- AlphaNet's alpha-divergence ----------------------------------------------------------

def alpha_divergence(p, q, alpha):
    """D_alpha(p || q) = sum q ((p/q)^alpha - 1) / (alpha (alpha - 1)), plain Python."""
    return sum(qi * ((pi / qi) ** alpha - 1) for pi, qi in zip(p, q)) / (alpha * (alpha - 1))


@pytest.mark.parametrize("alpha_min, alpha_max", [(-1.0, 0.5), (-0.5, 2.0), (0.3, 0.7)])
def test_alpha_is_the_larger_alpha_divergence_by_hand(alpha_min, alpha_max):
    """No importance weight reaches the clip here, so the value is the paper's formula and
    the gradient that of the larger divergence, differentiated independently by autograd."""
    expected = mean([max(alpha_divergence(softmax(t), softmax(s), alpha_min),
                         alpha_divergence(softmax(t), softmax(s), alpha_max)) for s, t in zip(STUDENT, TEACHER)])
    student, teacher = tensors(STUDENT, TEACHER)
    student.requires_grad_()
    got = alpha_loss(student, teacher, alpha_min=alpha_min, alpha_max=alpha_max, clip=1e6)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    reference = student.detach().clone().requires_grad_()
    q, p = reference.softmax(-1), teacher.softmax(-1)
    divergences = torch.stack([(q * ((p / q) ** alpha - 1)).sum(-1) / (alpha * (alpha - 1))
                               for alpha in (alpha_min, alpha_max)])
    divergences.max(0).values.mean().backward()
    assert torch.allclose(student.grad, reference.grad, atol=1e-6)


def test_alpha_near_0_and_1_is_the_kl_either_way():
    """alpha -> 0 gives KL(q || p), alpha -> 1 gives KL(p || q): AlphaNet's default pair
    (-1, 1) is the larger of a chi-square divergence and KD's KL."""
    for s, t in zip(STUDENT, TEACHER):
        p, q = softmax(t), softmax(s)
        got = alpha_loss(torch.tensor([s]), torch.tensor([t]), alpha_min=0.0, alpha_max=1.0, clip=1e6).item()
        assert got == pytest.approx(max(kl(q, p), kl(p, q)), rel=1e-5)
        near = alpha_loss(torch.tensor([s]), torch.tensor([t]), alpha_min=0.999, alpha_max=0.999, clip=1e6).item()
        assert near == pytest.approx(kl(p, q), rel=1e-2)  # the formula tends to the limit
        default = alpha_loss(torch.tensor([s]), torch.tensor([t]), clip=1e6).item()
        assert default == pytest.approx(max(alpha_divergence(p, q, -1.0), kl(p, q)), rel=1e-5)
    assert alpha_loss(torch.tensor(TEACHER), torch.tensor(TEACHER)).item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_clips_the_importance_weights_in_the_gradient():
    """A student far too sure of class 0: for alpha = 2 the weights (p/q)^2 of the other
    classes are huge. Clipped at 5, the gradient is -sum_i q_i (w_i / alpha + 1/(alpha (alpha-1)))
    d log q_i, with w_i = min((p_i/q_i)^2, 5), worked out here in plain Python."""
    s, t, alpha, clip = [6.0, 0.0, 0.0], [0.0, 1.0, 0.5], 2.0, 5.0
    p, q = softmax(t), softmax(s)
    w = [min((pi / qi) ** alpha, clip) for pi, qi in zip(p, q)]
    pull = [qi * (wi / alpha + 1 / (alpha * (alpha - 1))) for qi, wi in zip(q, w)]
    # d log q_i / d s_j = [i == j] - q_j
    expected = [-sum(pull[i] * ((i == j) - q[j]) for i in range(3)) for j in range(3)]
    student = torch.tensor([s], requires_grad=True)
    value = alpha_loss(student, torch.tensor([t]), alpha_min=alpha, alpha_max=alpha, clip=clip)
    value.backward()
    assert student.grad[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert value.item() == pytest.approx(sum(qi * (wi - 1) for qi, wi in zip(q, w)) / 2, rel=1e-5)


def test_alpha_refuses_a_clip_that_is_not_positive():
    with pytest.raises(ConfigError, match="the alpha loss needs clip > 0, got 0"):
        alpha_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), clip=0)


# --- feature losses ------------------------------------------------------------------------

def test_hint_is_the_mean_squared_error():
    student, teacher = torch.arange(8.0).view(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    assert hint_loss(student, teacher).item() == pytest.approx(mean([(x - 1) ** 2 for x in range(8)]))
    assert hint_loss(teacher, teacher).item() == 0.0


def attention_map(feature, p):
    """Plain Python: per sample, the mean over channels of |a|^p at each position, over its L2 norm."""
    maps = []
    for sample in feature:
        positions = [sum(abs(channel[y][x]) ** p for channel in sample) / len(sample)
                     for y in range(len(sample[0])) for x in range(len(sample[0][0]))]
        norm = math.sqrt(sum(v * v for v in positions))
        maps.append([v / norm for v in positions])
    return maps


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_transfer_by_hand(p):
    student = [[[[1.0, -2.0], [0.0, 3.0]]], [[[0.5, 0.5], [1.0, -1.0]]]]  # 2 samples, 1 channel
    teacher = [[[[1.0, 0.0], [2.0, 1.0]], [[0.0, 1.0], [1.0, -1.0]], [[2.0, 2.0], [0.0, 0.0]]],
               [[[3.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, -2.0], [1.0, 0.0]]]]  # 3 channels
    expected = mean([(a - b) ** 2 for ms, mt in zip(attention_map(student, p), attention_map(teacher, p))
                     for a, b in zip(ms, mt)])
    assert at_loss(torch.tensor(student), torch.tensor(teacher), p=p).item() == pytest.approx(expected, rel=1e-5)


def test_attention_ignores_scale_and_channel_count():
    teacher = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    assert at_loss(7 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert at_loss(torch.cat([teacher, teacher], 1), teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert at_loss(torch.zeros(3, 2, 5, 5), teacher).item() > 0  # a blank map: finite, and not the teacher's


def test_similarity_preserving_against_numpy():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 3, 4, 4, generator=generator), torch.randn(5, 7, generator=generator)

    def normalised_gram(feature):
        flat = feature.reshape(len(feature), -1).astype(np.float64)
        gram = flat @ flat.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    expected = np.linalg.norm(normalised_gram(student.numpy()) - normalised_gram(teacher.numpy()), "fro") ** 2 / 25
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert sp_loss(3 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert sp_loss(student[:1], teacher[:1]).item() == 0.0  # one sample: nothing to relate


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_by_hand(student, teacher):
    """The distance and angle terms with loops over every pair and triple, plain Python."""
    def distances(points):
        d = [[math.dist(a, b) for b in points] for a in points]
        pairs = [d[i][j] for i in range(len(points)) for j in range(len(points)) if i != j]
        return [[x / mean(pairs) for x in row] for row in d]

    def angles(points):
        def unit(a, b):
            v = [y - x for x, y in zip(a, b)]
            n = math.sqrt(sum(c * c for c in v))
            return [c / n for c in v] if n else [0.0] * len(v)
        return [sum(x * y for x, y in zip(unit(pj, pi), unit(pj, pk))) for pj in points for pi in points for pk in points]

    ds, dt = distances(student), distances(teacher)
    distance = mean([huber(a - b) for rs, rt in zip(ds, dt) for a, b in zip(rs, rt)])
    angle = mean([huber(a - b) for a, b in zip(angles(student), angles(teacher))])
    return distance, angle


def test_rkd_by_hand():
    student = [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    teacher = [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [5.0, -1.0, 0.5]]
    distance, angle = rkd_by_hand(student, teacher)
    s, t = torch.tensor(student), torch.tensor(teacher)
    assert rkd_loss(s, t, distance_weight=1, angle_weight=0).item() == pytest.approx(distance, rel=1e-5)
    assert rkd_loss(s, t, distance_weight=0, angle_weight=1).item() == pytest.approx(angle, rel=1e-5)
    assert rkd_loss(s, t).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-5)


def test_rkd_ignores_scale_rotation_and_shift_and_needs_two_samples():
    teacher = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert rkd_loss(3 * teacher @ rotation + 5, teacher).item() == pytest.approx(0.0, abs=1e-4)
    single = torch.ones(1, 4, requires_grad=True)
    loss = rkd_loss(single, torch.zeros(1, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(single.grad, torch.zeros(1, 4))


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_every_feature_loss_has_finite_gradients_even_on_identical_samples(name):
    generator = torch.Generator().manual_seed(3)
    for student in (torch.randn(4, 3, 5, 5, generator=generator), torch.ones(4, 3, 5, 5)):
        student.requires_grad_()
        loss = FEATURE_LOSSES[name](student, torch.randn(4, 3, 5, 5, generator=generator))
        assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(student.grad).all()


def test_feature_options_name_each_loss_keywords_exactly():
    assert FEATURE_OPTIONS.keys() == FEATURE_LOSSES.keys()
    for name, loss in FEATURE_LOSSES.items():
        parameters = list(inspect.signature(loss).parameters)
        assert parameters[:2] == ["student_feature", "teacher_feature"]
        assert tuple(parameters[2:]) == FEATURE_OPTIONS[name]


def test_get_feature_loss_binds_options_and_refuses_unknown_names_and_options():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    assert get_feature_loss("rkd", {"angle_weight": 0.0})(s, t).item() == rkd_loss(s, t, angle_weight=0.0).item()
    with pytest.raises(ConfigError, match="unknown feature loss 'fitnet'; choose one of hint, at, sp, rkd"):
        get_feature_loss("fitnet", {})
    with pytest.raises(ConfigError, match=r"the sp feature loss has no option 'p' \(its options: none\)"):
        get_feature_loss("sp", {"p": 2.0})


@pytest.mark.parametrize("text, expected", [
    ("hint:layer3", FeatureSpec("hint", "layer3", "layer3")),
    ("at:layer3.1:features.6@500", FeatureSpec("at", "layer3.1", "features.6", 500.0)),
    ("rkd:fc@0.5,angle_weight=0,distance_weight=10",
     FeatureSpec("rkd", "fc", "fc", 0.5, {"angle_weight": 0.0, "distance_weight": 10.0})),
])
def test_feature_spec_parses_loss_modules_weight_and_options(text, expected):
    assert FeatureSpec.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("hint", "must be LOSS:TEACHER_MODULE"), ("hint::fc", "must be LOSS:TEACHER_MODULE"),
    ("a:b:c:d", "must be LOSS:TEACHER_MODULE"), ("hint:fc@", "must be LOSS:TEACHER_MODULE"),
    ("hint:fc@heavy", "'heavy' is not a number"), ("at:fc,p=two", "'two' is not a number"),
    ("sp:fc@-1", "must be a finite number > 0"), ("sp:fc@nan", "must be a finite number > 0"),
])
def test_feature_spec_refuses_malformed_values(text, message):
    with pytest.raises(ConfigError, match=message):
        FeatureSpec.parse(text)


def test_feature_names_say_which_modules():
    assert FeatureSpec.parse("hint:8@2").name == "hint:8"
    assert FeatureSpec.parse("sp:layer4:features.7").name == "sp:layer4:features.7"
