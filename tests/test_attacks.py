"""Tests for art_reat.attacks: TensorPGD and RebalancedPGD (SPEC sections 4 and 6).

Oracles: ART's own `ProjectedGradientDescentPyTorch` for the PGD iteration, independently
written PGD loops for the logit-shifted losses, and naive float64 formulas for the attack losses
and class weights. Behaviour (balls, boxes, random starts, model mode, gradients) is tested as
properties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from art.attacks.evasion import ProjectedGradientDescentPyTorch
from torch import nn

from art_reat.attacks import REBALANCE_SCHEMES, RebalancedPGD, TensorPGD
from art_reat.errors import UsageError
from art_reat.estimators import LongTailClassifier
from art_reat.losses import rbl_class_weights
from art_reat.models import build_model

C = 4
SHAPE = (3, 8, 8)
TRAIN_COUNTS = [400, 150, 40, 10]
EPS, STEP = 8 / 255, 2 / 255


# --------------------------------------------------------------------------- tiny models


class LinearNet(nn.Module):
    """logits = W (x - 1/2) + b on the flattened image; exposes forward_features."""

    def __init__(self, in_features: int = int(np.prod(SHAPE)), num_classes: int = C) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward_features(self, x):
        features = x.flatten(1) - 0.5
        return features, self.fc(features)

    def forward(self, x):
        return self.forward_features(x)[1]


class RecordingNet(nn.Module):
    """Wraps a model; records the mode and a copy of the input of every forward call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.modes: list = []
        self.inputs: list = []

    def forward(self, x):
        self.modes.append(self.training)
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def classifier(model: nn.Module, input_shape=SHAPE, nb_classes: int = C) -> LongTailClassifier:
    return LongTailClassifier(model, nn.CrossEntropyLoss(), nb_classes, input_shape=input_shape)


def small_cnn(seed: int = 0) -> nn.Module:
    """small-cnn with non-trivial BatchNorm running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("small-cnn", C, width=0.25)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *SHAPE))
    return model.eval()


def linear_net(seed: int = 0, scale: float = 1.0, bias=(0.0, 0.0, 0.0, 0.0)) -> LinearNet:
    torch.manual_seed(seed)
    model = LinearNet()
    with torch.no_grad():
        model.fc.weight.normal_(0.0, scale)
        model.fc.bias.copy_(torch.tensor(bias))
    return model.eval()


def data(n: int = 13, seed: int = 0, lo: float = 0.0, hi: float = 1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, (n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, C, n)
    return x, y


def naive_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy in float64: logsumexp(z) - z_y, written out."""
    z = logits.double()
    m = z.max(dim=1, keepdim=True).values
    lse = (m + (z - m).exp().sum(dim=1, keepdim=True).log()).squeeze(1)
    return lse - z[torch.arange(len(y)), y]


def independent_pgd(model, x, y, eps, step, steps, shift=None, delta0=None, targeted=False):
    """L-inf PGD on sum_i CE(z_i + shift, y_i), written from the SPEC section 6 description."""
    x_adv = x.clone() if delta0 is None else x + delta0
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        z = model(x_adv)
        if shift is not None:
            z = z + shift
        loss = F.cross_entropy(z, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        direction = -g.sign() if targeted else g.sign()
        x_adv = x_adv.detach() + step * direction
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


# --------------------------------------------------------------------------- 1. ART as the oracle


@pytest.mark.parametrize("make_model", [small_cnn, linear_net], ids=["small-cnn", "linear"])
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_linf_generate_equals_art_pgd(make_model, targeted):
    clf = classifier(make_model())
    x, y = data(n=13)  # uniform in [0, 1]: the [0, 1] box is active; 13 = 2 batches of 5 + 3
    ours = TensorPGD(clf, norm=np.inf, eps=EPS, eps_step=STEP, max_iter=5, targeted=targeted,
                     random_start="none", batch_size=5).generate(x, y)
    art = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=EPS, eps_step=STEP, max_iter=5, targeted=targeted,
                                          num_random_init=0, batch_size=5, verbose=False).generate(x, y)
    assert ours.shape == x.shape and ours.dtype == np.float32
    assert np.abs(ours - x).max() > EPS / 2  # the attack moved
    np.testing.assert_allclose(ours, art, rtol=0, atol=1e-6)


