"""Tests of the baselines of issue 8: SRAT, TRADES, MART, AWP, the --augment policies and the
balanced-small control (SPEC sections 1, 3 and 8).

Each loss term is checked against a naive float64 implementation written from the papers (Python
loops over the batch); each method trains one small epoch through its builder, and once through
`art-reat train` followed by `art-reat attack`; deferred re-weighting is checked epoch by epoch.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from art_reat.config import TrainConfig
from art_reat.data import BatchAutoAugment, DeviceLoader, build_augment_policy, load_dataset
from art_reat.errors import UsageError
from art_reat.losses import build_loss, class_balanced_weights, drw_reduce, mart_terms, supcon_separation_loss
from art_reat.models import build_model
from art_reat.trainers import (METHODS, AWPTrainer, MARTTrainer, MethodParts, SRATTrainer, TRADESTrainer,
                               default_attack_steps)
from art_reat.trainers.awp import perturbed_parameters
from art_reat.trainers.srat import srat_settings
from art_reat.trainers.trades import NormalStartPGD, TradesKLPGD
from cli.main import main

COUNTS = np.array([24, 12, 8, 4])
C = len(COUNTS)
HW = 8
EPS, STEP = 8 / 255, 2 / 255
METHOD_NAMES = ("srat", "trades", "mart", "awp")
REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- helpers


def tiny_config(method: str, **overrides) -> TrainConfig:
    values = dict(method=method, model="small-cnn", loss="ce" if method == "srat" else "bsl", epochs=1,
                  batch_size=16, eps=EPS, step_size=STEP, attack_steps=2, eval_attack_steps=2, device="cpu",
                  val_fraction=0.0, milestones=[10])
    values.update(overrides)
    return TrainConfig(**values).validate()


def tiny_parts(config: TrainConfig, counts=COUNTS, seed: int = 0) -> MethodParts:
    """What `training.build_parts` makes, for a quarter-width small CNN."""
    torch.manual_seed(seed)
    model = build_model("small-cnn", len(counts), width=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return MethodParts(model, build_loss(config.loss, counts), optimizer, len(counts), np.asarray(counts),
                       (3, HW, HW), torch.device("cpu"))


def build_trainer(config: TrainConfig, parts: MethodParts = None, **common):
    parts = parts if parts is not None else tiny_parts(config)
    if "scheduler" not in common:  # what training.train passes
        common["scheduler"] = torch.optim.lr_scheduler.MultiStepLR(parts.optimizer, milestones=config.milestones,
                                                                   gamma=config.lr_gamma)
    return METHODS.get(config.method)(config, parts, **common)


def tiny_images(counts=COUNTS, hw: int = HW, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    means = rng.integers(40, 216, (len(counts), 1, 1, 3))
    x = np.clip(means[y] + rng.normal(0, 40, (len(y), hw, hw, 3)), 0, 255).astype(np.uint8)
    return x, y


def batch(n: int = 16, seed: int = 0):
    x, y = tiny_images(seed=seed)
    idx = np.random.default_rng(seed).permutation(len(y))[:n]
    xb = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float() / 255.0
    return xb, torch.from_numpy(y[idx]).long()


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def rows(t: torch.Tensor) -> List[List[float]]:
    return t.detach().double().tolist()


# --------------------------------------------------------------------------- naive references (float64 loops)


def naive_supcon(features, labels, temperature):
    u = []
    for f in features:
        norm = math.sqrt(sum(v * v for v in f))
        u.append([v / norm for v in f])
    total, anchors = 0.0, 0
    for i in range(len(u)):
        positives = [p for p in range(len(u)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        dot = [sum(a * b for a, b in zip(u[i], u[j])) / temperature for j in range(len(u))]
        log_denominator = math.log(sum(math.exp(dot[a]) for a in range(len(u)) if a != i))
        total += -sum(dot[p] - log_denominator for p in positives) / len(positives)
        anchors += 1
    return total / anchors if anchors else 0.0


def naive_kl_sum(z_nat, z_adv):
    total = 0.0
    for a, b in zip(z_nat, z_adv):
        p, q = softmax(a), softmax(b)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total


def naive_mart(z_nat, z_adv, labels, beta, log_counts=None):
    """MART's loss from its code, sample by sample; log_counts: BSL instead of CE in the boosted CE."""
    b = len(labels)
    boosted = robust = 0.0
    for zn, za, y in zip(z_nat, z_adv, labels):
        pa, pn = softmax(za), softmax(zn)
        shifted = za if log_counts is None else [v + lc for v, lc in zip(za, log_counts)]
        ce = -math.log(softmax(shifted)[y])
        wrong = max((c for c in range(len(pa)) if c != y), key=lambda c: pa[c])
        boosted += ce - math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pn, pa) if p > 0)
        robust += kl * (1.0000001 - pn[y])
    return boosted / b, beta * robust / b


