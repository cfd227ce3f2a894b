"""Tests for the evaluation attacks and suite (SPEC section 9).

Covers `art_reat.attacks.adaptive` (CW margin loss, logit-scaled PGD), `art_reat.attacks.registry`
(attack names, threat models), `art_reat.attacks.autoattack` (standard AutoAttack over
`pyautoattack`), `art_reat.evaluation.suite` (run_suite with per-chunk resume, audit) and
`art_reat.evaluation.evaluate.suite_metrics`.

Oracles: naive float64 loops for the losses and their input gradients; the exact L-inf robustness
of a linear classifier (the worst case over the eps-box intersected with [0, 1] is separable per
coordinate, so it is a closed form); a hand-built cosine classifier whose plain CE gradient points
away from the nearest decision boundary while the logit-scaled one points at it.

Everything runs on the CPU with one intra-op thread (standard AutoAttack is ~20x slower with two
threads on a busy 2-core machine).
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

from art_reat.attacks import (CWMarginPGD, LogitScaledPGD, StandardAutoAttack, TensorPGD, ThreatModel, build_attack,
                              cw_margin_loss, parse_attack)
from art_reat.data import class_groups
from art_reat.errors import UsageError
from art_reat.estimators import LongTailClassifier
from art_reat.evaluation import suite as suite_module
from art_reat.evaluation.evaluate import AttackConfig, suite_metrics
from art_reat.evaluation.metrics import accuracy_report
from art_reat.evaluation.suite import SuiteResult, audit, run_suite
from art_reat.models import CosineClassifier

SHAPE = (3, 4, 4)
D = int(np.prod(SHAPE))
EPS = 8 / 255
STEP = 2 / 255
C = 10


# one torch thread for the module (tests/conftest.py): small ops on 2 busy cores run far faster
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers


def clf(model: nn.Module, nb_classes: int = C) -> LongTailClassifier:
    return LongTailClassifier(model, nn.CrossEntropyLoss(), nb_classes, input_shape=SHAPE)


def linear_model(num_classes: int = C, seed: int = 0, scale: float = 1.0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, num_classes)).to(dtype)
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model.eval()


def wb(model: nn.Sequential):
    lin = model[1]
    return lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()


def worst_margins(W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """Naive float64: min over j != y and over the eps-box within [0, 1] of z_y - z_j, per sample.

    For a linear model the inner minimum is separable: each coordinate takes the end of its
    feasible interval [max(-eps, -x_k), min(eps, 1 - x_k)] that lowers (w_y - w_j)_k * delta_k.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    out = []
    for i in range(len(x)):
        yi = int(y[i])
        best = math.inf
        for j in range(W.shape[0]):
            if j == yi:
                continue
            m = b[yi] - b[j]
            for k in range(x.shape[1]):
                d = W[yi, k] - W[j, k]
                lo, hi = max(-eps, -x[i, k]), min(eps, 1.0 - x[i, k])
                m += d * x[i, k] + min(d * lo, d * hi)
            best = min(best, m)
        out.append(best)
    return np.array(out)


def naive_report(correct: np.ndarray, y: np.ndarray, num_classes: int, groups=None) -> dict:
    """Overall, per-class and group (mean of per-class) accuracy with plain loops."""
    per_class = []
    for c in range(num_classes):
        hits = [bool(correct[i]) for i in range(len(y)) if int(y[i]) == c]
        per_class.append(sum(hits) / len(hits) if hits else float("nan"))
    report = {"overall": sum(bool(v) for v in correct) / len(correct), "per_class": per_class}
    if groups:
        report["groups"] = {}
        for name, cls in groups.items():
            vals = [per_class[c] for c in cls if not math.isnan(per_class[c])]
            report["groups"][name] = sum(vals) / len(vals) if vals else float("nan")
    return report


def assert_report_close(got: dict, want: dict, tol: float = 1e-12) -> None:
    assert got["overall"] == pytest.approx(want["overall"], abs=tol)
    assert len(got["per_class"]) == len(want["per_class"])
    for g, w in zip(got["per_class"], want["per_class"]):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=tol), (got, want)
    assert set(got.get("groups", {})) == set(want.get("groups", {}))
    for name, w in want.get("groups", {}).items():
        g = got["groups"][name]
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=tol), (name, got, want)


def pick_separated(model: nn.Sequential, n_robust: int, n_broken: int, seed: int, gap: float,
                   eps: float = EPS):
    """Float inputs (NCHW, float32) correctly classified, n_robust with worst-case margin > gap and
    n_broken with worst-case margin < -gap (far from the boundary: float32 cannot change the verdict)."""
    W, b = wb(model)
    rng = np.random.RandomState(seed)
    pool = rng.rand(400, *SHAPE).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(pool)).argmax(1).numpy()
    m = worst_margins(W, b, pool, y, eps)
    robust = np.flatnonzero(m > gap)[:n_robust]
    broken = np.flatnonzero(m < -gap)[:n_broken]
    assert len(robust) == n_robust and len(broken) == n_broken, "pool too small for the requested split"
    idx = np.concatenate([robust, broken])
    return pool[idx], y[idx], m[idx]


# ----------------------------------------------------------------------------- 1. losses and gradients


def naive_cw(logits: np.ndarray, y: np.ndarray, kappa: float) -> list:
    out = []
    for i in range(logits.shape[0]):
        true = float(logits[i, y[i]])
        other = -math.inf
        for j in range(logits.shape[1]):
            if j != y[i]:
                other = max(other, float(logits[i, j]))
        out.append(-max(true - other + kappa, 0.0))
    return out


def cw_cases():
    rng = np.random.RandomState(0)
    logits = rng.randn(12, 5) * 30
    y = rng.randint(0, 5, size=12)
    ties = np.array([
        [2.0, 2.0, 1.0, 0.0, -1.0],  # true class ties with the best other class (margin 0)
        [1.0, 3.0, 3.0, 0.0, 0.0],  # two wrong classes tie for the max
        [5.0, 5.0, 5.0, 5.0, 5.0],  # everything tied
        [-60.0, 0.0, -1.0, -2.0, 0.0],  # margin far below -kappa: clamped to 0
        [70.0, 0.0, 0.0, 0.0, 0.0],  # margin above kappa: positive hinge
    ])
    logits = np.concatenate([logits, ties])
    y = np.concatenate([y, [0, 0, 3, 0, 0]])
    return logits, y