def test_l2_generate_equals_art_pgd_when_box_inactive():
    """ART's L2 step is grad / ||grad||_2 and its projection rescales delta to the eps-ball: the
    same definition as TensorPGD, as long as the [0, 1] clip does not bite (see next test)."""
    clf = classifier(small_cnn())
    x, y = data(n=13, lo=0.3, hi=0.7)
    eps, step = 0.2, 0.1  # 5 steps of 0.1 > eps: the projection is active
    ours = TensorPGD(clf, norm=2, eps=eps, eps_step=step, max_iter=5, random_start="none",
                     batch_size=5).generate(x, y)
    art = ProjectedGradientDescentPyTorch(clf, norm=2, eps=eps, eps_step=step, max_iter=5, num_random_init=0,
                                          batch_size=5, verbose=False).generate(x, y)
    norms = np.linalg.norm((ours - x).reshape(len(x), -1), axis=1)
    assert np.all(norms > 0.99 * eps)  # projection exercised
    assert ours.min() > 0 and ours.max() < 1  # box inactive
    np.testing.assert_allclose(ours, art, rtol=0, atol=1e-6)


def test_l2_order_of_projection_and_clip():
    """Where the [0, 1] clip is active the two L2 PGDs differ by definition: ART clips to the box
    and then rescales delta to the eps-ball; TensorPGD rescales and then clips (the order of the
    REAT code's L-inf loop, where the two orders commute). Pin TensorPGD's order down."""
    model = small_cnn()
    clf = classifier(model)
    x, y = data(n=8)
    eps, step, steps = 1.0, 0.5, 4
    ours = TensorPGD(clf, norm=2, eps=eps, eps_step=step, max_iter=steps, random_start="none").generate(x, y)

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    x_adv = xt.clone()
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), yt, reduction="sum"), x_adv)
        g = g.flatten(1)
        x_adv = x_adv.detach() + step * (g / g.norm(dim=1, keepdim=True)).view_as(xt)
        d = (x_adv - xt).flatten(1)
        d = d * (eps / d.norm(dim=1, keepdim=True)).clamp(max=1.0)
        x_adv = (xt + d.view_as(xt)).clamp(0, 1)
    np.testing.assert_allclose(ours, x_adv.numpy(), rtol=0, atol=1e-6)

    art = ProjectedGradientDescentPyTorch(clf, norm=2, eps=eps, eps_step=step, max_iter=steps, num_random_init=0,
                                          verbose=False).generate(x, y)
    assert np.abs(ours - art).max() > 1e-3  # the documented difference is real
    for adv in (ours, art):  # both orders give feasible points
        assert np.linalg.norm((adv - x).reshape(len(x), -1), axis=1).max() <= eps * (1 + 1e-5)
        assert adv.min() >= 0 and adv.max() <= 1


def test_generate_with_mask_uses_input_gradient_hook():
    """A mask routes generate() through ART's own loop with TensorPGD's gradient hook."""
    clf = classifier(small_cnn())
    x, y = data(n=6)
    attack = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=3, random_start="none")
    plain = attack.generate(x, y)
    np.testing.assert_allclose(attack.generate(x, y, mask=np.ones_like(x)), plain, rtol=0, atol=1e-6)
    mask = np.zeros_like(x)
    mask[:, 0] = 1  # only the first channel may move
    masked = attack.generate(x, y, mask=mask)
    assert np.array_equal(masked[:, 1:], x[:, 1:])
    assert np.abs(masked[:, 0] - x[:, 0]).max() > 0


# --------------------------------------------------------------------------- 2. properties


