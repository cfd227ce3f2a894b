"""Tests for art_reat.losses.reat (SPEC sections 4 and 5).

Every reference value here is recomputed naively (Python loops, float64) straight
from the SPEC formulas, not from the implementation.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from art_reat.errors import UsageError
from art_reat.losses.reat import (
    attack_class_weights,
    brw_logit_shift,
    rbl_class_weights,
    tail_regularizer,
)

CIFAR10_UR50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


# --------------------------------------------------------------------------- naive references


def naive_rbl(train_counts, adv_counts):
    """SPEC section 4, in float64 Python arithmetic."""
    raw = []
    for big_n, small_n in zip(train_counts, adv_counts):
        beta = (big_n - 1) / big_n
        eff = (1.0 - beta**small_n) / (1.0 - beta)  # python: 0.0 ** 0 == 1.0
        raw.append(1.0 / (eff + 1e-5))
    total = sum(raw)
    return [w / total * len(raw) for w in raw]


def naive_effective(big_n, small_n):
    beta = (big_n - 1) / big_n
    return (1.0 - beta**small_n) / (1.0 - beta)


def naive_tail(features, labels, counts, tail, mode, detach_anchor=True):
    """Double Python loop over i (tail) and j (all), SPEC section 5."""
    B, K = features.shape
    total = float(sum(counts))
    omega = [math.sqrt(total / n) for n in counts]
    log_p = torch.log_softmax(features, dim=1)
    p = log_p.exp()
    tail_idx = [i for i in range(B) if int(labels[i]) in tail]
    S = len(tail_idx)
    if S == 0:
        return features.sum() * 0.0
    acc = features.new_zeros(())
    for i in tail_idx:
        yi = int(labels[i])
        if mode == "paper":
            r_i = features.new_zeros(())
            for j in range(B):
                yj = int(labels[j])
                s = -1.0 if yi == yj else 1.0
                w = omega[yi] + omega[yj]
                kl = (p[j] * (log_p[j] - log_p[i])).sum()  # KL(p_j || p_i)
                r_i = r_i + s * w * kl
            acc = acc - r_i / B
        else:
            lp_i = log_p[i].detach() if detach_anchor else log_p[i]
            p_i = lp_i.exp()
            kl_sum = features.new_zeros(())
            c_i = 0.0
            for j in range(B):
                yj = int(labels[j])
                s = -1.0 if yi == yj else 1.0
                c_i += s * (omega[yi] + omega[yj])
                kl_sum = kl_sum + (p_i * (lp_i - log_p[j])).sum()
            kl_bar = kl_sum / (B * K)
            acc = acc + kl_bar * (c_i / B)
    return acc / S


def _batch(B=12, K=7, C=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, K, generator=g, dtype=dtype) * 2.0
    labels = torch.randint(0, C, (B,), generator=g)
    labels[0], labels[1], labels[2] = 9, 9, 7  # guarantee tail samples and a same-class pair
    labels[3] = 0
    return features, labels


# --------------------------------------------------------------------------- RBL weights


@pytest.mark.parametrize(
    "train, adv",
    [
        (CIFAR10_UR50, [4000, 3500, 2500, 1200, 900, 500, 400, 300, 100, 50]),
        (CIFAR10_UR50, [8000, 4000, 0, 300, 0, 5, 1, 0, 7, 12]),  # zero adv counts
        ([1, 1, 5, 20, 300], [0, 3, 2, 0, 10]),  # N_c = 1 with n_c = 0 and n_c > 0
        ([1, 1, 1], [0, 0, 0]),
    ],
)
def test_rbl_matches_naive_formula(train, adv):
    w = rbl_class_weights(train, adv)
    assert w.dtype == torch.float32 and w.device.type == "cpu" and w.shape == (len(train),)
    assert torch.isfinite(w).all()
    ref = torch.tensor(naive_rbl(train, adv), dtype=torch.float64)
    assert torch.allclose(w.double(), ref, rtol=5e-4, atol=1e-9), (w, ref)
    assert w.sum().item() == pytest.approx(len(train), rel=1e-5)


def test_rbl_zero_and_singleton_cases_are_finite():
    # n_c = 0 -> E_c = 0 -> raw weight 1e5; N_c = 1, n_c = 0 -> 0 ** 0 = 1 -> E_c = 0, no NaN.
    w = rbl_class_weights([1, 10, 10], [0, 0, 5])
    assert torch.isfinite(w).all()
    assert w[0].item() == pytest.approx(w[1].item(), rel=1e-6)
    assert w[2] < w[0] * 1e-3
    # N_c = 1, n_c > 0 -> E_c = 1
    w = rbl_class_weights([1, 1], [1, 7])
    assert torch.allclose(w, torch.ones(2))


def test_rbl_first_epoch_inverse_to_training_effective_number():
    w = rbl_class_weights(CIFAR10_UR50, CIFAR10_UR50).double()
    eff = torch.tensor([naive_effective(n, n) for n in CIFAR10_UR50], dtype=torch.float64)
    prod = w * eff  # constant if w is proportional to 1 / E(N_c)
    assert torch.allclose(prod, prod.mean().expand_as(prod), rtol=5e-4)
    assert (w[1:] > w[:-1]).all()  # rarer classes weigh more
    # the default adversarial counts of attack_class_weights("rbl") are the training counts
    assert torch.equal(attack_class_weights("rbl", CIFAR10_UR50), rbl_class_weights(CIFAR10_UR50, CIFAR10_UR50))


def test_rbl_device_kwarg_and_tensor_inputs():
    w = rbl_class_weights(torch.tensor(CIFAR10_UR50), torch.tensor(CIFAR10_UR50, dtype=torch.float64), device="cpu")
    assert w.device.type == "cpu"
    w_meta = rbl_class_weights(CIFAR10_UR50, CIFAR10_UR50, device=torch.device("meta"))
    assert w_meta.device.type == "meta"


@pytest.mark.parametrize(
    "train, adv",
    [
        ([10, 5], [1, 2, 3]),  # length mismatch
        ([10, 0], [1, 1]),  # N_c = 0
        ([10, 5], [1, -1]),  # negative adv count
        ([10, 5.5], [1, 1]),  # not an integer
        ([[10, 5]], [[1, 1]]),  # not 1-D
        ([], []),
        ([10, float("nan")], [1, 1]),
        ("abc", [1]),
    ],
)
def test_rbl_rejects_bad_counts(train, adv):
    with pytest.raises(UsageError) as info:
        rbl_class_weights(train, adv)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- baselines


def test_attack_class_weight_schemes_match_naive():
    counts = CIFAR10_UR50
    C = len(counts)

    def norm(ws):
        t = sum(ws)
        return torch.tensor([x / t * C for x in ws], dtype=torch.float64)

    total = sum(counts)
    beta = (total - 1) / total
    expected = {
        "none": norm([1.0] * C),
        "rw": norm([1.0 / n for n in counts]),
        "rws": norm([math.sqrt(1.0 / n) for n in counts]),
        "enr": norm([(1 - beta) / (1 - beta**n) for n in counts]),
    }
    for scheme, ref in expected.items():
        w = attack_class_weights(scheme, counts)
        assert w.dtype == torch.float32 and w.shape == (C,)
        assert torch.allclose(w.double(), ref, rtol=1e-5), scheme
        assert w.sum().item() == pytest.approx(C, rel=1e-5), scheme
    assert torch.equal(attack_class_weights("none", counts), torch.ones(C))
    adv = [3000, 3000, 3000, 1000, 500, 300, 200, 100, 50, 0]
    ref = torch.tensor(naive_rbl(counts, adv), dtype=torch.float64)
    for name in ("rbl", "reference"):
        w = attack_class_weights(name, counts, adv)
        assert torch.allclose(w.double(), ref, rtol=5e-4)
    # ENR is not RW: with a global beta close to 1 the large classes are not fully discounted
    assert not torch.allclose(expected["enr"], expected["rw"], rtol=1e-2)


def test_attack_class_weights_unknown_scheme_lists_names():
    with pytest.raises(UsageError) as info:
        attack_class_weights("focal", CIFAR10_UR50)
    msg = str(info.value)
    assert "focal" in msg and "\n" not in msg
    for name in ("none", "rw", "rws", "enr", "rbl"):
        assert name in msg


def test_brw_logit_shift_is_log_counts():
    shift = brw_logit_shift(CIFAR10_UR50)
    assert shift.dtype == torch.float32
    ref = torch.tensor([math.log(n) for n in CIFAR10_UR50], dtype=torch.float32)
    assert torch.allclose(shift, ref)
    with pytest.raises(UsageError):
        brw_logit_shift([10, 0])


# --------------------------------------------------------------------------- TAIL


COUNTS = CIFAR10_UR50
TAIL = [7, 8, 9]


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tail_matches_naive_double_loop_value_and_gradient(mode, seed):
    features, labels = _batch(seed=seed)
    f_impl = features.clone().requires_grad_(True)
    f_ref = features.clone().requires_grad_(True)
    out = tail_regularizer(f_impl, labels, COUNTS, mode=mode, tail_classes=TAIL)
    ref = naive_tail(f_ref, labels, COUNTS, set(TAIL), mode)
    assert out.dtype == torch.float64 and out.dim() == 0
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12), (out.item(), ref.item())
    (g_impl,) = torch.autograd.grad(out, f_impl)
    (g_ref,) = torch.autograd.grad(ref, f_ref)
    assert torch.allclose(g_impl, g_ref, rtol=1e-8, atol=1e-12)
    assert g_impl.abs().sum() > 0


def test_tail_modes_differ():
    features, labels = _batch(seed=3)
    a = tail_regularizer(features, labels, COUNTS, mode="paper", tail_classes=TAIL)
    b = tail_regularizer(features, labels, COUNTS, mode="reference", tail_classes=TAIL)
    assert not torch.allclose(a, b)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_reference_mode_equals_kl_div_mean_calls():
    """The released code's nn.KLDivLoss(reduction='mean') per tail anchor."""
    features, labels = _batch(B=10, K=6, seed=4)
    total = sum(COUNTS)
    omega = [math.sqrt(total / n) for n in COUNTS]
    B = features.shape[0]
    log_q = F.log_softmax(features, dim=1)
    p = F.softmax(features, dim=1).detach()
    tail_idx = [i for i in range(B) if int(labels[i]) in TAIL]
    value = 0.0
    for i in tail_idx:
        kl_bar = F.kl_div(log_q, p[i].expand(B, -1), reduction="mean")
        c_i = sum(
            (-1.0 if labels[i] == labels[j] else 1.0) * (omega[labels[i]] + omega[labels[j]])
            for j in range(B)
        ) / B
        value = value + kl_bar * c_i
    value = value / len(tail_idx)
    out = tail_regularizer(features, labels, COUNTS, mode="reference", tail_classes=TAIL)
    assert torch.allclose(out, value, rtol=1e-10)