@pytest.mark.parametrize("kappa", [0.0, 50.0])
def test_cw_margin_loss_matches_naive_float64_loop(kappa):
    logits, y = cw_cases()
    want = naive_cw(logits, y, kappa)
    got = cw_margin_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(y), kappa)
    assert got.shape == (len(y),)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # float32 logits: same values to float32 precision
    got32 = cw_margin_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(y), kappa)
    np.testing.assert_allclose(got32.double().numpy(), want, rtol=1e-6, atol=1e-4)


def test_cw_margin_loss_default_kappa_is_50():
    logits, y = cw_cases()
    got = cw_margin_loss(torch.tensor(logits), torch.tensor(y))
    np.testing.assert_allclose(got.numpy(), naive_cw(logits, y, 50.0), rtol=0, atol=1e-12)
    assert CWMarginPGD(clf(linear_model())).kappa == 50.0


def naive_scaled_ce(logits: np.ndarray, y: np.ndarray, alpha: float) -> float:
    total = 0.0
    for i in range(logits.shape[0]):
        s = [alpha * float(v) for v in logits[i]]
        m = max(s)
        total += -s[int(y[i])] + m + math.log(sum(math.exp(v - m) for v in s))
    return total


@pytest.mark.parametrize("alpha", [0.5, 1.0, 10.0, 100.0])
def test_logit_scaled_loss_is_ce_of_alpha_times_logits(alpha):
    rng = np.random.RandomState(1)
    logits = rng.randn(9, C) * 3
    y = rng.randint(0, C, size=9)
    attack = LogitScaledPGD(clf(linear_model()), alpha=alpha)
    got = attack.attack_loss(torch.tensor(logits), torch.tensor(y))
    assert got.dim() == 0
    assert float(got) == pytest.approx(naive_scaled_ce(logits, y, alpha), rel=1e-10)


@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_logit_scaled_input_gradient_matches_naive_linear_formula(alpha):
    """d/dx CE(alpha (W x + b), y) = W^T alpha (softmax(alpha z) - e_y), with float64 loops."""
    model = linear_model(dtype=torch.float64, scale=4.0)
    W, b = wb(model)
    rng = np.random.RandomState(2)
    x = rng.rand(5, *SHAPE)
    y = rng.randint(0, C, size=5)
    attack = LogitScaledPGD(clf(model), alpha=alpha)
    got = attack.input_gradient(torch.tensor(x), torch.tensor(y)).numpy().reshape(5, -1)
    flat = x.reshape(5, -1)
    for i in range(5):
        z = [alpha * (sum(W[c, k] * flat[i, k] for k in range(D)) + b[c]) for c in range(C)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        p = [v / sum(e) for v in e]
        coef = [alpha * (p[c] - (1.0 if c == y[i] else 0.0)) for c in range(C)]
        want = [sum(coef[c] * W[c, k] for c in range(C)) for k in range(D)]
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)