@pytest.mark.parametrize("random_start", ["uniform", "one-sided", "none"])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 0.3])
def test_linf_ball_and_box(random_start, eps):
    clf = classifier(small_cnn())
    x, y = data(n=8)
    attack = TensorPGD(clf, eps=eps, eps_step=eps / 3, max_iter=4, random_start=random_start)
    adv = attack.perturb(torch.from_numpy(x), torch.from_numpy(y), generator=torch.Generator().manual_seed(1))
    delta = adv.numpy() - x
    assert np.abs(delta).max() <= eps + 1e-6
    assert np.abs(delta).max() >= eps - 1e-6  # the ball is reached (steps 4 * eps / 3 > eps)
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("random_start", ["uniform", "none"])
def test_l2_ball_and_box(random_start):
    clf = classifier(small_cnn())
    x, y = data(n=16)
    eps = 0.5
    adv = TensorPGD(clf, norm=2, eps=eps, eps_step=0.2, max_iter=5, random_start=random_start).perturb(
        torch.from_numpy(x), torch.from_numpy(y), generator=torch.Generator().manual_seed(2))
    norms = (adv - torch.from_numpy(x)).flatten(1).norm(dim=1)
    assert norms.max() <= eps * (1 + 1e-5)
    assert norms.min() > 0.5 * eps
    assert adv.min() >= 0 and adv.max() <= 1


def _attack_for_delta(random_start, norm=np.inf, eps=0.1, shape=SHAPE):
    clf = classifier(LinearNet(int(np.prod(shape))), input_shape=shape)
    return TensorPGD(clf, norm=norm, eps=eps, eps_step=0.01, max_iter=1, random_start=random_start)


def test_uniform_random_delta_statistics():
    eps = 0.1
    attack = _attack_for_delta("uniform", eps=eps)
    x = torch.rand(100, *SHAPE)
    d = attack._random_delta(x, torch.Generator().manual_seed(0)).double()
    n = d.numel()
    assert d.shape == x.shape
    assert d.abs().max() <= eps
    assert d.min() < -0.99 * eps and d.max() > 0.99 * eps  # both ends of [-eps, eps] are reached
    sigma = eps / math.sqrt(3)  # std of U(-eps, eps)
    assert abs(float(d.mean())) < 5 * sigma / math.sqrt(n)
    assert abs(float(d.var()) / sigma**2 - 1) < 0.05
    assert abs(float((d < 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_one_sided_random_delta_statistics():
    eps = 0.1
    d = _attack_for_delta("one-sided", eps=eps)._random_delta(torch.rand(100, *SHAPE),
                                                                torch.Generator().manual_seed(0)).double()
    n = d.numel()
    assert d.min() >= 0 and d.max() < eps
    assert d.max() > 0.99 * eps
    assert abs(float(d.mean()) - eps / 2) < 5 * (eps / math.sqrt(12)) / math.sqrt(n)


def test_no_random_start_is_zero():
    x = torch.rand(5, *SHAPE)
    assert torch.equal(_attack_for_delta("none")._random_delta(x, None), torch.zeros_like(x))


def test_l2_random_delta_is_uniform_in_ball():
    """In d = 2: |delta| <= eps; P(|delta| <= eps / 2) = 1/4; directions average to 0."""
    eps, n = 0.3, 20000
    attack = _attack_for_delta("uniform", norm=2, eps=eps, shape=(2,))
    d = attack._random_delta(torch.rand(n, 2), torch.Generator().manual_seed(0)).double()
    r = d.norm(dim=1)
    assert r.max() <= eps * (1 + 1e-6)
    assert abs(float((r <= eps / 2).double().mean()) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    unit = d / r[:, None]
    assert float(unit.mean(dim=0).norm()) < 5 / math.sqrt(n)


def test_uniform_start_is_not_clipped_before_the_first_step():
    """SPEC section 6: x_adv = x + U(-eps, eps), not clamped, is where the first gradient is taken."""
    eps = 0.1
    net = RecordingNet(LinearNet())
    clf = classifier(net)
    x = torch.zeros(4, *SHAPE)
    x[2:] = 1.0  # both edges of the box
    y = torch.arange(4)
    attack = TensorPGD(clf, eps=eps, eps_step=0.01, max_iter=2, random_start="uniform")
    adv = attack.perturb(x, y, generator=torch.Generator().manual_seed(3))
    first = net.inputs[0]
    expected = x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 1)
    assert torch.equal(first, expected)
    assert first[:2].min() < 0 and first[2:].max() > 1  # outside [0, 1]: not clipped
    assert len(net.inputs) == 2  # one forward per step
    assert net.inputs[1].min() >= 0 and net.inputs[1].max() <= 1  # clipped after the first step
    assert adv.min() >= 0 and adv.max() <= 1


def test_same_generator_seed_same_examples():
    clf = classifier(small_cnn())
    x, y = (torch.from_numpy(a) for a in data(n=8))
    attack = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=2, random_start="uniform")
    a = attack.perturb(x, y, generator=torch.Generator().manual_seed(5))
    b = attack.perturb(x, y, generator=torch.Generator().manual_seed(5))
    c = attack.perturb(x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("initially_training", [True, False])
@pytest.mark.parametrize("model_mode", ["eval", "train"])
def test_model_mode_during_and_after_perturb(initially_training, model_mode):
    net = RecordingNet(small_cnn())
    net.train(initially_training)
    clf = classifier(net)
    x, y = (torch.from_numpy(a) for a in data(n=4))
    TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=3, model_mode=model_mode).perturb(x, y)
    assert net.modes == [model_mode == "train"] * 3
    assert net.training is initially_training
    assert all(m.training is initially_training for m in net.modules())


def test_model_mode_restored_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net = Boom().train()
    clf = classifier(net)
    with pytest.raises(RuntimeError, match="boom"):
        TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=1).perturb(torch.rand(2, *SHAPE), torch.zeros(2).long())
    assert net.training


def test_perturb_takes_input_only_gradients():
    model = small_cnn()
    clf = classifier(model)
    x, y = data(n=6)
    attack = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=3)
    attack.perturb(torch.from_numpy(x), torch.from_numpy(y))
    attack.generate(x, y)
    assert all(p.grad is None for p in model.parameters())
    # existing gradients (e.g. of a training step in progress) are left untouched
    sentinels = [torch.full_like(p, 0.25) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinels):
        p.grad = s.clone()
    attack.perturb(torch.from_numpy(x), torch.from_numpy(y))
    assert all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), sentinels))


