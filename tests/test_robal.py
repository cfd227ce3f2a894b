"""Tests of the RoBal baseline (SPEC section 7): cosine head, margin loss, TRADES term, trainer.

Reference values are recomputed naively (Python loops, float64) from the SPEC formulas, not from
the implementation. Everything runs on the CPU with tiny models (a few seconds in all).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from art_reat.config import TrainConfig
from art_reat.data import DeviceLoader
from art_reat.errors import UsageError
from art_reat.losses import build_loss, robal_margin_loss, trades_kl
from art_reat.losses.robal import RoBalMarginLoss
from art_reat.models import CosineClassifier, FeatureModel, build_model
from art_reat.trainers import METHODS, MethodParts, prepare_model

CIFAR10_UR50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
TINY_COUNTS = np.array([12, 10, 8, 6, 5, 4, 3, 3, 2, 2])  # 55 images, 10 classes
EPS, STEP = 8 / 255, 2 / 255


# --------------------------------------------------------------------------- naive references


def naive_margin_loss(cos, labels, counts, m, s, tau_b, tau_m):
    """SPEC section 7, float64 Python arithmetic."""
    n_min, total = min(counts), sum(counts)
    losses = []
    for row, y in zip(cos, labels):
        z = []
        for c, value in enumerate(row):
            if c == y:
                value -= tau_m * math.log(counts[y] / n_min) / s + m
            z.append(value * s + tau_b * math.log(counts[c] / total))
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        losses.append(lse - z[y])
    return sum(losses) / len(losses)


def naive_cosine(features, weight, gamma):
    out = []
    for f in features:
        f_norm = math.sqrt(sum(v * v for v in f))
        row = []
        for w in weight:
            w_norm = math.sqrt(sum(v * v for v in w))
            row.append(sum(a * b for a, b in zip(f, w)) / f_norm / (w_norm + gamma))
        out.append(row)
    return out


def naive_kl(z_nat, z_adv, beta):
    total = 0.0
    for a, b in zip(z_nat, z_adv):
        pa = [math.exp(v) for v in a]
        pb = [math.exp(v) for v in b]
        sa, sb = sum(pa), sum(pb)
        total += sum((p / sa) * math.log((p / sa) / (q / sb)) for p, q in zip(pa, pb))
    return beta * total / len(z_nat)


# --------------------------------------------------------------------------- helpers


def tiny_config(**overrides) -> TrainConfig:
    values = dict(method="robal", model="small-cnn", epochs=1, batch_size=16, eps=EPS, step_size=STEP,
                  eval_attack_steps=2, device="cpu", val_fraction=0.0)
    values.update(overrides)
    return TrainConfig(**values).validate()


def tiny_parts(config: TrainConfig, counts=TINY_COUNTS, hw: int = 16, prepared: bool = False) -> MethodParts:
    """What `training.build_parts` makes, for a quarter-width small CNN (optionally without the preparer)."""
    torch.manual_seed(0)
    num_classes = len(counts)
    model = build_model("small-cnn", num_classes, width=0.25)
    if prepared:
        model = prepare_model(config, model, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return MethodParts(model, build_loss(config.loss, counts), optimizer, num_classes, np.asarray(counts),
                       (3, hw, hw), torch.device("cpu"))


def build_trainer(config: TrainConfig, parts: MethodParts, **common):
    if "scheduler" not in common:  # what training.train passes: a MultiStepLR on parts.optimizer
        common["scheduler"] = torch.optim.lr_scheduler.MultiStepLR(parts.optimizer, milestones=config.milestones,
                                                                   gamma=config.lr_gamma)
    return METHODS.get("robal")(config, parts, **common)


def tiny_images(counts=TINY_COUNTS, hw: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    x = rng.integers(0, 256, size=(len(y), hw, hw, 3), dtype=np.uint8)
    return x, y


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("m, s, tau_b, tau_m", [(0.1, 10.0, 1.2, 0.0), (0.2, 10.0, 0.0, 0.0), (0.1, 16.0, 0.7, 0.5),
                                                (0.0, 1.0, 0.0, 0.0)])
def test_margin_loss_matches_naive(m, s, tau_b, tau_m):
    gen = torch.Generator().manual_seed(1)
    cos = torch.rand(12, 10, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 10, (12,), generator=gen)
    got = robal_margin_loss(cos, labels, CIFAR10_UR50, m=m, s=s, tau_b=tau_b, tau_m=tau_m)
    want = naive_margin_loss(cos.tolist(), labels.tolist(), CIFAR10_UR50, m, s, tau_b, tau_m)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-12)
    module = RoBalMarginLoss(CIFAR10_UR50, m=m, s=s, tau_b=tau_b, tau_m=tau_m)
    assert float(module(cos, labels)) == pytest.approx(want, rel=1e-5)


def test_margin_loss_defaults_are_cifar10_and_margin_raises_loss():
    gen = torch.Generator().manual_seed(2)
    cos = torch.rand(8, 10, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=gen)
    want = naive_margin_loss(cos.tolist(), labels.tolist(), CIFAR10_UR50, 0.1, 10.0, 1.2, 0.0)
    assert float(robal_margin_loss(cos, labels, CIFAR10_UR50)) == pytest.approx(want, rel=1e-12)
    # no margin, no prior: plain CE of s * cos
    plain = robal_margin_loss(cos, labels, CIFAR10_UR50, m=0.0, s=10.0, tau_b=0.0, tau_m=0.0)
    assert float(plain) == pytest.approx(float(F.cross_entropy(10 * cos, labels)), rel=1e-12)
    assert float(robal_margin_loss(cos, labels, CIFAR10_UR50, m=0.2, tau_b=0.0)) > float(plain)


def test_margin_loss_rejects_bad_inputs():
    cos = torch.zeros(4, 10)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(UsageError):
        robal_margin_loss(cos, labels, CIFAR10_UR50[:5])
    with pytest.raises(UsageError):
        robal_margin_loss(cos, labels, CIFAR10_UR50, s=0.0)
    with pytest.raises(UsageError):
        robal_margin_loss(cos, labels, [0] + CIFAR10_UR50[1:])


def test_trades_kl_matches_naive_and_differentiates_both_sides():
    gen = torch.Generator().manual_seed(3)
    z_nat = (torch.rand(6, 10, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    z_adv = (torch.rand(6, 10, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    got = trades_kl(z_nat, z_adv, beta=6.0)
    assert float(got.detach()) == pytest.approx(naive_kl(z_nat.tolist(), z_adv.tolist(), 6.0), rel=1e-12)
    got.backward()
    assert z_nat.grad.abs().sum() > 0 and z_adv.grad.abs().sum() > 0
    assert float(trades_kl(z_nat.detach(), z_nat.detach(), beta=6.0)) == pytest.approx(0.0, abs=1e-12)
    # direction: KL(p_nat || p_adv), not the reverse
    reverse = naive_kl(z_adv.tolist(), z_nat.tolist(), 6.0)
    assert abs(float(got.detach()) - reverse) > 1e-6


# --------------------------------------------------------------------------- cosine classifier


def test_cosine_classifier_matches_naive_and_is_scale_invariant():
    torch.manual_seed(0)
    head = CosineClassifier(7, 5, gamma=0.0625).double()
    assert head.weight.shape == (5, 7) and head.out_features == 5 and head.num_classes == 5
    assert [name for name, _ in head.named_parameters()] == ["weight"]  # no bias
    feats = torch.randn(4, 7, dtype=torch.float64)
    want = naive_cosine(feats.tolist(), head.weight.tolist(), 0.0625)
    head.train()
    assert torch.allclose(head(feats), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(head.cosine(feats * 37.5), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(head(feats * 1e-3), head(feats), rtol=0, atol=1e-12)
    assert head(feats).abs().max() <= 1.0


def test_inference_adjustment_matches_naive():
    torch.manual_seed(1)
    head = CosineClassifier(6, 10).double()
    feats = torch.randn(5, 6, dtype=torch.float64)
    cos = naive_cosine(feats.tolist(), head.weight.tolist(), 0.03125)
    head.eval()
    # no adjustment set: eval mode is the plain cosine too
    assert torch.allclose(head(feats), torch.tensor(cos, dtype=torch.float64), atol=1e-12)
    head.set_inference_adjustment(10.0, 1.5, CIFAR10_UR50)  # counts are normalised into the prior
    total = sum(CIFAR10_UR50)
    want = [[10.0 * v - 1.5 * math.log(CIFAR10_UR50[c] / total) for c, v in enumerate(row)] for row in cos]
    assert torch.allclose(head(feats), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
    assert torch.allclose(head.cosine(feats), torch.tensor(cos, dtype=torch.float64), atol=1e-12)
    head.train()
    assert torch.allclose(head(feats), torch.tensor(cos, dtype=torch.float64), atol=1e-12)
    with pytest.raises(UsageError):
        head.set_inference_adjustment(10.0, 0.1, CIFAR10_UR50[:3])
    with pytest.raises(UsageError):
        head.set_inference_adjustment(0.0, 0.1, CIFAR10_UR50)


def test_adjustment_travels_in_state_dict_and_with_the_model():
    torch.manual_seed(2)
    model = build_model("small-cnn", 10, width=0.25)
    model.head = CosineClassifier(model.feature_dim, 10)
    model.head.set_inference_adjustment(10.0, 0.1, CIFAR10_UR50)
    state = model.state_dict()
    for key in ("head.weight", "head.s", "head.tau_p", "head.prior"):
        assert key in state
    clone = prepare_model(tiny_config(), build_model("small-cnn", 10, width=0.25), 10)
    clone.load_state_dict(state)
    x = torch.rand(3, 3, 8, 8)
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
        assert not torch.allclose(model(x), model.head.cosine(model.embed(x)))
    model64 = model.double()
    assert model64.head.prior.dtype == torch.float64
    assert model.num_classes == 10


def test_larger_tau_p_predicts_more_tail_classes():
    torch.manual_seed(3)
    head = CosineClassifier(16, 10).eval()
    feats = torch.randn(3000, 16)
    tail = torch.tensor([7, 8, 9])
    shares = []
    for tau_p in (0.0, 0.1, 0.5, 1.0, 1.5, 3.0, 6.0):
        head.set_inference_adjustment(10.0, tau_p, CIFAR10_UR50)
        with torch.no_grad():
            pred = head(feats).argmax(dim=1)
        shares.append(float(torch.isin(pred, tail).float().mean()))
    assert all(b >= a for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] > shares[0] + 0.2, shares


# --------------------------------------------------------------------------- trainer


def test_builder_from_train_config_and_one_epoch_end_to_end(tmp_path: Path):
    config = tiny_config()
    parts = tiny_parts(config)  # head still linear: the builder must swap it and rebuild the optimiser
    trainer = build_trainer(config, parts, checkpoint_dir=tmp_path)
    classifier = trainer.get_classifier()
    model = classifier.model
    head = model.head
    assert isinstance(head, CosineClassifier)
    # the trainer's optimiser holds the new parameters and its scheduler drives that optimiser
    held = {id(p) for g in classifier.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert trainer.scheduler.optimizer is classifier.optimizer
    # CIFAR-10-LT defaults, inference adjustment set at construction
    assert float(head.s) == 10.0 and float(head.tau_p) == pytest.approx(0.1)
    assert float(head.gamma) == 0.03125
    assert torch.allclose(head.prior, torch.tensor(TINY_COUNTS / TINY_COUNTS.sum(), dtype=torch.float32))
    assert trainer.attack.max_iter == 5 and trainer.attack.random_start == "one-sided"

    x, y = tiny_images()
    train_loader = DeviceLoader(x, y, 16, "cpu", augment=True, shuffle=True, seed=0)
    val_loader = DeviceLoader(x[:20], y[:20], 16, "cpu")
    before = head.weight.detach().clone()
    history = trainer.fit_loader(train_loader, val_loader, nb_epochs=1)
    assert len(history) == 1
    metrics = history[0]
    for key in ("train/loss", "train/loss_margin", "train/loss_trades", "val/clean_acc", "val/pgd2_acc"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train/loss"] == pytest.approx(metrics["train/loss_margin"] + metrics["train/loss_trades"],
                                                  rel=1e-5)
    assert not torch.equal(before, head.weight.detach())  # the head is trained
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert float(state["model"]["head.s"]) == 10.0
    assert float(state["model"]["head.tau_p"]) == pytest.approx(0.1)


def test_training_attack_is_one_sided_and_uses_the_scale1_cosine():
    config = tiny_config()
    trainer = build_trainer(config, tiny_parts(config))
    model = trainer.get_classifier().model
    attack = trainer.attack
    starts = []
    original = attack.input_gradient

    def recording(x_cur, y_cur):
        starts.append(x_cur.detach().clone())
        return original(x_cur, y_cur)

    attack.input_gradient = recording
    x, y = tiny_images(hw=8)
    xb = torch.from_numpy(x[:16]).permute(0, 3, 1, 2).float() / 255
    yb = torch.from_numpy(y[:16])
    model.train()
    x_adv = trainer.craft(xb, yb)
    assert len(starts) == 5
    delta0 = starts[0] - xb
    assert delta0.min() >= 0 and delta0.max() <= EPS and delta0.mean() > EPS / 4  # x + eps * U[0, 1)

    # reference: 5 sign steps of CE on head.cosine(features), eval mode, from the recorded start
    def reference(logit_fn):
        x_cur = starts[0].clone()
        for _ in range(5):
            x_cur.requires_grad_(True)
            loss = F.cross_entropy(logit_fn(x_cur), yb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_cur)
            x_cur = (xb + (x_cur.detach() + STEP * grad.sign() - xb).clamp(-EPS, EPS)).clamp(0, 1)
        return x_cur

    model.eval()
    want = reference(lambda v: model.head.cosine(model.forward_features(v)[0]))
    adjusted = reference(model)  # what a leak of the inference adjustment would give
    model.train()
    assert torch.allclose(x_adv, want, atol=1e-6)
    assert not torch.allclose(adjusted, want, atol=1e-6)


def test_released_lr_schedule_compounds_after_epoch_60_intended_does_not(tmp_path: Path):
    lrs = {}
    for schedule in ("intended", "released"):
        config = tiny_config(robal_lr_schedule=schedule, lr=0.1, milestones=[60, 75], lr_gamma=0.1, epochs=80)
        trainer = build_trainer(config, tiny_parts(config, prepared=True))
        optimizer = trainer.get_classifier().optimizer
        assert trainer.scheduler.optimizer is optimizer
        seen = []
        for _ in range(80):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            trainer.scheduler.step()
        lrs[schedule] = seen
        torch.save(trainer.state_dict(), tmp_path / f"{schedule}.pt")
        torch.load(tmp_path / f"{schedule}.pt", weights_only=True)  # what training/evaluation load with
    intended, released = lrs["intended"], lrs["released"]
    assert intended[:60] == pytest.approx([0.1] * 60) and released[:60] == pytest.approx([0.1] * 60)
    assert intended[60] == pytest.approx(0.01) and released[60] == pytest.approx(0.01)
    assert intended[61:75] == pytest.approx([0.01] * 14)
    assert intended[75:] == pytest.approx([0.001] * 5)
    for epoch in range(61, 80):
        assert released[epoch] == pytest.approx(0.1 * 0.1 ** (epoch - 59), rel=1e-6)


def test_prepared_model_keeps_the_optimiser_and_scheduler():
    config = tiny_config()
    parts = tiny_parts(config, prepared=True)
    assert isinstance(parts.model.head, CosineClassifier)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(parts.optimizer, milestones=[60, 75], gamma=0.1)
    trainer = build_trainer(config, parts, scheduler=scheduler)
    assert trainer.get_classifier().optimizer is parts.optimizer
    assert trainer.scheduler is scheduler


def test_cifar100_defaults_and_overrides():
    counts = np.linspace(50, 5, 100).astype(int)
    config = tiny_config()
    trainer = build_trainer(config, tiny_parts(config, counts=counts))
    head = trainer.get_classifier().model.head
    assert float(head.tau_p) == pytest.approx(1.5) and float(head.gamma) == 0.03125
    assert (trainer.m, trainer.s, trainer.tau_b, trainer.tau_m, trainer.beta) == (0.2, 10.0, 0.0, 0.0, 3.0)
    config = tiny_config(robal_tau_p=0.7, robal_gamma=0.0625, robal_beta=1.0, attack_steps=3)
    trainer = build_trainer(config, tiny_parts(config, counts=counts))
    head = trainer.get_classifier().model.head
    assert float(head.tau_p) == pytest.approx(0.7) and float(head.gamma) == 0.0625 and trainer.beta == 1.0
    assert trainer.attack.max_iter == 3


def test_config_validation_and_cli_options(monkeypatch):
    from click.testing import CliRunner

    from cli.main import main

    for bad in (dict(robal_s=0.0), dict(robal_beta=-1.0), dict(robal_lr_schedule="compounding"),
                dict(robal_margin_on="both"), dict(robal_tau_p=float("nan"))):
        with pytest.raises(UsageError):
            TrainConfig(**bad).validate()
    result = CliRunner().invoke(main, ["train", "--method", "robal", "--robal-s", "0"])
    assert result.exit_code == 2 and "robal-s" in result.output + (result.stderr or "")

    captured = {}

    def fake_train(config, progress=False):
        captured["config"] = config
        raise UsageError("stop here")

    monkeypatch.setattr("art_reat.training.train", fake_train)
    args = ["train", "--method", "robal", "--robal-m", "0.2", "--robal-s", "16", "--robal-tau-b", "0.5",
            "--robal-tau-m", "0.3", "--robal-beta", "3", "--robal-tau-p", "1.5", "--robal-gamma", "0.0625",
            "--robal-margin-on", "adversarial", "--robal-lr-schedule", "released"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    config = captured["config"]
    assert (config.robal_m, config.robal_s, config.robal_tau_b, config.robal_tau_m, config.robal_beta,
            config.robal_tau_p, config.robal_gamma) == (0.2, 16.0, 0.5, 0.3, 3.0, 1.5, 0.0625)
    assert config.robal_margin_on == "adversarial" and config.robal_lr_schedule == "released"


@pytest.mark.parametrize("where", ["natural", "adversarial"])
def test_outer_loss_is_margin_loss_plus_trades_kl_on_cosine_logits(where):
    config = tiny_config(robal_margin_on=where)
    trainer = build_trainer(config, tiny_parts(config))
    model = trainer.get_classifier().model
    x, y = tiny_images(hw=8)
    xb = torch.from_numpy(x[:16]).permute(0, 3, 1, 2).float() / 255
    yb = torch.from_numpy(y[:16])
    x_adv = trainer.craft(xb, yb)
    model.train()
    loss, logits, terms = trainer.training_loss(x_adv, yb)
    # independent recomputation (train mode: BatchNorm uses the batch statistics, so it is repeatable)
    with torch.no_grad():
        z_nat = model.head.cosine(model.forward_features(xb)[0]).double()
        z_adv = model.head.cosine(model.forward_features(x_adv)[0]).double()
    z_margin = z_nat if where == "natural" else z_adv
    other = z_adv if where == "natural" else z_nat
    margin = naive_margin_loss(z_margin.tolist(), yb.tolist(), TINY_COUNTS.tolist(), 0.1, 10.0, 1.2, 0.0)
    kl = naive_kl(z_nat.tolist(), z_adv.tolist(), 6.0)
    assert float(terms["margin"]) == pytest.approx(margin, rel=1e-4)
    assert float(terms["margin"]) != pytest.approx(
        naive_margin_loss(other.tolist(), yb.tolist(), TINY_COUNTS.tolist(), 0.1, 10.0, 1.2, 0.0), rel=1e-4)
    assert float(terms["trades"]) == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(margin + kl, rel=1e-4)
    assert torch.allclose(logits.double(), z_adv, atol=1e-5)


# --------------------------------------------------------------------------- adaptive attack


class _Toy(FeatureModel):
    """Features = x - 0.5 for a 3-pixel input: the cosine geometry is set by the head's weights."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(3, weight.shape[0], in_channels=3, normalization=((0.5,) * 3, (1.0,) * 3))
        self.head = CosineClassifier(3, weight.shape[0], gamma=0.0)
        with torch.no_grad():
            self.head.weight.copy_(weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x).flatten(1)