def test_cw_input_gradient_matches_naive_linear_formula():
    """Active hinge: d/dx of -(z_y - z_j* + kappa) is w_j* - w_y; inactive (margin < -kappa): 0."""
    model = linear_model(dtype=torch.float64, scale=4.0)
    W, b = wb(model)
    rng = np.random.RandomState(3)
    x = rng.rand(6, *SHAPE)
    with torch.no_grad():
        logits = model(torch.tensor(x)).numpy()
    y = logits.argmax(1)  # half correctly classified (active hinge even at kappa 0), half not
    y[3:] = (y[3:] + 1 + rng.randint(0, C - 1, size=3)) % C
    for kappa in (0.0, 50.0):
        attack = CWMarginPGD(clf(model), kappa=kappa)
        got = attack.input_gradient(torch.tensor(x), torch.tensor(y)).numpy().reshape(6, -1)
        for i in range(6):
            others = [(logits[i, j], j) for j in range(C) if j != y[i]]
            top, jstar = max(others)
            active = logits[i, y[i]] - top + kappa > 0
            want = [(W[jstar, k] - W[y[i], k]) if active else 0.0 for k in range(D)]
            np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)
        if kappa == 0.0:  # the sample set must contain both hinge states, or the test proves little
            states = {bool(logits[i, y[i]] - max(logits[i, j] for j in range(C) if j != y[i]) > 0) for i in range(6)}
            assert states == {True, False}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_logit_scaled_pgd_with_alpha_1_is_bitwise_plain_pgd(norm):
    model = MLP().eval()
    x = torch.rand(12, *SHAPE, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, C, (12,), generator=torch.Generator().manual_seed(8))
    eps, step = (EPS, STEP) if norm == np.inf else (0.5, 0.1)
    plain = TensorPGD(clf(model), norm=norm, eps=eps, eps_step=step, max_iter=7)
    scaled = LogitScaledPGD(clf(model), alpha=1.0, norm=norm, eps=eps, eps_step=step, max_iter=7)
    a = plain.perturb(x, y, generator=torch.Generator().manual_seed(11))
    b = scaled.perturb(x, y, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    # and alpha does reach the attack: alpha = 10 takes a different path on this model
    c = LogitScaledPGD(clf(model), alpha=10.0, norm=norm, eps=eps, eps_step=step, max_iter=7).perturb(
        x, y, generator=torch.Generator().manual_seed(11))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("norm, eps, step", [(np.inf, EPS, STEP), (2, 0.5, 0.1)])
def test_cw_pgd_stays_in_the_eps_ball_and_the_unit_box(norm, eps, step):
    model = MLP().eval()
    g = torch.Generator().manual_seed(9)
    x = torch.rand(32, *SHAPE, generator=g)
    x[:8] = 0.0  # on the box's faces: clipping must act
    x[8:16] = 1.0
    x[16:20] = (torch.rand(4, *SHAPE, generator=g) > 0.5).float()
    y = torch.randint(0, C, (32,), generator=g)
    attack = CWMarginPGD(clf(model), norm=norm, eps=eps, eps_step=step, max_iter=10)
    x_adv = attack.perturb(x, y, generator=torch.Generator().manual_seed(1))
    delta = (x_adv - x).flatten(1)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    size = delta.abs().amax(1) if norm == np.inf else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all(), size.max()
    assert (size > eps / 2).float().mean() > 0.5  # it moves (not a no-op)
    # the numpy interface gives the same guarantees
    out = attack.generate(x.numpy(), y.numpy())
    assert out.dtype == np.float32 and out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    d = (out - x.numpy()).reshape(32, -1)
    size = np.abs(d).max(1) if norm == np.inf else np.linalg.norm(d, axis=1)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all()


def test_cw_kappa_reaches_the_attack():
    """kappa = 0: a misclassified point has a zero CW gradient, so PGD (no random start) leaves it
    where it is; kappa = 50 keeps the hinge active and moves it to the corner of the eps-box."""
    model = linear_model(num_classes=2, seed=3)
    W, b = wb(model)
    rng = np.random.RandomState(4)
    x = torch.tensor(rng.uniform(0.2, 0.8, size=(20, *SHAPE)), dtype=torch.float32)
    with torch.no_grad():
        wrong = 1 - model(x).argmax(1)  # label every point with the class it is NOT predicted as
    lazy = CWMarginPGD(clf(model, 2), kappa=0.0, random_start="none", max_iter=6).perturb(x, wrong)
    assert torch.equal(lazy, x)
    busy = CWMarginPGD(clf(model, 2), kappa=50.0, random_start="none", max_iter=6).perturb(x, wrong)
    # the steepest descent of z_y - z_other: x - eps * sign(w_y - w_other), inside [0, 1] here
    sign = np.sign(W[wrong.numpy()] - W[1 - wrong.numpy()])
    want = x.numpy().reshape(20, -1) - EPS * sign
    np.testing.assert_allclose(busy.numpy().reshape(20, -1), want, atol=1e-6)


def test_adaptive_attack_parameters_are_checked():
    with pytest.raises(UsageError, match="scale"):
        LogitScaledPGD(clf(linear_model()), alpha=0.0)
    with pytest.raises(UsageError, match="scale"):
        LogitScaledPGD(clf(linear_model()), alpha=-2.0)
    with pytest.raises(UsageError, match="kappa"):
        CWMarginPGD(clf(linear_model()), kappa=-1.0)


# ----------------------------------------------------------------------------- 2. names and threat models


@pytest.mark.parametrize("name, family, steps, scale", [
    ("pgd20", "pgd", 20, None),
    ("pgd100", "pgd", 100, None),
    ("pgd100-x10", "pgd", 100, 10.0),
    ("pgd20-x2.5", "pgd", 20, 2.5),
    ("cw100", "cw", 100, None),
    ("aa", "aa", None, None),
])
def test_parse_attack_valid_names(name, family, steps, scale):
    spec = parse_attack(name)
    assert (spec.name, spec.family, spec.steps, spec.scale) == (name, family, steps, scale)


@pytest.mark.parametrize("name", [
    "foo", "pgd", "aa5", "pgd0", "cw0", "", "pgd-20", "pgd20-x", "aa-x10", "pgd20x10",
    "cw100-x10",
    "pgd20-x0",
])
def test_parse_attack_rejects_bad_names_and_says_what_is_allowed(name):
    with pytest.raises(UsageError) as info:
        parse_attack(name)
    message = str(info.value)
    assert repr(name) in message
    for allowed in ("pgdN", "cwN", "aa", "-xA"):
        assert allowed in message


@pytest.mark.parametrize("name", ["cw100-x10", "pgd20-x0"])
def test_build_attack_rejects_what_parse_attack_lets_through(name):
    with pytest.raises(UsageError, match=re.escape(name) if name.startswith("cw") else "scale"):
        build_attack(name, clf(linear_model()), ThreatModel.for_norm())


@pytest.mark.parametrize("name", ["cw100-x10", "pgd20-x0"])
def test_attack_config_validate_rejects_unbuildable_names_early(name):
    with pytest.raises(UsageError):
        AttackConfig(run_id="r", attacks=["pgd20", name]).validate()


@pytest.mark.parametrize("name, cls, extra", [
    ("pgd20", TensorPGD, {}),
    ("pgd100-x10", LogitScaledPGD, {"alpha": 10.0}),
    ("cw100", CWMarginPGD, {"kappa": 50.0}),
    ("aa", StandardAutoAttack, {}),
])
def test_build_attack_builds_the_named_attack_with_the_threat_model(name, cls, extra):
    threat = ThreatModel.for_norm("linf", 4 / 255, 1 / 255)
    attack = build_attack(name, clf(linear_model()), threat, batch_size=7, seed=3)
    assert type(attack) is cls
    assert float(attack.eps) == pytest.approx(4 / 255)
    if cls is StandardAutoAttack:
        assert attack.norm == "linf" and attack.seed == 3
    else:
        assert attack.max_iter == int(re.match(r"[a-z]+(\d+)", name).group(1))
        assert float(attack.eps_step) == pytest.approx(1 / 255)
        assert attack.norm == np.inf
        assert attack.random_start == "uniform"
    for key, value in extra.items():
        assert getattr(attack, key) == value
    l2 = build_attack("pgd20" if name != "aa" else "aa", clf(linear_model()), ThreatModel.for_norm("l2"))
    assert (l2.norm in (2, 2.0)) if name != "aa" else l2.norm == "l2"


def test_threat_model_defaults():
    linf = ThreatModel.for_norm()
    assert (linf.norm, linf.eps, linf.step) == ("linf", pytest.approx(8 / 255), pytest.approx(2 / 255))
    assert ThreatModel.for_norm("linf") == linf
    l2 = ThreatModel.for_norm("l2")
    assert (l2.norm, l2.eps, l2.step) == ("l2", pytest.approx(1.0), pytest.approx(0.2))
    # a given eps sets the default step: eps / 4 (linf), eps / 5 (l2)
    assert ThreatModel.for_norm("linf", 4 / 255).step == pytest.approx(1 / 255)
    assert ThreatModel.for_norm("l2", 0.5).step == pytest.approx(0.1)
    assert ThreatModel.for_norm("l2", 0.5, 0.3).step == pytest.approx(0.3)
    assert linf.art_norm == np.inf and l2.art_norm == 2


@pytest.mark.parametrize("norm, eps, step, pattern", [
    ("l1", None, None, r"norm 'l1'.*linf, l2"),
    ("Linf", None, None, r"norm 'Linf'"),
    ("linf", 0.0, None, r"eps 0\.0"),
    ("linf", -0.1, None, r"eps -0\.1"),
    ("linf", 1.5, None, r"eps 1\.5"),
    ("linf", float("nan"), None, r"eps nan"),
    ("l2", 0.0, None, r"eps 0\.0"),
    ("l2", -1.0, None, r"eps -1\.0"),
    ("linf", None, 0.0, r"step size 0\.0"),
    ("l2", None, -0.2, r"step size -0\.2"),
])
def test_threat_model_errors(norm, eps, step, pattern):
    with pytest.raises(UsageError, match=pattern):
        ThreatModel.for_norm(norm, eps, step)


def test_l2_radius_above_one_accepted_by_the_threat_model_builds_and_is_respected():
    """ThreatModel allows any L2 eps > 0 (only L-inf is capped at 1), and so must TensorPGD's own check."""
    threat = ThreatModel.for_norm("l2", 1.5)
    assert threat.step == pytest.approx(0.3)
    attack = build_attack("pgd20", clf(MLP().eval()), threat)
    assert float(attack.eps) == 1.5
    x = torch.full((4, *SHAPE), 0.5)
    x_adv = attack.perturb(x, torch.arange(4), generator=torch.Generator().manual_seed(0))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= 1.5 * (1 + 1e-5)).all() and (norms > 1.0).any()


