"""Long-tailed losses against naive float64 formulas written with explicit loops."""

import math

import numpy as np
import pytest
import torch

from art_reat.errors import UsageError
from art_reat.losses import LOSSES, balanced_softmax_loss, build_loss

COUNTS = [500, 200, 50, 20, 5]
B, C = 7, len(COUNTS)
CLASS_W = [0.5, 1.0, 2.0, 0.0, 3.0]


# ---------------------------------------------------------------- naive references
def _lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def _ce(row, y):
    return _lse(row) - row[y]


def naive_ce(z, y, counts):
    return [_ce(z[i], y[i]) for i in range(len(y))]


def naive_focal(z, y, counts, gamma=1.0):
    out = []
    for i in range(len(y)):
        ce = _ce(z[i], y[i])
        one_minus_p = -math.expm1(-ce)
        out.append(one_minus_p**gamma * ce)
    return out


def naive_cb_weights(counts, beta=0.9999):
    w = [(1 - beta) / (1 - beta**n) for n in counts]
    total = sum(w)
    return [v / total * len(counts) for v in w]


def naive_cb(z, y, counts, beta=0.9999):
    w = naive_cb_weights(counts, beta)
    return [w[y[i]] * _ce(z[i], y[i]) for i in range(len(y))]


def naive_ldam(z, y, counts, max_m=0.5, s=30.0):
    q = [n**-0.25 for n in counts]
    m = [max_m * v / max(q) for v in q]
    out = []
    for i in range(len(y)):
        row = [s * (z[i][j] - (m[j] if j == y[i] else 0.0)) for j in range(len(counts))]
        out.append(_ce(row, y[i]))
    return out


def naive_bsl(z, y, counts):
    out = []
    for i in range(len(y)):
        row = [z[i][j] + math.log(counts[j]) for j in range(len(counts))]
        out.append(_ce(row, y[i]))
    return out


NAIVE = {"ce": naive_ce, "focal": naive_focal, "cb": naive_cb, "ldam": naive_ldam, "bsl": naive_bsl}


def naive_mean(name, z, y, counts, weight=None):
    per = NAIVE[name](z.tolist(), y.tolist(), counts)
    w = [1.0] * len(counts) if weight is None else weight
    return sum(w[y[i]] * per[i] for i in range(len(per))) / len(per)


def batch(scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 1])
    return z, y


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("name", sorted(NAIVE))
@pytest.mark.parametrize("scale", [1.0, 3.0, 1000.0])  # 1000: extreme logits
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_naive_float64(name, scale, weighted):
    weight = CLASS_W if weighted else None
    z, y = batch(scale)
    got = build_loss(name, COUNTS, weight=weight)(z, y)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(naive_mean(name, z, y, COUNTS, weight), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_float32_extreme_logits_stay_finite(name):
    z, y = batch(1000.0, dtype=torch.float32)
    z.requires_grad_(True)
    got = build_loss(name, COUNTS)(z, y)
    got.backward()
    assert got.dtype == torch.float32
    assert torch.isfinite(got) and torch.isfinite(z.grad).all()
    assert got.item() == pytest.approx(naive_mean(name, z.detach().double(), y, COUNTS), rel=1e-4)


def test_options_are_used():
    z, y = batch(2.0, seed=1)
    assert build_loss("focal", COUNTS, gamma=2.5)(z, y).item() == pytest.approx(
        sum(naive_focal(z.tolist(), y.tolist(), COUNTS, 2.5)) / B, rel=1e-9
    )
    assert build_loss("cb", COUNTS, beta=0.99)(z, y).item() == pytest.approx(
        sum(naive_cb(z.tolist(), y.tolist(), COUNTS, 0.99)) / B, rel=1e-6
    )
    assert build_loss("ldam", COUNTS, max_m=0.3, s=10.0)(z, y).item() == pytest.approx(
        sum(naive_ldam(z.tolist(), y.tolist(), COUNTS, 0.3, 10.0)) / B, rel=1e-6
    )


def test_balanced_softmax_function():
    z, y = batch(2.0, seed=2)
    ref = naive_mean("bsl", z, y, COUNTS)
    for counts in (COUNTS, np.array(COUNTS), torch.tensor(COUNTS)):
        assert balanced_softmax_loss(z, y, counts).item() == pytest.approx(ref, rel=1e-12)
    assert balanced_softmax_loss(z.float(), y, COUNTS).dtype == torch.float32


# ---------------------------------------------------------------- invariances
def test_invariances_reduce_to_ce():
    z, y = batch(2.0, seed=3)
    ce = torch.nn.functional.cross_entropy(z, y)
    torch.testing.assert_close(build_loss("bsl", [37] * C)(z, y), ce)
    torch.testing.assert_close(balanced_softmax_loss(z, y, [37] * C), ce)
    torch.testing.assert_close(build_loss("focal", COUNTS, gamma=0.0)(z, y), ce)
    torch.testing.assert_close(build_loss("cb", [37] * C)(z, y), ce)
    torch.testing.assert_close(build_loss("ldam", COUNTS, max_m=0.0, s=1.0)(z, y), ce)
    torch.testing.assert_close(build_loss("ce", COUNTS, weight=[1.0] * C)(z, y), ce)


def test_weight_is_batch_mean_not_weighted_mean():
    z, y = batch(seed=4)
    w = torch.tensor(CLASS_W, dtype=torch.float64)
    per = torch.nn.functional.cross_entropy(z, y, reduction="none")
    got = build_loss("ce", COUNTS, weight=w)(z, y)
    torch.testing.assert_close(got, (w[y] * per).sum() / B)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(NAIVE))