def test_reference_mode_anchor_carries_no_gradient():
    # a batch with tail anchors, one same-class partner and other classes
    features, labels = _batch(B=8, K=5, seed=5)
    f_impl = features.clone().requires_grad_(True)
    f_det = features.clone().requires_grad_(True)
    f_att = features.clone().requires_grad_(True)
    out = tail_regularizer(f_impl, labels, COUNTS, mode="reference", tail_classes=TAIL)
    ref_det = naive_tail(f_det, labels, COUNTS, set(TAIL), "reference", detach_anchor=True)
    ref_att = naive_tail(f_att, labels, COUNTS, set(TAIL), "reference", detach_anchor=False)
    assert torch.allclose(ref_det, ref_att)  # same value, different gradients
    (g,) = torch.autograd.grad(out, f_impl)
    (g_det,) = torch.autograd.grad(ref_det, f_det)
    (g_att,) = torch.autograd.grad(ref_att, f_att)
    assert torch.allclose(g, g_det, rtol=1e-8, atol=1e-12)
    tail_rows = torch.tensor([int(y) in TAIL for y in labels])
    assert not torch.allclose(g[tail_rows], g_att[tail_rows], rtol=1e-3, atol=1e-8)


def test_reference_mode_gradient_with_single_tail_anchor():
    # One tail anchor a; the gradient on a non-tail sample j is -(c_a / (S B K)) * dlog q_j . p_a
    B, K = 4, 3
    g = torch.Generator().manual_seed(6)
    features = torch.randn(B, K, generator=g, dtype=torch.float64)
    labels = torch.tensor([9, 0, 1, 2])
    f = features.clone().requires_grad_(True)
    out = tail_regularizer(f, labels, COUNTS, mode="reference", tail_classes=TAIL)
    (grad,) = torch.autograd.grad(out, f)
    total = sum(COUNTS)
    om = [math.sqrt(total / n) for n in COUNTS]
    c_a = sum((-1.0 if j == 0 else 1.0) * (om[9] + om[int(labels[j])]) for j in range(B)) / B
    p_a = torch.softmax(features[0], dim=0)
    for j in range(B):
        q_j = torch.softmax(features[j], dim=0)
        # d/d f_j of -sum_k p_ak log q_jk = q_j - p_a (the anchor itself contributes no extra term)
        expected = (c_a / (B * K)) * (q_j - p_a)
        assert torch.allclose(grad[j], expected, rtol=1e-9, atol=1e-14)