def naive_ce(z, labels, log_counts=None, weight=None, reduction="mean"):
    losses, ws = [], []
    for row, y in zip(z, labels):
        row = row if log_counts is None else [v + lc for v, lc in zip(row, log_counts)]
        w = 1.0 if weight is None else weight[y]
        losses.append(-w * math.log(softmax(row)[y]))
        ws.append(w)
    return sum(losses) / (sum(ws) if reduction == "weighted-mean" else len(losses))


# --------------------------------------------------------------------------- loss terms


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_separation_loss_matches_naive_supcon(temperature):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 1, 2, 4])  # class 3 and 4: anchors without positives
    got = supcon_separation_loss(features, labels, temperature)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(naive_supcon(rows(features), labels.tolist(), temperature), rel=1e-10)
    # scale-invariant in the features; no positives at all: 0 with a graph
    assert float(supcon_separation_loss(3 * features, labels, temperature)) == pytest.approx(float(got), rel=1e-10)
    f = features.clone().requires_grad_(True)
    zero = supcon_separation_loss(f, torch.arange(12), temperature)
    zero.backward()
    assert float(zero.detach()) == 0.0 and f.grad is not None
    # minimising it pulls same-class features together
    f = features.clone().requires_grad_(True)
    supcon_separation_loss(f, labels, temperature).backward()
    moved = F.normalize(features - 0.1 * f.grad, dim=1)
    before, after = F.normalize(features, dim=1), moved
    assert float(after[0] @ after[1]) > float(before[0] @ before[1])
    with pytest.raises(UsageError):
        supcon_separation_loss(features, labels, 0.0)


@pytest.mark.parametrize("lt", [None, "bsl"])
def test_mart_terms_match_naive(lt):
    gen = torch.Generator().manual_seed(2)
    z_nat = 2 * torch.randn(10, C, generator=gen, dtype=torch.float64)
    z_adv = z_nat + torch.randn(10, C, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0])
    loss = None if lt is None else build_loss(lt, COUNTS)
    boosted, robust = mart_terms(z_nat, z_adv, labels, beta=6.0, adv_loss=loss)
    log_counts = None if lt is None else np.log(COUNTS).tolist()
    want_b, want_r = naive_mart(rows(z_nat), rows(z_adv), labels.tolist(), 6.0, log_counts)
    assert float(boosted) == pytest.approx(want_b, rel=1e-6)  # BSL's log N_c buffer is float32
    assert float(robust) == pytest.approx(want_r, rel=1e-10)
    # gradients flow through both the natural and the adversarial logits
    zn, za = z_nat.clone().requires_grad_(True), z_adv.clone().requires_grad_(True)
    sum(mart_terms(zn, za, labels, 6.0)).backward()
    assert zn.grad.abs().sum() > 0 and za.grad.abs().sum() > 0


def test_drw_reduction_matches_naive():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(9, C, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 0, 1])
    w = class_balanced_weights(COUNTS, 0.9999)
    loss = build_loss("ce", COUNTS, weight=w)
    for reduction in ("weighted-mean", "mean"):
        got = drw_reduce(loss.per_sample(z, labels), labels, loss.weight, reduction)
        assert float(got) == pytest.approx(naive_ce(rows(z), labels.tolist(), weight=w.tolist(),
                                                    reduction=reduction), rel=1e-6)
    ref = F.cross_entropy(z, labels, weight=w.to(z.dtype))
    assert float(drw_reduce(loss.per_sample(z, labels), labels, loss.weight)) == pytest.approx(float(ref), rel=1e-6)