def test_pgd_increases_cross_entropy_on_random_linear_model():
    model = linear_net(seed=1, scale=0.2)
    clf = classifier(model)
    x, y = (torch.from_numpy(a) for a in data(n=64))
    adv = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=10).perturb(x, y)
    with torch.no_grad():
        clean_loss = naive_ce(model(x), y)
        adv_loss = naive_ce(model(adv), y)
    assert adv_loss.mean() > clean_loss.mean()
    assert (adv_loss > clean_loss).double().mean() > 0.5


def test_targeted_pgd_decreases_loss_towards_target():
    model = linear_net(seed=1, scale=0.2)
    clf = classifier(model)
    x, _ = (torch.from_numpy(a) for a in data(n=64))
    target = torch.full((64,), 2)
    adv = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=10, targeted=True, random_start="none").perturb(x, target)
    with torch.no_grad():
        assert naive_ce(model(adv), target).mean() < naive_ce(model(x), target).mean()
    np.testing.assert_allclose(adv.numpy(), independent_pgd(model, x, target, EPS, STEP, 10, targeted=True).numpy(),
                               rtol=0, atol=1e-6)


def test_generate_without_labels_attacks_the_predictions():
    clf = classifier(small_cnn())
    x, _ = data(n=12)
    attack = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=3, random_start="none")
    pred = np.argmax(clf.predict(x), axis=1)
    np.testing.assert_array_equal(attack.generate(x), attack.generate(x, pred))
    other = (pred + 1) % C  # other labels give other examples: the check above has teeth
    assert not np.array_equal(attack.generate(x), attack.generate(x, other))


def test_generate_accepts_one_hot_labels():
    clf = classifier(small_cnn())
    x, y = data(n=12)
    attack = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=3, random_start="none")
    np.testing.assert_array_equal(attack.generate(x, np.eye(C, dtype=np.float32)[y]), attack.generate(x, y))