# ----------------------------------------------------------------------------- 3. logit scaling vs a cosine classifier

# A scale-invariant classifier with bounded logits (scale-1 cosine, |z| <= 1). The features are
# f(x) = (1, t) with t = A * sum(x - 1/2), so the feature angle is theta = atan(t); class c has the
# unit weight vector at angle PHI[c]: class 0 at 0 deg, class 1 at +60 deg (the nearest rival:
# boundary at theta = +30 deg) and eight classes near -100 deg (boundaries near -50 deg).
# Every input coordinate moves theta the same way, so an L-inf PGD step is +eps or -eps on every
# pixel, as the sign of dCE/dtheta says. With alpha = 1 the softmax is nearly flat and the eight far
# classes outweigh class 1: the gradient pushes theta DOWN, to the far boundary, which the eps-box
# cannot reach (A * D * eps = REACH = 0.9 < tan 50 deg). With alpha = 10 the softmax concentrates on
# class 1: the gradient pushes theta UP, across +30 deg (tan 30 deg = 0.577 < 0.9).
REACH = 0.9
A_TOY = REACH / (D * EPS)
PHI = [0.0, 60.0] + [-100.0 - 2.0 * k for k in range(8)]


class CosineToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = CosineClassifier(2, C, gamma=0.0)
        with torch.no_grad():
            rad = torch.tensor([math.radians(a) for a in PHI])
            self.head.weight.copy_(torch.stack([rad.cos(), rad.sin()], 1))

    def forward(self, x):
        t = A_TOY * (x.flatten(1) - 0.5).sum(1)
        return self.head(torch.stack([torch.ones_like(t), t], 1))


def toy_logits64(t: float) -> list:
    theta = math.atan(t)
    return [math.cos(theta - math.radians(p)) for p in PHI]