# --------------------------------------------------------------------------- TRADES


def test_trades_attack_maximises_kl_from_a_small_normal_start():
    config = tiny_config("trades")
    trainer = build_trainer(config)
    attack = trainer.attack
    assert isinstance(attack, TradesKLPGD) and attack.random_start == "normal" and attack.max_iter == 2
    model = trainer.get_classifier().model.double()
    with torch.no_grad():
        model.head.weight.mul_(50)  # a fresh model's logits are nearly constant: make the KL measurable
    x, y = batch()
    x = x.double()
    delta = attack._random_delta(torch.zeros(64, 3, 16, 16), torch.Generator().manual_seed(0))
    assert float(delta.std()) == pytest.approx(1e-3, rel=0.05)
    # the attack loss is sum_i KL(p(x_i) || p(x'_i)), p from the model in eval mode
    model.eval()
    with torch.no_grad():
        z_nat = model(x)
    x_prime = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    attack._target_log = F.log_softmax(z_nat, dim=1)
    with torch.no_grad():
        kl = attack.attack_loss(model(x_prime), y)
    attack._target_log = None
    with torch.no_grad():
        assert float(kl) == pytest.approx(naive_kl_sum(rows(z_nat), rows(model(x_prime))), rel=1e-4)
    model.train()
    torch.manual_seed(0)
    x_adv = attack.perturb(x, y)
    assert model.training  # the mode is restored
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    model.eval()
    with torch.no_grad():
        assert naive_kl_sum(rows(z_nat), rows(model(x_adv))) > naive_kl_sum(rows(z_nat), rows(model(x))) + 1e-6
    with pytest.raises(UsageError):
        attack.attack_loss(z_nat, y)  # no natural batch outside perturb


def test_normal_start_is_known_to_normal_start_attacks_only():
    from art_reat.attacks import TensorPGD

    clf = tiny_parts(tiny_config("trades")).classifier()
    assert NormalStartPGD(clf).random_start == "normal"
    for start in ("uniform", "one-sided", "none"):
        assert NormalStartPGD(clf, random_start=start).random_start == start
    with pytest.raises(UsageError, match=r"'gaussian'.*uniform, one-sided, none, normal"):
        NormalStartPGD(clf, random_start="gaussian")
    with pytest.raises(UsageError, match=r"'normal'.*uniform, one-sided, none$"):
        TensorPGD(clf, random_start="normal")
    attack = NormalStartPGD(clf)
    with pytest.raises(UsageError, match="gaussian"):
        attack.set_params(random_start="gaussian")


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_trades_and_mart_random_start_comes_from_the_batch_generator(method):
    """The training attack's start is drawn from the trainer's per-batch generator (exact resume,
    the same start on every rank), not from the global RNG."""
    trainer = build_trainer(tiny_config(method))
    x, y = batch()
    crafted = []
    for global_seed, batch_seed in ((1, 5), (2, 5), (1, 6)):
        torch.manual_seed(global_seed)
        trainer.batch_generator = torch.Generator().manual_seed(batch_seed)
        crafted.append(trainer.craft(x, y))
        trainer._natural = None
    assert torch.equal(crafted[0], crafted[1])  # other global RNG, same batch generator: same examples
    assert not torch.equal(crafted[0], crafted[2])