BAD_PGD_PARAMS = [
    dict(eps=0.0), dict(eps=2.0), dict(eps=-0.1), dict(eps_step=0.0), dict(max_iter=0), dict(max_iter=2.5),
    dict(norm=1), dict(norm="fro"), dict(random_start="gaussian"), dict(model_mode="test"),
    dict(gradient_chunk=-1), dict(gradient_chunk=2.5), dict(gradient_chunk=True),
]
PARAM_IDS = [",".join(f"{k}={v}" for k, v in kw.items()) for kw in BAD_PGD_PARAMS]


@pytest.mark.parametrize("kwargs", BAD_PGD_PARAMS, ids=PARAM_IDS)
def test_bad_parameters_raise_usage_error(kwargs):
    clf = classifier(LinearNet())
    with pytest.raises(UsageError):
        TensorPGD(clf, **kwargs)


@pytest.mark.parametrize("kwargs", BAD_PGD_PARAMS, ids=PARAM_IDS)
def test_set_params_rejects_bad_parameters(kwargs):
    """The validation itself is right: it runs when parameters are set after construction."""
    attack = TensorPGD(classifier(LinearNet()))
    with pytest.raises(UsageError):
        attack.set_params(**kwargs)


def test_targeted_generate_without_labels_is_a_usage_error():
    clf = classifier(LinearNet())
    with pytest.raises(UsageError):
        TensorPGD(clf, targeted=True).generate(data(n=2)[0])


# --------------------------------------------------------------------------- 3. RebalancedPGD

TRUE_LABEL_SCHEMES = ("reference", "rw", "rws", "enr")


@pytest.mark.parametrize("random_start", ["none", "uniform"])
def test_true_label_weights_do_not_change_eval_mode_sign_pgd(random_start):
    """SPEC section 4: with the model in eval mode, positive per-sample weights cannot change the
    sign of any input gradient, so the examples are bitwise those of plain CE-PGD.

    Run in float64: in float32 the rounding of `w_y / sum(w) * grad` flips the sign of an
    occasional near-zero gradient component (one pixel in about 10^4 with weights
    [0.2, 7, 0.03, 40], see test_true_label_weights_scale_input_gradients for the float32 check).
    """
    model = small_cnn().double()
    clf = classifier(model)
    x, y = data(n=16)
    x, y = torch.from_numpy(x).double(), torch.from_numpy(y)
    settings = dict(eps=EPS, eps_step=STEP, max_iter=5, random_start=random_start)
    plain = TensorPGD(clf, **settings).perturb(x, y, generator=torch.Generator().manual_seed(7))
    assert plain.dtype == torch.float64
    for scheme in TRUE_LABEL_SCHEMES:
        attack = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance=scheme, **settings)
        weights = [None, [100.0, 0.01, 3.0, 0.5], [0.2, 7.0, 0.03, 40.0]] if scheme == "reference" else [None]
        for w in weights:
            if w is not None:
                attack.set_class_weights(w)
            assert attack.class_weights.max() / attack.class_weights.min() > 1.5  # non-uniform
            adv = attack.perturb(x, y, generator=torch.Generator().manual_seed(7))
            assert torch.equal(adv, plain), (scheme, w)


@pytest.mark.parametrize("scheme", TRUE_LABEL_SCHEMES)
def test_true_label_weights_scale_input_gradients(scheme):
    """float32: each sample's input gradient is its CE gradient times w_y / sum_i w_{y_i}."""
    model = small_cnn()
    clf = classifier(model)
    x, y = (torch.from_numpy(a) for a in data(n=16))
    attack = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance=scheme)
    if scheme == "reference":
        attack.set_class_weights([0.2, 7.0, 0.03, 40.0])
    plain = TensorPGD(clf).input_gradient(x, y).double()
    weighted = attack.input_gradient(x, y).double()
    w = attack.class_weights.double()[y]
    expected = plain * (w / w.sum()).view(-1, 1, 1, 1)
    scale = expected.flatten(1).abs().max(dim=1).values.view(-1, 1, 1, 1)
    assert torch.all((weighted - expected).abs() <= 1e-5 * scale)