def test_paper_mode_sign_pushes_other_classes_away_from_tail_anchor():
    # Minimising the paper's TAIL increases KL between a tail anchor and a different-class sample.
    labels = torch.tensor([9, 0])
    features = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.1, 0.0]], dtype=torch.float64)
    near = tail_regularizer(features, labels, COUNTS, mode="paper", tail_classes=TAIL)
    far = tail_regularizer(
        torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]], dtype=torch.float64),
        labels, COUNTS, mode="paper", tail_classes=TAIL,
    )
    assert far < near < 0


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_tail_zero_without_tail_samples(mode):
    features = torch.randn(6, 4, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    out = tail_regularizer(features, labels, COUNTS, mode=mode, tail_classes=TAIL, weight=3.0)
    assert out.dim() == 0 and out.dtype == torch.float32 and out.device == features.device
    assert out.item() == 0.0
    out.backward()
    assert features.grad is not None and torch.count_nonzero(features.grad) == 0
    # an empty tail set also gives zero
    labels2 = torch.tensor([9, 9, 8, 7, 0, 1])
    out2 = tail_regularizer(features, labels2, COUNTS, mode=mode, tail_classes=[])
    assert out2.item() == 0.0


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_tail_weight_scales_linearly(mode):
    features, labels = _batch(seed=7)
    base = tail_regularizer(features, labels, COUNTS, mode=mode, tail_classes=TAIL)
    assert base.abs() > 0
    for lam in (0.0, 0.5, 2.0, -3.0):
        out = tail_regularizer(features, labels, COUNTS, mode=mode, tail_classes=TAIL, weight=lam)
        assert torch.allclose(out, base * lam, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_tail_vectorised_large_batch(mode):
    B, K, C = 128, 512, 10
    g = torch.Generator().manual_seed(8)
    features = torch.randn(B, K, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    # reference value through the explicit (S, B, K) tensor of all pairwise terms
    total = sum(COUNTS)
    omega = torch.tensor([math.sqrt(total / n) for n in COUNTS], dtype=torch.float64)[labels]
    tail = torch.tensor([int(y) in TAIL for y in labels])
    S = int(tail.sum())
    assert S > 0
    log_p = torch.log_softmax(features, dim=1)
    p = log_p.exp()
    s = torch.where(labels[tail][:, None] == labels[None, :], -1.0, 1.0).double()
    W = omega[tail][:, None] + omega[None, :]
    if mode == "paper":
        kl = (p[None, :, :] * (log_p[None, :, :] - log_p[tail][:, None, :])).sum(-1)  # [i, j]
        ref = -(s * W * kl).sum() / B / S
    else:
        kl = (p[tail][:, None, :] * (log_p[tail][:, None, :] - log_p[None, :, :])).sum(-1)
        kl_bar = kl.sum(1) / (B * K)
        ref = (kl_bar * (s * W).sum(1) / B).sum() / S
    f32 = features.float().requires_grad_(True)
    tail_regularizer(f32, labels, COUNTS, mode=mode, tail_classes=TAIL)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        out = tail_regularizer(f32, labels, COUNTS, mode=mode, tail_classes=TAIL)
        out.backward()
    elapsed = (time.perf_counter() - start) / 5
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-7)
    assert elapsed < 0.25, f"{elapsed:.3f} s per call: not vectorised?"


def test_tail_default_tail_classes_use_reference_groups():
    pytest.importorskip("art_reat.data.longtail")
    features, labels = _batch(seed=9)
    for mode in ("paper", "reference"):
        default = tail_regularizer(features, labels, COUNTS, mode=mode)
        explicit = tail_regularizer(features, labels, COUNTS, mode=mode, tail_classes=range(7, 10))
        assert torch.equal(default, explicit)
    # CIFAR-100: reference tail is 67..99; class 66 is not tail, 67 is
    counts100 = [500] * 100
    f = torch.randn(3, 5, dtype=torch.float64)
    for mode in ("paper", "reference"):
        assert tail_regularizer(f, torch.tensor([66, 0, 1]), counts100, mode=mode).item() == 0.0
        assert tail_regularizer(f, torch.tensor([67, 0, 1]), counts100, mode=mode).item() != 0.0


def test_tail_default_mode_is_reference():
    features, labels = _batch(seed=10)
    a = tail_regularizer(features, labels, COUNTS, tail_classes=TAIL)
    b = tail_regularizer(features, labels, COUNTS, mode="reference", tail_classes=TAIL)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=torch.randn(4), labels=torch.tensor([0, 1, 2, 9])),  # 1-D features
        dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 9])),  # length mismatch
        dict(features=torch.randn(4, 3), labels=torch.tensor([[0, 1], [2, 9]])),  # 2-D labels
        dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 10])),  # label out of range
        dict(features=torch.randn(4, 3), labels=torch.tensor([0, -1, 2, 9])),
        dict(features=torch.randn(4, 3), labels=torch.tensor([0.0, 1.0, 2.0, 9.0])),  # float labels
        dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 9]), mode="Paper2"),
        dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 9]), tail_classes=[10]),
        dict(features=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 9]), weight=float("nan")),
        dict(features=torch.randint(0, 3, (4, 3)), labels=torch.tensor([0, 1, 2, 9])),
    ],
)
def test_tail_rejects_bad_inputs(kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("tail_classes", TAIL)
    with pytest.raises(UsageError) as info:
        tail_regularizer(train_counts=COUNTS, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_tail_on_cuda_matches_cpu(mode):
    features, labels = _batch(seed=11)
    cpu = tail_regularizer(features, labels, COUNTS, mode=mode, tail_classes=TAIL)
    gpu = tail_regularizer(features.cuda(), labels.cuda(), COUNTS, mode=mode, tail_classes=TAIL)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-9)
    w = rbl_class_weights(COUNTS, COUNTS, device="cuda")
    assert w.device.type == "cuda"