def test_trades_outer_loss_is_lt_loss_plus_beta_kl():
    config = tiny_config("trades", trades_beta=3.0)
    trainer = build_trainer(config)
    assert isinstance(trainer, TRADESTrainer) and trainer.beta == 3.0
    model = trainer.get_classifier().model
    x, y = batch()
    x_adv = (x + 0.03).clamp(0, 1)
    model.eval()  # deterministic forward passes for the comparison
    trainer._natural = x
    loss, logits, terms = trainer.training_loss(x_adv, y)
    with torch.no_grad():
        z_nat, z_adv = rows(model(x)), rows(model(x_adv))
    natural = naive_ce(z_nat, y.tolist(), log_counts=np.log(COUNTS).tolist())
    kl = 3.0 * naive_kl_sum(z_nat, z_adv) / len(y)
    assert float(terms["lt"]) == pytest.approx(natural, rel=1e-5)
    assert float(terms["trades"]) == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(natural + kl, rel=1e-5)
    assert torch.allclose(logits, torch.tensor(z_adv, dtype=logits.dtype), atol=1e-5)
    with pytest.raises(RuntimeError):
        trainer.training_loss(x_adv, y)  # the natural batch was consumed


def test_mart_trainer_loss_matches_naive():
    config = tiny_config("mart", mart_beta=2.0)
    trainer = build_trainer(config)
    assert isinstance(trainer, MARTTrainer) and isinstance(trainer.attack, NormalStartPGD)
    assert trainer.attack.random_start == "normal" and type(trainer.attack) is NormalStartPGD
    model = trainer.get_classifier().model
    x, y = batch()
    x_adv = (x - 0.03).clamp(0, 1)
    model.eval()
    trainer._natural = x
    loss, _, terms = trainer.training_loss(x_adv, y)
    with torch.no_grad():
        want_b, want_r = naive_mart(rows(model(x)), rows(model(x_adv)), y.tolist(), 2.0, np.log(COUNTS).tolist())
    assert float(terms["bce"]) == pytest.approx(want_b, rel=1e-5)
    assert float(terms["mart_kl"]) == pytest.approx(want_r, rel=1e-4, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(want_b + want_r, rel=1e-5)


# --------------------------------------------------------------------------- AWP


def test_awp_perturbation_is_gamma_times_the_weight_norm_per_layer_and_is_undone():
    config = tiny_config("awp", awp_gamma=0.01)
    trainer = build_trainer(config)
    assert isinstance(trainer, AWPTrainer) and trainer.gamma == 0.01
    model = trainer.get_classifier().model
    x, y = batch()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    diff = trainer.perturb_weights(x, y)
    names = set(perturbed_parameters(model))
    assert set(diff) == names and names == {n for n, p in model.named_parameters() if p.dim() > 1}
    assert any("head" in n for n in names) and not any("bias" in n for n in names)
    params = dict(model.named_parameters())
    for name in names:
        change = (params[name].detach() - before[name]).double()
        assert float(change.norm() / before[name].double().norm()) == pytest.approx(0.01, rel=1e-4), name
    for name, p in params.items():  # BatchNorm and biases untouched
        if name not in names:
            assert torch.equal(p.detach(), before[name]), name
    # the direction is the gradient of the (long-tail) training loss at the unperturbed weights
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    reference.train()
    loss = trainer.get_classifier()._loss(reference(x), y)
    grads = dict(zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(loss, list(reference.parameters()))))
    for name in names:
        cosine = F.cosine_similarity(diff[name].flatten().double(), grads[name].flatten().double(), dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-4), name
    trainer.restore_weights()
    for name, p in params.items():
        assert torch.allclose(p.detach(), before[name], atol=1e-7), name