def test_logit_rbl_changes_the_examples():
    clf = classifier(small_cnn())
    x, y = (torch.from_numpy(a) for a in data(n=16))
    settings = dict(eps=EPS, eps_step=STEP, max_iter=5, random_start="none")
    reference = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance="reference", **settings)
    logit = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance="logit", **settings)
    for attack in (reference, logit):
        attack.set_class_weights([100.0, 0.01, 3.0, 0.5])
    assert not torch.equal(logit.perturb(x, y), reference.perturb(x, y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logit_rbl_moves_examples_towards_up_weighted_classes(seed):
    """Predictions skewed to class 0 -> RBL weights favour the rarely predicted classes; the
    logit RBL lands a larger share of adversarial examples there than the reference RBL."""
    model = linear_net(seed=seed, scale=1.0, bias=(2.0, 1.0, 0.0, -1.0))
    clf = classifier(model)
    torch.manual_seed(100 + seed)
    x = torch.rand(256, *SHAPE)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    counts = torch.bincount(y, minlength=C)
    assert counts[0] == counts.max() and counts[0] > 2 * counts[C - 1]  # skewed predictions

    shares = {}
    for scheme in ("reference", "logit"):
        attack = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance=scheme, eps=32 / 255, eps_step=8 / 255,
                               max_iter=10, random_start="none")
        attack.update_counts(counts)
        up = attack.class_weights > 1.0  # weights sum to C: above-average weight
        assert up.any() and not up[0]
        adv = attack.perturb(x, y)
        with torch.no_grad():
            pred = model(adv).argmax(dim=1)
        shares[scheme] = float(up[pred].double().mean())
    assert shares["logit"] > shares["reference"]


@pytest.mark.parametrize("scheme", ["brw", "logit"])
def test_logit_shift_schemes_equal_independent_pgd(scheme):
    model = small_cnn()
    clf = classifier(model)
    x, y = (torch.from_numpy(a) for a in data(n=16))
    attack = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance=scheme, eps=EPS, eps_step=STEP, max_iter=5,
                           random_start="uniform")
    weights = torch.tensor([0.05, 0.3, 1.5, 2.15])
    if scheme == "logit":
        attack.set_class_weights(weights)
        shift = weights.log()
    else:
        shift = torch.tensor(TRAIN_COUNTS, dtype=torch.float64).log().float()
    adv = attack.perturb(x, y, generator=torch.Generator().manual_seed(9))
    delta0 = EPS * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) - 1)
    expected = independent_pgd(model, x, y, EPS, STEP, 5, shift=shift, delta0=delta0)
    np.testing.assert_allclose(adv.numpy(), expected.numpy(), rtol=0, atol=1e-6)
    plain = independent_pgd(model, x, y, EPS, STEP, 5, delta0=delta0)
    assert not torch.equal(adv, plain)  # the shift matters: the comparison above has teeth


def naive_rbl(train_counts, adv_counts):
    raw = []
    for big_n, small_n in zip(train_counts, adv_counts):
        beta = (big_n - 1) / big_n
        raw.append(1.0 / ((1.0 - beta**small_n) / (1.0 - beta) + 1e-5))
    return [w / sum(raw) * len(raw) for w in raw]


def naive_static(scheme, counts):
    if scheme == "rw":
        raw = [1.0 / n for n in counts]
    elif scheme == "rws":
        raw = [math.sqrt(1.0 / n) for n in counts]
    else:  # enr: one global beta over the training counts
        beta = (sum(counts) - 1) / sum(counts)
        raw = [(1.0 - beta) / (1.0 - beta**n) for n in counts]
    return [w / sum(raw) * len(raw) for w in raw]


