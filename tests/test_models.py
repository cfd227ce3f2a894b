"""Model zoo: shapes, feature/head split, normalisation, gradients, published sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from art_reat.errors import UsageError
from art_reat.models import MODELS, FeatureModel, build_model

FEATURE_DIMS = {
    "resnet18": 512,
    "preact-resnet18": 512,
    "wrn-28-10": 640,
    "wrn-34-10": 640,
    "small-cnn": 128,
}
# Published parameter counts for 10 classes (linear head with bias).
PARAM_COUNTS = {
    "resnet18": 11_173_962,
    "preact-resnet18": 11_171_146,
    "wrn-28-10": 36_479_194,
    "wrn-34-10": 46_160_474,
}
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
NAMES = MODELS.names()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=NAMES)
def named_model(request):
    """One eval-mode model per architecture, shared by the tests below (the big ones are slow to build)."""
    torch.manual_seed(0)
    return request.param, build_model(request.param, 10).eval()


def test_every_model_has_expectations():
    assert set(NAMES) == set(FEATURE_DIMS)


def test_shapes_and_forward_matches_forward_features(named_model, images):
    name, model = named_model
    assert isinstance(model, FeatureModel)
    assert model.feature_dim == FEATURE_DIMS[name]
    assert model.num_classes == 10
    with torch.no_grad():
        features, logits = model.forward_features(images)
        assert torch.equal(model(images), logits)
        assert torch.equal(model.embed(images), features)
    assert features.shape == (2, FEATURE_DIMS[name])
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_replaced_head_is_used(named_model, images):
    _, model = named_model
    original = model.head
    try:
        model.head = nn.Linear(model.feature_dim, 7)
        assert model.num_classes == 7
        with torch.no_grad():
            assert model(images).shape == (2, 7)
            assert model.forward_features(images)[1].shape == (2, 7)
    finally:
        model.head = original


def test_gradients_reach_the_input(named_model, images):
    _, model = named_model
    x = images.clone().requires_grad_(True)
    model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_normalization_is_applied_inside_the_model(named_model, images):
    name, plain = named_model
    torch.manual_seed(1)
    normed = build_model(name, 10, normalization=CIFAR_NORM).eval()
    # Same weights, each model keeping its own normalisation buffers (the shared one is untouched).
    weights = {k: v for k, v in plain.state_dict().items() if k not in ("mean", "std")}
    assert set(normed.load_state_dict(weights, strict=False).missing_keys) == {"mean", "std"}
    mean = torch.tensor(CIFAR_NORM[0]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_NORM[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = plain((images - mean) / std)
        got = normed(images)
        assert not torch.allclose(plain(images), got, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_published_parameter_counts(name):
    model = build_model(name, 10)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_batchnorm_makes_train_and_eval_differ(images):
    model = build_model("small-cnn", 10)
    model.train()
    with torch.no_grad():
        train_out = model(images)
        eval_out = model.eval()(images)
    assert not torch.allclose(train_out, eval_out)


def test_small_cnn_width_and_channels():
    model = build_model("small-cnn", 5, width=0.5, in_channels=1, normalization=((0.5,), (0.25,)))
    assert model.feature_dim == 64
    features, logits = model.forward_features(torch.rand(3, 1, 28, 28))
    assert features.shape == (3, 64) and logits.shape == (3, 5)


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet18"])
def test_in_channels_one(name):
    model = build_model(name, 3, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 3)


def test_state_dict_keys_do_not_depend_on_normalization():
    a = build_model("small-cnn", 10)
    b = build_model("small-cnn", 10, normalization=CIFAR_NORM)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())  # loading also carries the (identity) normalisation
    assert torch.equal(b.std, torch.ones(1, 3, 1, 1))


def test_unknown_model_lists_available_names():
    with pytest.raises(UsageError) as info:
        build_model("resnet9000", 10)
    message = str(info.value)
    assert "resnet9000" in message and "\n" not in message
    for name in NAMES:
        assert name in message


def test_numpy_integer_num_classes_is_accepted():
    import numpy as np

    assert build_model("small-cnn", np.int64(4)).num_classes == 4


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5])
def test_num_classes_must_be_at_least_two(bad):
    with pytest.raises(UsageError, match=str(bad)):
        build_model("small-cnn", bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"normalization": ((0.5, 0.5), (0.2, 0.2))},  # wrong number of channels
        {"normalization": ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))},  # zero std
        {"normalization": 0.5},
        {"depth": 16},  # unknown option
        {"width": 0},
    ],
)
def test_bad_options_raise_usage_error(kwargs):
    with pytest.raises(UsageError):
        build_model("small-cnn", 10, **kwargs)