def test_awp_step_is_taken_at_the_perturbed_weights_and_applied_to_the_original_ones():
    config = tiny_config("awp", awp_gamma=0.05)
    trainer = build_trainer(config)
    classifier = trainer.get_classifier()
    model = classifier.model
    x, y = batch()
    x_adv = (x + 0.02).clamp(0, 1)
    start = copy.deepcopy(model)
    # the trainer's batch, hook by hook as in PGDATTrainer.train_epoch
    trainer.on_epoch_start(0)
    model.train()
    loss, _, _ = trainer.training_loss(x_adv, y)
    classifier.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    classifier.optimizer.step()
    trainer.on_batch_end(x_adv, y, None)
    # by hand: v from the gradient at w (on a separate copy: its BatchNorm statistics must not move)
    grad_copy = copy.deepcopy(start).train()
    g = torch.autograd.grad(classifier._loss(grad_copy(x_adv), y), list(grad_copy.parameters()))
    g = dict(zip([n for n, _ in grad_copy.named_parameters()], g))
    manual = copy.deepcopy(start)
    params = dict(manual.named_parameters())
    v = {n: params[n].detach().norm() / g[n].norm() * g[n] for n in perturbed_parameters(manual)}
    with torch.no_grad():
        for n, d in v.items():
            params[n].add_(0.05 * d)
    optimizer = torch.optim.SGD(manual.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    manual.train()
    classifier._loss(manual(x_adv), y).backward()
    optimizer.step()
    with torch.no_grad():
        for n, d in v.items():
            params[n].sub_(0.05 * d)
    for (name, a), b in zip(model.state_dict().items(), manual.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_awp_warmup_and_state():
    config = tiny_config("awp", awp_warmup=1)
    trainer = build_trainer(config)
    model = trainer.get_classifier().model
    x, y = batch()
    snapshot = [p.detach().clone() for p in model.parameters()]
    model.train()
    trainer.on_epoch_start(0)
    trainer.training_loss(x, y)
    assert all(torch.equal(a, p) for a, p in zip(snapshot, model.parameters()))  # warm-up: not perturbed
    assert trainer.on_epoch_end(0) == {"awp/active": 0.0}
    trainer.on_epoch_start(1)
    trainer.training_loss(x, y)
    assert not all(torch.equal(a, p) for a, p in zip(snapshot, model.parameters()))
    trainer.on_epoch_end(1)  # restores
    assert all(torch.allclose(a, p, atol=1e-7) for a, p in zip(snapshot, model.parameters()))
    state = trainer.state_dict()
    assert state["trainer"]["awp"] == {"gamma": 5e-3, "warmup": 1, "proxy_lr": 0.01}
    fresh = build_trainer(config)
    fresh.load_state_dict(state)
    assert fresh.epoch == fresh.start_epoch and fresh._pending is None


# --------------------------------------------------------------------------- SRAT


def record(trainer):
    """Wrap `trainer.training_loss`: record lr, class weights of the loss and the loss per batch."""
    calls = []
    original = trainer.training_loss

    def wrapped(x, y):
        out = original(x, y)
        w = trainer.get_classifier()._loss.weight
        calls.append({"lr": trainer.get_classifier().optimizer.param_groups[0]["lr"],
                      "weight": None if w is None else w.clone(), "terms": out[2]})
        return out

    trainer.training_loss = wrapped
    return calls


def test_srat_outer_loss_is_drw_loss_plus_separation():
    config = tiny_config("srat", sep_weight=0.5, sep_temperature=0.2, loss="ce")
    trainer = build_trainer(config)
    assert isinstance(trainer, SRATTrainer)
    model = trainer.get_classifier().model
    x, y = batch()
    model.eval()
    for active in (False, True):
        trainer.set_drw(active)
        loss, _, terms = trainer.training_loss(x, y)
        with torch.no_grad():
            features, logits = model.forward_features(x)
        weight = class_balanced_weights(COUNTS).tolist() if active else None
        base = naive_ce(rows(logits), y.tolist(), weight=weight, reduction="weighted-mean")
        sep = 0.5 * naive_supcon(rows(features), y.tolist(), 0.2)
        assert float(terms["lt"]) == pytest.approx(base, rel=1e-5)
        assert float(terms["sep"]) == pytest.approx(sep, rel=1e-5)
        assert float(loss.detach()) == pytest.approx(base + sep, rel=1e-5)
    trainer.drw_reduction = "mean"
    _, _, terms = trainer.training_loss(x, y)
    with torch.no_grad():
        logits = model(x)
    assert float(terms["lt"]) == pytest.approx(naive_ce(rows(logits), y.tolist(),
                                                        weight=class_balanced_weights(COUNTS).tolist()), rel=1e-5)


@pytest.mark.parametrize("loss", ["focal", "ldam"])
def test_srat_takes_focal_and_ldam_and_refuses_cb(loss):
    trainer = build_trainer(tiny_config("srat", loss=loss))
    x, y = batch()
    trainer.set_drw(True)
    per = trainer.get_classifier()._loss.per_sample(trainer.get_classifier().model(x), y)
    assert torch.isfinite(trainer.training_loss(x, y)[0]) and per.shape == y.shape
    with pytest.raises(UsageError, match="srat"):
        build_trainer(tiny_config("srat", loss="cb"))


def test_deferred_reweighting_switches_at_the_right_epoch_with_a_lowered_lr(tmp_path: Path):
    config = tiny_config("srat", epochs=3, drw_epoch=1, milestones=[10])
    assert srat_settings(config)["drw_lr_factor"] == 0.1  # E is not a milestone: the DRW factor lowers the LR
    trainer = build_trainer(config, checkpoint_dir=tmp_path)
    calls = record(trainer)
    x, y = tiny_images()
    loader = DeviceLoader(x, y, 16, "cpu", augment=True, shuffle=True, seed=0)
    history = trainer.fit_loader(loader, nb_epochs=3)
    per_epoch = len(loader)
    assert len(calls) == 3 * per_epoch
    cb = class_balanced_weights(COUNTS).float()
    for e in range(3):
        for call in calls[e * per_epoch:(e + 1) * per_epoch]:
            if e < 1:
                assert call["weight"] is None and call["lr"] == pytest.approx(0.1)
            else:
                assert torch.allclose(call["weight"], cb) and call["lr"] == pytest.approx(0.01)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.01, 0.01])
    assert [h["drw/active"] for h in history] == [0.0, 1.0, 1.0]
    assert all(math.isfinite(h["train/loss_sep"]) for h in history)

    # the switch survives a checkpoint: the weights are back, the LR is not lowered twice
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["srat"]["drw_active"] is True
    fresh = build_trainer(config)
    assert fresh.get_classifier()._loss.weight is None
    fresh.load_state_dict(state)
    assert fresh.drw_active and torch.allclose(fresh.get_classifier()._loss.weight, cb)
    fresh.on_epoch_start(3)
    assert fresh.get_classifier().optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    # and an earlier checkpoint switches them off again
    early = build_trainer(config)
    early.on_epoch_start(0)
    trainer.load_state_dict(early.state_dict())
    assert not trainer.drw_active and trainer.get_classifier()._loss.weight is None