@pytest.mark.parametrize("scheme", ["reference", "logit"])
def test_rbl_weights_follow_predicted_counts(scheme):
    clf = classifier(LinearNet())
    attack = RebalancedPGD(clf, train_counts=TRAIN_COUNTS, rebalance=scheme)
    # before the first epoch: n_c = N_c
    assert torch.equal(attack.class_weights, rbl_class_weights(TRAIN_COUNTS, TRAIN_COUNTS))
    np.testing.assert_allclose(attack.class_weights.numpy(), naive_rbl(TRAIN_COUNTS, TRAIN_COUNTS), rtol=1e-5)
    for adv_counts in ([10, 200, 300, 90], np.array([600, 0, 0, 0]), torch.tensor([1, 2, 3, 594])):
        returned = attack.update_counts(adv_counts)
        expected = rbl_class_weights(TRAIN_COUNTS, adv_counts)
        assert torch.equal(attack.class_weights, expected)
        assert returned is attack.class_weights
        np.testing.assert_allclose(attack.class_weights.numpy(), naive_rbl(TRAIN_COUNTS, list(map(int, adv_counts))),
                                   rtol=1e-5)


@pytest.mark.parametrize("scheme", ["rw", "rws", "enr"])
def test_static_true_label_weights(scheme):
    attack = RebalancedPGD(classifier(LinearNet()), train_counts=TRAIN_COUNTS, rebalance=scheme)
    expected = naive_static(scheme, TRAIN_COUNTS)
    np.testing.assert_allclose(attack.class_weights.numpy(), expected, rtol=1e-6)
    attack.update_counts([1, 1, 1, 597])  # predicted counts do not enter these schemes
    np.testing.assert_allclose(attack.class_weights.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["brw", "none"])
def test_unweighted_schemes_have_unit_weights(scheme):
    attack = RebalancedPGD(classifier(LinearNet()), train_counts=TRAIN_COUNTS, rebalance=scheme)
    assert torch.equal(attack.class_weights, torch.ones(C))
    attack.update_counts([1, 1, 1, 597])
    assert torch.equal(attack.class_weights, torch.ones(C))


@pytest.mark.parametrize("scheme", REBALANCE_SCHEMES)
def test_attack_loss_equals_naive_formula(scheme):
    attack = RebalancedPGD(classifier(LinearNet()), train_counts=TRAIN_COUNTS, rebalance=scheme)
    if scheme in ("reference", "logit"):
        attack.set_class_weights([0.05, 0.3, 1.5, 2.15])
    w = attack.class_weights.double()
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(12, C, generator=gen, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 3, 3, 2, 0, 1, 1, 3, 2])
    got = attack.attack_loss(z, y)
    if scheme in TRUE_LABEL_SCHEMES:
        ce = naive_ce(z, y)
        expected = (w[y] * ce).sum() / w[y].sum()
    elif scheme == "logit":
        expected = naive_ce(z + w.log(), y).sum()
    elif scheme == "brw":
        expected = naive_ce(z + torch.tensor(TRAIN_COUNTS, dtype=torch.float64).log(), y).sum()
    else:
        expected = naive_ce(z, y).sum()
    assert got.dim() == 0
    # the logit shifts (log w, log N_c) are float32; everything else is exact float64
    assert float(got) == pytest.approx(float(expected), rel=1e-6 if scheme in ("brw", "logit") else 1e-12)


@pytest.mark.parametrize("kwargs", [dict(rebalance="focal"), dict(train_counts=[10, 5, 1])], ids=["scheme", "length"])
def test_rebalanced_bad_parameters(kwargs):
    kwargs = {"train_counts": TRAIN_COUNTS, **kwargs}
    with pytest.raises(UsageError):
        RebalancedPGD(classifier(LinearNet()), **kwargs)


def test_rebalanced_bad_parameters_via_set_params_and_counts():
    with pytest.raises(UsageError):
        RebalancedPGD(classifier(LinearNet()), train_counts=TRAIN_COUNTS).set_params(rebalance="focal")
    with pytest.raises(UsageError):
        RebalancedPGD(classifier(LinearNet()), train_counts=[[10, 5], [2, 1]])
    with pytest.raises(UsageError):  # one count per class
        RebalancedPGD(classifier(LinearNet()), train_counts=TRAIN_COUNTS).update_counts([1, 2, 3])