def toy_points(n: int = 12, seed: int = 0):
    """Class-0 points with t in [-0.15, 0.15], pixels within [0.3, 0.7] (no clipping by [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.15 * (2 * torch.rand(n, *SHAPE, generator=g) - 1)
    t0 = torch.linspace(-0.15, 0.15, n)
    x = x - (x.flatten(1) - 0.5).mean(1).view(-1, 1, 1, 1) + (t0 / (A_TOY * D)).view(-1, 1, 1, 1)
    return x.float(), torch.zeros(n, dtype=torch.long)


def test_cosine_toy_premises_in_float64():
    """The design, checked with naive float64 formulas (not with the code under test)."""
    def pred(t):
        z = toy_logits64(t)
        return max(range(C), key=lambda c: z[c])

    def dce_dt(t, alpha, y=0, h=1e-6):
        def ce(tt):
            s = [alpha * v for v in toy_logits64(tt)]
            m = max(s)
            return -s[y] + m + math.log(sum(math.exp(v - m) for v in s))
        return (ce(t + h) - ce(t - h)) / (2 * h)

    for t0 in np.linspace(-0.15, 0.15, 7):
        assert pred(t0) == 0
        assert pred(t0 - REACH) == 0  # the far boundary is out of reach: plain PGD cannot win
        assert pred(t0 + REACH) == 1  # the near boundary is within reach
        z = toy_logits64(t0)
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        assert max(p) < 0.3  # bounded logits: a nearly flat softmax at alpha = 1
    for t in np.linspace(-0.15 - REACH, 0.15, 41):  # along plain PGD's whole path
        assert dce_dt(t, 1.0) < 0
    for t in np.linspace(-0.15, 0.15 + REACH, 41):  # along the scaled attack's whole path
        assert dce_dt(t, 10.0) > 0


def test_cosine_toy_model_matches_the_float64_formula():
    model = CosineToy().eval()
    x, _ = toy_points()
    t = (A_TOY * (x.double().flatten(1) - 0.5).sum(1)).tolist()
    with torch.no_grad():
        z = model(x).double().numpy()
    for i, ti in enumerate(t):
        np.testing.assert_allclose(z[i], toy_logits64(ti), atol=1e-5)
    assert z.min() >= -1 and z.max() <= 1


def test_logit_scaling_breaks_the_cosine_toy_that_plain_pgd_cannot():
    model = CosineToy().eval()
    x, y = toy_points()
    classifier = clf(model)
    plain = TensorPGD(classifier, eps=EPS, eps_step=STEP, max_iter=20).perturb(
        x, y, generator=torch.Generator().manual_seed(0))
    scaled = LogitScaledPGD(classifier, alpha=10.0, eps=EPS, eps_step=STEP, max_iter=20).perturb(
        x, y, generator=torch.Generator().manual_seed(0))
    # where the analysis says each attack ends: every pixel at -eps (plain) or +eps (scaled)
    np.testing.assert_allclose((plain - x).numpy(), -EPS, atol=1e-6)
    np.testing.assert_allclose((scaled - x).numpy(), EPS, atol=1e-6)
    with torch.no_grad():
        assert (model(plain).argmax(1) == 0).all()
        assert (model(scaled).argmax(1) == 1).all()

    # the same through the suite: robust accuracy 100% under PGD-20, 0% under PGD-20 on CE(10 z)
    result = run_suite(classifier, x.numpy(), y.numpy(), ["pgd20", "pgd20-x10"], ThreatModel.for_norm(), C,
                       batch_size=5)
    assert list(result.reports) == ["clean", "pgd20", "pgd20-x10"]
    assert result.reports["clean"]["overall"] == 1.0
    assert result.reports["pgd20"]["overall"] == 1.0
    assert result.reports["pgd20-x10"]["overall"] == 0.0
    assert suite_metrics(result)["robust_acc_drop/pgd20-x10"] == 1.0


# ----------------------------------------------------------------------------- 4. run_suite and resume


def uint8_images(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, 4, 4, 3)).astype(np.uint8)


def as_float(x_uint8: np.ndarray) -> np.ndarray:
    return x_uint8.transpose(0, 3, 1, 2).astype(np.float64) / 255.0


def test_run_suite_reports_match_naive_accuracy_and_exact_linear_robustness():
    """Two classes, linear model: every PGD variant (CE, CE(10 z), CW) with >= 8 steps of eps/4 ends
    at the exact worst case, the eps-box corner; so each report equals the naive float64 one."""
    model = linear_model(num_classes=2, seed=1, scale=2.0)
    W, b = wb(model)
    rng = np.random.RandomState(5)
    x = rng.randint(0, 256, size=(200, 4, 4, 3)).astype(np.uint8)
    with torch.no_grad():
        pred = model(torch.tensor(as_float(x), dtype=torch.float32)).argmax(1).numpy()
    y = np.where(rng.rand(200) < 0.8, pred, 1 - pred)  # 80% clean accuracy
    m = worst_margins(W, b, as_float(x), y, EPS)
    clean_m = []
    for i in range(200):  # clean margin z_y - z_other, naive
        f = as_float(x[i:i + 1]).reshape(-1)
        zy = b[y[i]] + sum(W[y[i], k] * f[k] for k in range(D))
        zo = b[1 - y[i]] + sum(W[1 - y[i], k] * f[k] for k in range(D))
        clean_m.append(zy - zo)
    clean_m = np.array(clean_m)
    keep = (np.abs(m) > 1e-3) & (np.abs(clean_m) > 1e-3)
    x, y, m, clean_m = x[keep][:60], y[keep][:60], m[keep][:60], clean_m[keep][:60]
    assert 0 < (m > 0).sum() < (clean_m > 0).sum() < len(y)  # a non-trivial mix
    groups = {"zero": [0], "one": [1]}

    result = run_suite(clf(model, 2), x, y, ["pgd10", "pgd20-x10", "cw12"], ThreatModel.for_norm(), 2,
                       groups=groups, batch_size=16)
    assert list(result.reports) == ["clean", "pgd10", "pgd20-x10", "cw12"]
    assert result.n_samples == len(y)
    assert_report_close(result.reports["clean"], naive_report(clean_m > 0, y, 2, groups))
    for name in ("pgd10", "pgd20-x10", "cw12"):
        assert_report_close(result.reports[name], naive_report(m > 0, y, 2, groups))
    assert result.to_dict()["reports"] is result.reports
    assert result.to_dict()["n_samples"] == len(y)


class PerturbLog:
    """Wraps TensorPGD.perturb (inherited by every PGD variant): records (class, chunk seed, size)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = []
        original = TensorPGD.perturb
        log = self

        def perturb(attack, x, y, generator=None):
            log.calls.append((type(attack).__name__, generator.initial_seed(), len(x)))
            return original(attack, x, y, generator=generator)

        monkeypatch.setattr(TensorPGD, "perturb", perturb)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


class Interrupt:
    def __init__(self, attack: str, after: int) -> None:
        self.attack, self.after, self.seen = attack, after, []

    def __call__(self, name, done, total):
        self.seen.append((name, done, total))
        if name == self.attack and done == self.after:
            raise KeyboardInterrupt