def test_drw_at_a_milestone_lowers_the_lr_once_by_default():
    config = tiny_config("srat", epochs=3, milestones=[1])  # drw_epoch None: the first milestone
    settings = srat_settings(config)
    assert settings["drw_epoch"] == 1 and settings["drw_lr_factor"] == 1.0
    trainer = build_trainer(config)
    x, y = tiny_images()
    history = trainer.fit_loader(DeviceLoader(x, y, 32, "cpu"), nb_epochs=3)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.01, 0.01])
    assert [h["drw/active"] for h in history] == [0.0, 1.0, 1.0]
    # an explicit factor composes with the scheduler, also a closed-form one (LambdaLR)
    config = tiny_config("srat", epochs=3, drw_epoch=1, drw_lr_factor=0.5, milestones=[2])
    parts = tiny_parts(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, lambda e: 0.1 if e >= 2 else 1.0)
    trainer = build_trainer(config, parts, scheduler=scheduler)
    history = trainer.fit_loader(DeviceLoader(x, y, 32, "cpu"), nb_epochs=3)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.05, 0.005])
    assert srat_settings(tiny_config("srat", milestones=[]))["drw_epoch"] is None


# --------------------------------------------------------------------------- every method, one small epoch


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_trains_one_small_epoch_through_its_builder(method, tmp_path: Path):
    config = tiny_config(method, drw_epoch=0, augment="randaugment")
    trainer = build_trainer(config, checkpoint_dir=tmp_path)
    assert trainer.attack.max_iter == 2 and default_attack_steps(method) == 10
    model = trainer.get_classifier().model
    before = [p.detach().clone() for p in model.parameters()]
    x, y = tiny_images()
    train_loader = DeviceLoader(x, y, 16, "cpu", augment=True, shuffle=True, seed=0, augment_policy=config.augment)
    history = trainer.fit_loader(train_loader, DeviceLoader(x[::3], y[::3], 16, "cpu"), nb_epochs=1)
    metrics = history[0]
    for key in ("train/loss", "train/adv_acc", "val/clean_acc", "val/pgd2_acc"):
        assert math.isfinite(metrics[key]), key
    terms = [k for k in metrics if k.startswith("train/loss_")]
    assert terms and metrics["train/loss"] == pytest.approx(sum(metrics[k] for k in terms), rel=1e-5)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert set(state["trainer"]) >= {{"srat": "srat", "trades": "trades", "mart": "mart", "awp": "awp"}[method]}
    fresh = build_trainer(config)
    fresh.load_state_dict(state)
    assert fresh.start_epoch == 1