def test_logit_scaled_attack_finds_what_plain_pgd_misses():
    attacks = pytest.importorskip("art_reat.attacks")
    if not hasattr(attacks, "LogitScaledPGD"):
        pytest.skip("art_reat.attacks.LogitScaledPGD is not available")
    from art_reat.estimators import LongTailClassifier

    # class 0 (true) along e1; class 1 at 0.2 rad from it towards +e2; three distractors along -e2.
    # With scale-1 logits the softmax is nearly uniform, so CE's gradient follows the distractors
    # (towards -e2, which never flips the label within eps); x10 makes class 1 dominate the gradient.
    theta = 0.2
    weight = torch.tensor([[1.0, 0, 0], [math.cos(theta), math.sin(theta), 0]] + [[0, -1.0, 0]] * 3)
    model = _Toy(weight).eval()
    classifier = LongTailClassifier(model, nn.CrossEntropyLoss(), 5, input_shape=(3, 1, 1))
    x = torch.tensor([[0.8, 0.5, 0.5], [0.75, 0.5, 0.45], [0.78, 0.52, 0.5]]).view(3, 3, 1, 1)
    y = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), y)
    settings = dict(eps=0.05, eps_step=0.0125, max_iter=20, random_start="none")
    plain = attacks.TensorPGD(classifier, **settings).perturb(x, y)
    scaled = attacks.LogitScaledPGD(classifier, alpha=10.0, **settings).perturb(x, y)
    with torch.no_grad():
        plain_pred, scaled_pred = model(plain).argmax(1), model(scaled).argmax(1)
    assert (plain_pred == y).all(), plain_pred
    assert (scaled_pred != y).all(), scaled_pred
    assert (scaled - x).abs().max() <= 0.05 + 1e-6