@pytest.mark.parametrize("weights", [[1.0, 0.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
def test_set_class_weights_rejects_bad_weights(weights):
    attack = RebalancedPGD(classifier(LinearNet()), train_counts=TRAIN_COUNTS)
    before = attack.class_weights.clone()
    with pytest.raises(UsageError):
        attack.set_class_weights(weights)
    assert torch.equal(attack.class_weights, before)


# --------------------------------------------------------------------------- gradient chunks (speed only)


class CountingNet(nn.Module):
    """Counts forward calls and the rows of each."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 40])
def test_chunked_gradient_gives_the_same_examples_in_eval_mode(chunk):
    """Eval mode (BatchNorm running statistics): each sample's gradient of the summed loss is its own,
    so any chunking gives the whole-batch examples (float64: no rounding left to flip a sign)."""
    model = small_cnn().double()
    x, y = data(n=13)
    x = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(y)
    whole = TensorPGD(classifier(model), max_iter=4, gradient_chunk=0)
    chunked = TensorPGD(classifier(model), max_iter=4, gradient_chunk=chunk)
    a = whole.perturb(x, y, generator=torch.Generator().manual_seed(1))
    b = chunked.perturb(x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    grad_whole = whole.input_gradient(x, y)
    grad_chunked = chunked.input_gradient(x, y)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-10, atol=1e-14)


def test_chunks_are_the_forward_passes_of_an_eval_mode_attack():
    net = CountingNet(small_cnn())
    attack = TensorPGD(classifier(net), max_iter=2, gradient_chunk=5)
    x, y = data(n=13)
    attack.perturb(torch.tensor(x), torch.tensor(y))
    assert net.rows == [5, 5, 3] * 2


def test_train_mode_attacks_are_never_chunked():
    """BatchNorm batch statistics couple the samples in train mode: chunking would change the
    examples, so a train-mode attack takes the whole batch in one pass whatever the chunk."""
    torch.manual_seed(0)
    x, y = data(n=13)
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    results = []
    for chunk in (0, 4):
        net = CountingNet(small_cnn().double())
        attack = TensorPGD(classifier(net), max_iter=2, model_mode="train", gradient_chunk=chunk)
        results.append(attack.perturb(x, y, generator=torch.Generator().manual_seed(3)))
        assert net.rows == [13, 13]
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    # and the reason: with batch statistics, the gradient of a chunk is not the whole batch's rows
    model = small_cnn().double().train()
    xr = x.clone().requires_grad_(True)
    (g_whole,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    xc = x[:4].clone().requires_grad_(True)
    (g_chunk,) = torch.autograd.grad(F.cross_entropy(model(xc), y[:4], reduction="sum"), xc)
    assert not torch.allclose(g_chunk, g_whole[:4])


def test_auto_chunk_is_32_rows_on_the_cpu_and_the_whole_batch_on_cuda():
    from art_reat.attacks.pgd import CPU_GRADIENT_CHUNK, auto_gradient_chunk

    assert auto_gradient_chunk(torch.device("cpu")) == CPU_GRADIENT_CHUNK == 32
    assert auto_gradient_chunk(torch.device("cuda", 0)) == 0
    attack = TensorPGD(classifier(small_cnn()))
    assert attack.gradient_chunk is None and attack.chunk_rows == 32
    attack.estimator.model.train()
    assert attack.chunk_rows == 0


def test_trades_attack_chunks_its_natural_distribution_with_the_rows():
    """TRADES's attack loss holds per-sample state (the natural distribution): each chunk must
    see its own rows of it."""
    from art_reat.trainers.trades import TradesKLPGD

    model = small_cnn().double()
    x, y = data(n=13)
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    whole = TradesKLPGD(classifier(model), max_iter=3, gradient_chunk=0)
    chunked = TradesKLPGD(classifier(model), max_iter=3, gradient_chunk=4)
    a = whole.perturb(x, y, generator=torch.Generator().manual_seed(2))
    b = chunked.perturb(x, y, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, x)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