def assert_same_reports(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert_report_close(a[name], b[name], tol=0)


def test_run_suite_resumes_an_interrupted_evaluation_without_redoing_finished_chunks(tmp_path, monkeypatch):
    model = MLP().eval()
    classifier = clf(model)
    x = uint8_images(40, seed=1)
    y = np.arange(40) % C
    threat = ThreatModel.for_norm()
    attacks = ["pgd3", "cw3"]
    log = PerturbLog(monkeypatch)
    common = dict(groups=class_groups(C), batch_size=8, seed=5)

    reference = run_suite(classifier, x, y, attacks, threat, C, **common)
    assert log.take() == [("TensorPGD", 5 + i, 8) for i in range(5)] + [("CWMarginPGD", 5 + i, 8) for i in range(5)]

    state = tmp_path / "state"
    model.train()  # the suite evaluates in eval mode and must restore the mode, even when interrupted
    stop = Interrupt("cw3", after=16)
    with pytest.raises(KeyboardInterrupt):
        run_suite(classifier, x, y, attacks, threat, C, state_dir=state, on_chunk=stop, **common)
    assert model.training
    model.eval()
    assert stop.seen[-1] == ("cw3", 16, 40)
    assert [c[:2] for c in log.take()] == [("TensorPGD", 5 + i) for i in range(5)] + [("CWMarginPGD", 5), ("CWMarginPGD", 6)]
    files = sorted(p.name for p in state.iterdir())
    assert len(files) == 2 and files[0].startswith("cw3-") and files[1].startswith("pgd3-")
    assert not any(".tmp" in f for f in files)

    resumed = run_suite(classifier, x, y, attacks, threat, C, state_dir=state, **common)
    assert log.take() == [("CWMarginPGD", 5 + i, 8) for i in (2, 3, 4)]  # only the unfinished chunks
    assert_same_reports(resumed.reports, reference.reports)

    again = run_suite(classifier, x, y, attacks, threat, C, state_dir=state, **common)
    assert log.take() == []  # everything finished: nothing recomputed
    assert_same_reports(again.reports, reference.reports)
    assert sorted(p.name for p in state.iterdir()) == files


@pytest.mark.parametrize("change", ["seed", "subset", "labels", "threat", "identity"])
def test_run_suite_state_is_not_reused_for_a_different_evaluation(tmp_path, monkeypatch, change):
    model = MLP().eval()
    classifier = clf(model)
    x = uint8_images(24, seed=2)
    y = np.arange(24) % C
    threat = ThreatModel.for_norm()
    base = dict(groups=None, batch_size=8, seed=0, state_dir=tmp_path, identity={"checkpoint": "a.pt"})
    log = PerturbLog(monkeypatch)
    run_suite(classifier, x, y, ["pgd2"], threat, C, **base)
    log.take()
    before = set(p.name for p in tmp_path.iterdir())

    args = dict(x=x, y=y, threat=threat)
    kwargs = dict(base)
    if change == "seed":
        kwargs["seed"] = 1
    elif change == "subset":
        args["x"], args["y"] = x[:16], y[:16]
    elif change == "labels":
        args["y"] = (y + 1) % C
    elif change == "threat":
        args["threat"] = ThreatModel.for_norm("linf", 4 / 255)
    else:
        kwargs["identity"] = {"checkpoint": "b.pt"}
    fresh = run_suite(classifier, args["x"], args["y"], ["pgd2"], args["threat"], C, **kwargs)
    calls = log.take()
    assert len(calls) == len(args["y"]) // 8  # every chunk computed anew
    assert len(set(p.name for p in tmp_path.iterdir()) - before) == 1  # a new key, a new file
    unsaved = run_suite(classifier, args["x"], args["y"], ["pgd2"], args["threat"], C,
                        **{**kwargs, "state_dir": None})
    assert_same_reports(fresh.reports, unsaved.reports)


def test_run_suite_state_is_not_reused_for_different_images_with_the_same_labels(tmp_path):
    model = linear_model(num_classes=2, seed=1, scale=2.0)
    W, b = wb(model)
    classifier = clf(model, 2)
    x = uint8_images(64, seed=3)
    with torch.no_grad():
        y = model(torch.tensor(as_float(x), dtype=torch.float32)).argmax(1).numpy()
    # the same labels on images that are all robust: the worst-case margin grows by moving each
    # pixel eps-far from the corner the attack would use (x <- x + 3 eps sign(w_y - w_other))
    shift = 3 * EPS * np.sign(W[y] - W[1 - y]).reshape(64, 3, 4, 4).transpose(0, 2, 3, 1)
    x2 = np.clip(np.rint((x / 255.0 + shift) * 255), 0, 255).astype(np.uint8)
    assert not np.array_equal(x, x2)
    kwargs = dict(batch_size=16, seed=0, state_dir=tmp_path, identity={"checkpoint": "same.pt"})
    first = run_suite(classifier, x, y, ["pgd10"], ThreatModel.for_norm(), 2, **kwargs)
    second = run_suite(classifier, x2, y, ["pgd10"], ThreatModel.for_norm(), 2, **kwargs)
    truth = run_suite(classifier, x2, y, ["pgd10"], ThreatModel.for_norm(), 2, **{**kwargs, "state_dir": None})
    assert first.reports["pgd10"]["overall"] != truth.reports["pgd10"]["overall"]  # the test can tell
    assert second.reports["pgd10"]["overall"] == truth.reports["pgd10"]["overall"]


# ----------------------------------------------------------------------------- 5. audit


def test_audit_flags_the_cosine_toy_for_gradient_masking():
    model = CosineToy().eval()
    x, y = toy_points(n=6)
    result = audit(clf(model), x.numpy(), y.numpy(), ThreatModel.for_norm(), C, batch_size=6)
    assert list(result.reports) == ["clean", "pgd10", "pgd20", "pgd50", "pgd100", "pgd20-x10", "pgd20-x100"]
    for name in ("pgd10", "pgd20", "pgd50", "pgd100"):
        assert result.reports[name]["overall"] == 1.0
    assert result.reports["pgd20-x10"]["overall"] == 0.0
    assert len(result.flags) == 2, result.flags
    assert "x10:" in result.flags[0] and "gradient masking" in result.flags[0]
    assert "x100:" in result.flags[1] and "gradient masking" in result.flags[1]
    assert "100.00%" in result.flags[0] and "0.00%" in result.flags[0]
    assert result.to_dict()["flags"] == result.flags


def test_audit_does_not_flag_a_plain_two_class_linear_model():
    """Two classes: every CE / scaled-CE gradient has the sign of w_other - w_y whatever the softmax,
    so every PGD with >= 8 steps ends at the same eps-box corner: no rise, no drop, no flag."""
    model = linear_model(num_classes=2, seed=1, scale=2.0)
    x = uint8_images(30, seed=4)
    with torch.no_grad():
        y = model(torch.tensor(as_float(x), dtype=torch.float32)).argmax(1).numpy()
    result = audit(clf(model, 2), x, y, ThreatModel.for_norm(), 2, batch_size=30)
    accs = {name: r["overall"] for name, r in result.reports.items()}
    assert accs["clean"] == 1.0 and 0.0 < accs["pgd10"] < 1.0, accs  # the attack does something
    assert len(set(v for k, v in accs.items() if k != "clean")) == 1, accs
    assert result.flags == []


def fake_suite(monkeypatch, accs: dict):
    seen = {}

    def fake(classifier, x, y, attacks, threat, num_classes, **kwargs):
        seen["attacks"] = list(attacks)
        seen["kwargs"] = kwargs
        reports = {name: {"overall": accs[name], "per_class": [accs[name]] * num_classes}
                   for name in ["clean", *attacks]}
        return SuiteResult(reports, threat, 100)

    monkeypatch.setattr(suite_module, "run_suite", fake)
    return seen


BASE_ACCS = {"clean": 80 / 100, "pgd10": 50 / 100, "pgd20": 48 / 100, "pgd50": 47 / 100, "pgd100": 47 / 100,
             "pgd20-x10": 47 / 100, "pgd20-x100": 47 / 100}


def run_fake_audit(monkeypatch, **changes):
    seen = fake_suite(monkeypatch, {**BASE_ACCS, **changes})
    result = audit(object(), np.zeros((100, 4, 4, 3), np.uint8), np.zeros(100, np.int64), ThreatModel.for_norm(),
                   C, batch_size=9, seed=4)
    return result, seen


def test_audit_flag_logic_no_flag_for_falling_accuracy_and_a_one_point_drop(monkeypatch):
    result, seen = run_fake_audit(monkeypatch)
    assert seen["attacks"] == ["pgd10", "pgd20", "pgd50", "pgd100", "pgd20-x10", "pgd20-x100"]
    assert seen["kwargs"]["batch_size"] == 9 and seen["kwargs"]["seed"] == 4
    assert result.flags == []


def test_audit_flag_logic_rising_accuracy_with_more_steps(monkeypatch):
    result, _ = run_fake_audit(monkeypatch, pgd50=49 / 100)
    assert len(result.flags) == 1
    assert "PGD-20" in result.flags[0] and "PGD-50" in result.flags[0]
    assert "48.00%" in result.flags[0] and "49.00%" in result.flags[0]


@pytest.mark.parametrize("key, value, scale", [("pgd20-x10", 45 / 100, "x10"), ("pgd20-x100", 40 / 100, "x100"),
                                               ("pgd20-x10", 4599 / 10000, "x10")])
def test_audit_flag_logic_drop_of_more_than_two_points(monkeypatch, key, value, scale):
    result, _ = run_fake_audit(monkeypatch, **{key: value})
    assert len(result.flags) == 1, result.flags
    assert f"{scale}:" in result.flags[0] and "gradient masking" in result.flags[0]


@pytest.mark.parametrize("base, scaled", [(52 / 100, 50 / 100), (17 / 100, 15 / 100), (7 / 50, 6 / 50)])
def test_audit_flag_logic_exactly_two_points_is_not_more_than_two(monkeypatch, base, scaled):
    result, _ = run_fake_audit(monkeypatch, **{"pgd10": 0.6, "pgd20": base, "pgd50": base - 0.1, "pgd100": base - 0.1,
                                               "pgd20-x10": scaled, "pgd20-x100": base})
    assert result.flags == []


# ----------------------------------------------------------------------------- 6. standard AutoAttack


@pytest.fixture(scope="module")
def aa_setup():
    """Tiny 10-class linear model; 2 points far inside and 2 far outside their robust region."""
    model = linear_model(seed=0, scale=3.0)
    x, y, m = pick_separated(model, n_robust=2, n_broken=2, seed=0, gap=0.05)
    return model, x, y, m


def test_standard_autoattack_requests_the_standard_version(monkeypatch, aa_setup):
    import pyautoattack

    model, x, y, m = aa_setup
    made = []

    class Spy(pyautoattack.AutoAttack):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, kwargs))

        def run_standard_evaluation(self, x_orig, y_orig, /, **kwargs):
            made.append(("run", kwargs))
            return x_orig.clone(), y_orig.clone()  # the attacks' configuration is what is tested here

    monkeypatch.setattr(pyautoattack, "AutoAttack", Spy)
    attack = StandardAutoAttack(clf(model), norm="linf", eps=6 / 255, batch_size=3, seed=7)
    attack.perturb(torch.from_numpy(x), torch.from_numpy(y))
    (adversary, kwargs), run = made
    assert kwargs["version"] == "standard" and kwargs.get("attacks") is None
    assert adversary.version == "standard"
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert adversary.norm == "Linf" and adversary.epsilon == pytest.approx(6 / 255) and adversary.seed == 7
    assert adversary.apgd.n_restarts == 1 and adversary.apgd.n_iter == 100
    assert adversary.apgd_targeted.n_target_classes == 9 and adversary.fab.n_target_classes == 9
    assert adversary.square.n_queries == 5000
    assert run[1]["batch_size"] == 3

    made.clear()
    StandardAutoAttack(clf(model), norm="l2", eps=0.5).perturb(torch.from_numpy(x), torch.from_numpy(y))
    assert made[0][0].norm == "L2" and made[0][0].attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_standard_autoattack_on_a_linear_model(aa_setup):
    model, x, y, m = aa_setup
    classifier = clf(model)
    was = model.training
    start = time.perf_counter()
    x_adv = StandardAutoAttack(classifier, eps=EPS, batch_size=4).perturb(torch.from_numpy(x), torch.from_numpy(y))
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"standard AutoAttack took {elapsed:.1f} s on 4 images of a linear model"
    assert model.training == was
    delta = (x_adv - torch.from_numpy(x)).flatten(1)
    assert delta.abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        aa_correct = (model(x_adv).argmax(1).numpy() == y)
    exact_correct = m > 0
    pgd = TensorPGD(classifier, eps=EPS, eps_step=STEP, max_iter=20).perturb(
        torch.from_numpy(x), torch.from_numpy(y), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pgd_correct = (model(pgd).argmax(1).numpy() == y)
    # sound (cannot beat the exact worst case), at least as strong as PGD-20, and exact here
    assert (aa_correct >= exact_correct).all()
    assert aa_correct.mean() <= pgd_correct.mean()
    assert np.array_equal(aa_correct, exact_correct), (aa_correct, m)
    # robust points are returned unchanged
    assert torch.equal(x_adv[torch.from_numpy(exact_correct)], torch.from_numpy(x[exact_correct]))


def test_standard_autoattack_numpy_generate(aa_setup):
    model, x, y, m = aa_setup
    attack = StandardAutoAttack(clf(model), eps=EPS, batch_size=4)
    out = attack.generate(x, y)
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == np.float32
    assert np.abs(out - x).max() <= EPS + 1e-6 and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        correct = model(torch.from_numpy(out)).argmax(1).numpy() == y
    assert np.array_equal(correct, m > 0)
    onehot = np.eye(C, dtype=np.float32)[y]
    np.testing.assert_array_equal(attack.generate(x, onehot), out)  # seeded: deterministic
    # no labels: attacks the model's own predictions (= y here: every point is clean-correct)
    np.testing.assert_array_equal(attack.generate(x), out)


def test_aa_through_run_suite_is_no_stronger_than_exact_and_no_weaker_than_pgd20(aa_setup):
    model, x, y, m = aa_setup
    result = run_suite(clf(model), x, y, ["pgd20", "aa"], ThreatModel.for_norm(), C, batch_size=4, aa_batch_size=4)
    assert result.reports["clean"]["overall"] == 1.0
    assert result.reports["aa"]["overall"] <= result.reports["pgd20"]["overall"]
    assert result.reports["aa"]["overall"] == pytest.approx((m > 0).mean())


@pytest.mark.parametrize("kwargs, pattern", [
    ({"norm": "l1"}, r"norm 'l1'"),
    ({"norm": "Linfinity"}, r"norm 'linfinity'"),
    ({"eps": 0.0}, r"eps 0\.0"),
    ({"eps": -0.1}, r"eps -0\.1"),
    ({"eps": 1.5}, r"eps 1\.5"),
    ({"eps": float("nan")}, r"eps nan"),
    ({"norm": "l2", "eps": 0.0}, r"eps 0\.0"),
    ({"norm": "l2", "eps": -2.0}, r"eps -2\.0"),
    ({"batch_size": 0}, r"batch size 0"),
])
def test_standard_autoattack_bad_parameters(kwargs, pattern):
    with pytest.raises(UsageError, match=pattern):
        StandardAutoAttack(clf(linear_model()), **kwargs)


def test_standard_autoattack_accepts_l2_radius_above_one():
    assert StandardAutoAttack(clf(linear_model()), norm="l2", eps=2.0).eps == 2.0


# ----------------------------------------------------------------------------- 7. suite_metrics


def fixed_result(norm: str = "linf") -> tuple:
    rng = np.random.RandomState(6)
    y = np.repeat(np.arange(C), 5)
    groups = class_groups(C)
    preds = {"clean": np.where(rng.rand(50) < 0.8, y, (y + 1) % C),
             "pgd20": np.where(rng.rand(50) < 0.5, y, (y + 1) % C),
             "pgd20-x10": np.where(rng.rand(50) < 0.3, y, (y + 2) % C),
             "aa": np.where(rng.rand(50) < 0.2, y, (y + 2) % C),
             "pgd100-x10": np.where(rng.rand(50) < 0.25, y, (y + 3) % C)}
    reports = {name: accuracy_report(torch.from_numpy(p), torch.from_numpy(y), C, groups) for name, p in preds.items()}
    return SuiteResult(reports, ThreatModel.for_norm(norm), 50), preds, y, groups


def test_suite_metrics_names_and_values_against_naive_reports():
    result, preds, y, groups = fixed_result()
    metrics = suite_metrics(result)
    naive = {name: naive_report(p == y, y, C, groups) for name, p in preds.items()}
    assert groups["tail"] == [7, 8, 9]
    expected = {}
    for name, rep in naive.items():
        key = "clean_acc" if name == "clean" else f"robust_acc/{name}"
        expected[key] = rep["overall"]
        for g, v in rep["groups"].items():
            expected[f"{key}/{g}"] = v
        for c, v in enumerate(rep["per_class"]):
            expected[f"{key}/class_{c}"] = v
    # the drop exists only where the unscaled attack with the same steps was run (pgd100 was not)
    expected["robust_acc_drop/pgd20-x10"] = naive["pgd20"]["overall"] - naive["pgd20-x10"]["overall"]
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    for key in ("clean_acc", "robust_acc/pgd20", "robust_acc/pgd20/tail", "robust_acc/pgd20/class_3",
                "robust_acc_drop/pgd20-x10", "robust_acc/aa"):
        assert key in metrics
    assert metrics["robust_acc_drop/pgd20-x10"] > 0  # the fixture's scaled attack is stronger


def test_suite_metrics_l2_names_carry_the_norm():
    result, preds, y, groups = fixed_result("l2")
    metrics = suite_metrics(result)
    assert "clean_acc" in metrics
    assert "robust_acc/pgd20-l2" in metrics and "robust_acc/pgd20-l2/class_3" in metrics
    assert "robust_acc/pgd20-l2/tail" in metrics
    assert metrics["robust_acc_drop/pgd20-x10-l2"] == pytest.approx(
        np.mean(preds["pgd20"] == y) - np.mean(preds["pgd20-x10"] == y), abs=1e-12)
    assert not any(k.startswith("robust_acc/pgd20/") or k == "robust_acc/pgd20" for k in metrics)


def test_standard_autoattack_gets_contiguous_inputs_from_the_suite(monkeypatch):
    """The suite permutes NHWC uint8 images to NCHW; pyautoattack `.view`s input gradients, which
    inherit the input's strides, so APGD-T crashed on a trained CNN. It must get contiguous batches."""
    import pyautoattack

    seen = []

    def spy(self, x, y, **kwargs):
        seen.append(x.is_contiguous())
        return x.clone(), y

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    model = linear_model()
    x_uint8 = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    run_suite(clf(model), x_uint8, np.zeros(3, dtype=np.int64), ["aa"], ThreatModel.for_norm("linf"), C)
    permuted = torch.rand(3, 4, 4, 3).permute(0, 3, 1, 2)
    StandardAutoAttack(clf(model)).perturb(permuted, torch.zeros(3, dtype=torch.long))
    assert seen == [True, True]