def test_gradcheck(name):
    z, y = batch(2.0, seed=5)
    z.requires_grad_(True)
    loss = build_loss(name, COUNTS, weight=CLASS_W)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (z,))


def test_gradcheck_balanced_softmax_function():
    z, y = batch(2.0, seed=6)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: balanced_softmax_loss(t, y, COUNTS), (z,))


# ---------------------------------------------------------------- devices / dtypes
def test_module_moves_with_to():
    loss = build_loss("ldam", COUNTS, weight=CLASS_W).double()
    assert loss.margins.dtype == torch.float64 and loss.weight.dtype == torch.float64
    z, y = batch()
    assert loss(z, y).item() == pytest.approx(naive_mean("ldam", z, y, COUNTS, CLASS_W), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(NAIVE))
def test_cuda(name):
    z, y = batch(2.0)
    loss = build_loss(name, COUNTS, weight=CLASS_W)
    cpu = loss(z.float(), y)
    gpu = loss.to("cuda")(z.float().cuda(), y.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


# ---------------------------------------------------------------- errors
def test_unknown_loss_lists_names():
    with pytest.raises(UsageError) as info:
        build_loss("nope", COUNTS)
    msg = str(info.value)
    assert "\n" not in msg and "nope" in msg
    for name in ("bsl", "cb", "ce", "focal", "ldam"):
        assert name in msg
    assert set(NAIVE) <= set(LOSSES.names())


@pytest.mark.parametrize(
    "counts",
    [[], [[1, 2], [3, 4]], [5, 0, 3], [5, -1], [5, float("nan")], ["a", "b"], 7, torch.zeros(3)],
)
def test_bad_counts(counts):
    for name in sorted(NAIVE):
        with pytest.raises(UsageError) as info:
            build_loss(name, counts)
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        balanced_softmax_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), counts)


@pytest.mark.parametrize(
    "kwargs",
    [{"weight": [1.0, 2.0]}, {"weight": [1, 1, 1, 1, -1]}, {"gamma": -1.0}, {"gama": 2.0}],
)
def test_bad_options(kwargs):
    name = "focal" if "gamma" in kwargs or "gama" in kwargs else "bsl"
    with pytest.raises(UsageError):
        build_loss(name, COUNTS, **kwargs)


def test_bad_option_values():
    with pytest.raises(UsageError):
        build_loss("cb", COUNTS, beta=1.0)
    with pytest.raises(UsageError):
        build_loss("ldam", COUNTS, s=0.0)
    with pytest.raises(UsageError):
        build_loss("ce", COUNTS)(torch.zeros(2, C + 1), torch.zeros(2, dtype=torch.long))