# --------------------------------------------------------------------------- --augment


@pytest.mark.parametrize("name", ["autoaugment", "randaugment"])
def test_grouped_policy_equals_per_image_application(name):
    policy = BatchAutoAugment(name)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    steps = policy.sample(32, 16, 16, torch.Generator().manual_seed(1))
    assert len(steps) == 2 and all(len(s) == 32 for s in steps)
    out = policy.apply(x, steps)
    for i in range(32):
        img = x[i]
        for step in steps:
            if step[i] is not None:
                img = policy.apply_one(img, *step[i])
        assert torch.equal(out[i], img), i
    assert len({s[i] for s in steps for i in range(32)}) > 4  # images get different operations


@pytest.mark.parametrize("name", ["autoaugment", "randaugment"])
def test_augment_changes_images_keeps_shape_dtype_range_and_is_seeded(name):
    x, y = tiny_images(counts=[20, 20], hw=16)

    def first_epoch(policy: str, seed: int = 0, data=x):
        loader = DeviceLoader(data, y, 16, "cpu", augment=True, shuffle=True, seed=seed, augment_policy=policy)
        return [xb for xb, _ in loader], [yb for _, yb in loader]

    plain, plain_y = first_epoch("none")
    aug, aug_y = first_epoch(name)
    again, _ = first_epoch(name)
    other, _ = first_epoch(name, seed=1)
    for a, p, ya, yp in zip(aug, plain, aug_y, plain_y):
        assert a.shape == p.shape and a.dtype == torch.float32 and torch.equal(ya, yp)  # same order, labels
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        assert torch.allclose(a * 255, (a * 255).round(), atol=1e-4)  # still 8-bit images
    assert any(not torch.equal(a, p) for a, p in zip(aug, plain))
    assert all(torch.equal(a, b) for a, b in zip(aug, again))  # deterministic under the loader's seed
    assert any(not torch.equal(a, b) for a, b in zip(aug, other))
    # float NCHW input (ART's layout) is rounded to 8 bits and gives the same images
    floats = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    from_float, _ = first_epoch(name, data=floats)
    assert all(torch.equal(a, b) for a, b in zip(aug, from_float))
    # the global random state is left alone
    torch.manual_seed(5)
    first_epoch(name)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_augment_names():
    assert build_augment_policy("none") is None
    with pytest.raises(UsageError, match="augment"):
        build_augment_policy("mixup")
    with pytest.raises(UsageError, match="augment"):
        DeviceLoader(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], 2, augment_policy="cutout")
    with pytest.raises(UsageError):
        TrainConfig(augment="trivial").validate()


# --------------------------------------------------------------------------- balanced-small control


def write_cifar10(folder: Path, per_class: int = 100) -> None:
    rng = np.random.RandomState(0)
    y = np.repeat(np.arange(10), per_class)
    rng.shuffle(y)
    x = rng.randint(0, 256, size=(len(y), 8, 8, 3), dtype=np.uint8)
    (folder / "cifar10").mkdir(parents=True)
    np.savez(folder / "cifar10" / "train.npz", x=x, y=y)
    np.savez(folder / "cifar10" / "test.npz", x=x[:50], y=y[:50])


def test_cifar10_bs_has_the_lt_total_split_equally(tmp_path: Path):
    write_cifar10(tmp_path)
    for ur in (1, 10, 50, 100):
        lt = load_dataset("cifar10lt", tmp_path, ur=ur)
        bs = load_dataset("cifar10-bs", tmp_path, ur=ur)
        assert len(bs.y_train) == len(lt.y_train), ur
        assert bs.train_counts.max() - bs.train_counts.min() <= 1
        assert np.array_equal(bs.x_test, lt.x_test) and bs.name == "cifar10-bs"
    if (REAL / "cifar10" / "train.npz").is_file():
        bs = load_dataset("cifar10-bs", REAL, ur=50)
        assert bs.train_counts.tolist() == [1400] * 6 + [1399] * 4  # 13996 = the CIFAR-10-LT UR=50 total


# --------------------------------------------------------------------------- configuration, CLI, end to end


def test_config_validation_and_cli_options(monkeypatch):
    for bad in (dict(sep_weight=-1.0), dict(sep_temperature=0.0), dict(drw_epoch=-2), dict(drw_lr_factor=0.0),
                dict(drw_reduction="sum"), dict(trades_beta=-1.0), dict(mart_beta=float("inf")),
                dict(awp_gamma=-0.1), dict(awp_warmup=-1), dict(augment="cutmix")):
        with pytest.raises(UsageError):
            TrainConfig(**bad).validate()
    result = CliRunner().invoke(main, ["train", "--method", "trades", "--augment", "cutout"])
    assert result.exit_code == 2 and "augment" in result.output + (result.stderr or "")
    captured = {}

    def fake_train(config, progress=False):
        captured["config"] = config
        raise UsageError("stop here")

    monkeypatch.setattr("art_reat.training.train", fake_train)
    args = ["train", "--method", "srat", "--loss", "ldam", "--augment", "randaugment", "--sep-weight", "0.3",
            "--sep-temperature", "0.07", "--drw-epoch", "40", "--drw-lr-factor", "0.2", "--drw-reduction", "mean",
            "--trades-beta", "3", "--mart-beta", "5", "--awp-gamma", "0.01", "--awp-warmup", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    c = captured["config"]
    assert (c.method, c.loss, c.augment, c.sep_weight, c.sep_temperature, c.drw_epoch, c.drw_lr_factor,
            c.drw_reduction, c.trades_beta, c.mart_beta, c.awp_gamma, c.awp_warmup) == (
        "srat", "ldam", "randaugment", 0.3, 0.07, 40, 0.2, "mean", 3.0, 5.0, 0.01, 2)


def write_npz_data(folder: Path) -> None:
    x, y = tiny_images(counts=[24, 12, 8, 6], hw=16)
    xt, yt = tiny_images(counts=[4, 4, 4, 4], hw=16, seed=1)
    folder.mkdir(parents=True)
    np.savez(folder / "train.npz", x=x, y=y)
    np.savez(folder / "test.npz", x=xt, y=yt)


@pytest.mark.parametrize("method,extra", [("srat", ["--loss", "ldam", "--drw-epoch", "0"]),
                                          ("trades", ["--augment", "autoaugment"]),
                                          ("mart", ["--loss", "ce"]),
                                          ("awp", ["--augment", "randaugment"])])
def test_cli_train_then_attack(method, extra, tmp_path: Path, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    write_npz_data(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--dataset", "npz", "--data-dir", str(tmp_path / "data"), "--model", "small-cnn", "--method",
            method, *extra, "--epochs", "1", "--batch-size", "25", "--attack-steps", "1", "--eval-attack-steps", "1",
            "--val-fraction", "0.1", "--device", "cpu", "--tracking-uri", uri, "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("art-reat").experiment_id])[0]
    assert run.data.tags["method"] == method and run.data.params["method"] == method
    assert "test/pgd1_acc" in run.data.metrics and "train/loss" in run.data.metrics
    best = tmp_path / "out" / run.info.run_id / "best.pt"
    assert best.is_file()
    result = CliRunner().invoke(main, ["attack", "--checkpoint", str(best), "--attacks", "pgd2", "--eval-samples", "8",
                                       "--device", "cpu", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "pgd2" in result.output
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())
    assert config["method"] == method and "augment" in config and "awp_gamma" in config
