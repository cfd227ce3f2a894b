"""Tests for the ART estimators and trainers of art-reat (SPEC sections 5 and 6).

TAIL's training loss is checked against a naive float64 implementation written from the SPEC
(Python loops over the batch), REAT's bookkeeping against counts recorded independently from the
logits the trainer trains on, and PGD-AT's loop (scheduler, checkpoints, resume) as properties.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from art_reat.attacks import RebalancedPGD, TensorPGD
from art_reat.config import TrainConfig
from art_reat.data import DeviceLoader, class_groups
from art_reat.errors import UsageError
from art_reat.estimators import LongTailClassifier, TAILPyTorchClassifier
from art_reat.losses import build_loss, rbl_class_weights
from art_reat.models import build_model
from art_reat.trainers import METHODS, MethodParts, PGDATTrainer, REATTrainer

C = 4
COUNTS = [32, 16, 10, 6]  # 64 training images, long-tailed
N = sum(COUNTS)
SHAPE = (3, 8, 8)
EPS, STEP = 8 / 255, 2 / 255


# --------------------------------------------------------------------------- helpers


def dataset(seed: int = 0):
    """uint8 NHWC images with a class-dependent mean colour, labels sorted by class."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), COUNTS)
    means = rng.integers(40, 216, (C, 1, 1, 3))
    x = np.clip(means[y] + rng.normal(0, 40, (N, 8, 8, 3)), 0, 255).astype(np.uint8)
    return x, y


def to_float_nchw(x_uint8: np.ndarray) -> np.ndarray:
    """ART's layout: float32 NCHW in [0, 1] (the same float32 division the loader performs)."""
    return (torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float() / 255.0).numpy()


def model_and_optimizer(seed: int = 0, lr: float = 0.1):
    torch.manual_seed(seed)
    model = build_model("small-cnn", C, width=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return model, optimizer


def make_classifier(seed: int = 0, tail: str | None = None, lr: float = 0.1, **tail_kwargs):
    model, optimizer = model_and_optimizer(seed, lr)
    loss = build_loss("bsl", COUNTS)
    if tail is None:
        return LongTailClassifier(model, loss, C, input_shape=SHAPE, optimizer=optimizer)
    return TAILPyTorchClassifier(model, loss, C, train_counts=COUNTS, tail_mode=tail, input_shape=SHAPE,
                                 optimizer=optimizer, **tail_kwargs)


def record_training_loss(classifier):
    """Wrap `classifier.training_loss`; record lr, model mode and argmax of the returned logits."""
    calls = []
    original = classifier.training_loss

    def wrapped(x, y):
        loss, logits, terms = original(x, y)
        calls.append({"lr": classifier.optimizer.param_groups[0]["lr"], "training": classifier.model.training,
                      "pred": logits.detach().argmax(dim=1).clone(), "n": len(y)})
        return loss, logits, terms

    classifier.training_loss = wrapped
    return calls


def params(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()]


def assert_state_equal(a, b, path="state"):
    """Recursive equality of nested checkpoint structures (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_state_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_state_equal(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


# --------------------------------------------------------------------------- naive TAIL / BSL


def naive_bsl(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i [logsumexp(z_i + log N) - (z_{i,y_i} + log N_{y_i})], float64 except log N_c, which the
    losses keep as a float32 buffer (art_reat.losses.longtail: constants are float32 buffers)."""
    log_n = torch.tensor(COUNTS, dtype=torch.float64).log().float().double()
    total = 0
    for i in range(len(y)):
        z = logits[i].double() + log_n
        total = total + torch.logsumexp(z, dim=0) - z[y[i]]
    return total / len(y)


def naive_tail(features, y, mode, tail_classes, weight):
    """SPEC section 5 with explicit loops; float64; gradients as the SPEC describes them."""
    f = features.double()
    batch, k_dim = f.shape
    omega = [math.sqrt(sum(COUNTS) / n) for n in COUNTS]
    log_p = torch.log_softmax(f, dim=1)
    labels = [int(v) for v in y]
    tail = [i for i in range(batch) if labels[i] in tail_classes]
    if not tail:
        return torch.zeros((), dtype=torch.float64)
    total = 0
    for i in tail:
        if mode == "paper":
            acc = 0
            for j in range(batch):
                s = -1.0 if labels[i] == labels[j] else 1.0
                w = omega[labels[i]] + omega[labels[j]]
                kl_ji = (log_p[j].exp() * (log_p[j] - log_p[i])).sum()  # KL(p_j || p_i)
                acc = acc + s * w * kl_ji
            total = total - acc / batch
        else:
            anchor = log_p[i].detach()
            kl_bar = sum((anchor.exp() * (anchor - log_p[j])).sum() for j in range(batch)) / (batch * k_dim)
            c_i = sum((-1.0 if labels[i] == labels[j] else 1.0) * (omega[labels[i]] + omega[labels[j]])
                      for j in range(batch)) / batch
            total = total + kl_bar * c_i
    return weight * total / len(tail)


# --------------------------------------------------------------------------- 4. estimators


@pytest.mark.parametrize("mode", ["reference", "paper"])
@pytest.mark.parametrize("tail_classes", [None, [2, 3]], ids=["default-tail", "tail-2-3"])
@pytest.mark.parametrize("tail_weight", [1.0, 0.5])
def test_tail_training_loss_equals_naive_formula(mode, tail_classes, tail_weight):
    model, _ = model_and_optimizer(seed=1)
    model = model.double().train()
    clf = TAILPyTorchClassifier(model, build_loss("bsl", COUNTS), C, train_counts=COUNTS, tail_mode=mode,
                                tail_weight=tail_weight, tail_classes=tail_classes, input_shape=SHAPE)
    x = torch.rand(8, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 3, 0, 2, 3])

    loss, logits, terms = clf.training_loss(x, y)
    got_grads = torch.autograd.grad(loss, list(model.parameters()))

    features, z = model.forward_features(x)
    lt = naive_bsl(z, y)
    tail_set = class_groups(C, "reference")["tail"] if tail_classes is None else tail_classes
    assert tail_set == ([3] if tail_classes is None else [2, 3])
    tail = naive_tail(features, y, mode, tail_set, tail_weight)
    expected = lt + tail
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))

    assert abs(float(tail.detach())) > 1e-6  # the regulariser is present in the comparison
    assert torch.equal(logits, z)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert float(terms["lt"]) == pytest.approx(float(lt.detach()), rel=1e-10)
    assert float(terms["tail"]) == pytest.approx(float(tail.detach()), rel=1e-9)
    for got, exp in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, exp, rtol=1e-8, atol=1e-12)


def test_long_tail_classifier_training_loss_is_the_plain_loss():
    clf = make_classifier()
    x = torch.rand(8, *SHAPE)
    y = torch.tensor([0, 1, 2, 3, 3, 0, 2, 3])
    loss, logits, terms = clf.training_loss(x, y)
    with torch.no_grad():
        z = clf.model(x)
    torch.testing.assert_close(logits.detach(), z)
    assert float(loss.detach()) == pytest.approx(float(naive_bsl(z, y)), rel=1e-5)
    assert set(terms) == {"lt"}


@pytest.mark.parametrize("one_hot", [False, True])
def test_tail_classifier_art_fit_trains_with_the_tail_loss(one_hot):
    clf = make_classifier(tail="reference")
    calls = record_training_loss(clf)
    x, y = dataset()
    before = params(clf.model)
    labels = np.eye(C, dtype=np.float32)[y] if one_hot else y
    clf.fit(to_float_nchw(x), labels, batch_size=16, nb_epochs=2)
    assert len(calls) == 2 * math.ceil(N / 16)
    assert sum(c["n"] for c in calls) == 2 * N
    assert all(not torch.equal(a, b) for a, b in zip(before, params(clf.model)))


def test_tail_classifier_fit_needs_an_optimizer():
    model, _ = model_and_optimizer()
    clf = TAILPyTorchClassifier(model, build_loss("bsl", COUNTS), C, train_counts=COUNTS, input_shape=SHAPE)
    with pytest.raises(UsageError):
        clf.fit(to_float_nchw(dataset()[0]), dataset()[1], nb_epochs=1)


def test_tail_classifier_rejects_bad_mode_and_models_without_features():
    model, _ = model_and_optimizer()
    with pytest.raises(UsageError):
        TAILPyTorchClassifier(model, build_loss("bsl", COUNTS), C, train_counts=COUNTS, tail_mode="kl",
                              input_shape=SHAPE)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), C))
    with pytest.raises(UsageError):
        TAILPyTorchClassifier(flat, build_loss("bsl", COUNTS), C, train_counts=COUNTS, input_shape=SHAPE)


# --------------------------------------------------------------------------- 5. REAT


def reat_trainer(seed=0, rebalance="reference", tail="reference", attack_steps=2, random_start="uniform", **kwargs):
    clf = make_classifier(seed, tail=tail)
    attack = RebalancedPGD(clf, train_counts=COUNTS, rebalance=rebalance, eps=EPS, eps_step=STEP,
                           max_iter=attack_steps, random_start=random_start)
    return REATTrainer(clf, attack=attack, train_counts=COUNTS, rebalance=rebalance, batch_size=16,
                       eval_attack_steps=1, **kwargs)


def record_attack_weights(trainer):
    """Record the attack's class weights at every craft call."""
    seen = []
    original = trainer.craft

    def craft(x, y):
        seen.append(trainer.attack.class_weights.clone())
        return original(x, y)

    trainer.craft = craft
    return seen


@pytest.mark.parametrize("rebalance", ["reference", "logit"])
def test_reat_counts_adversarial_predictions_and_updates_weights(rebalance):
    x, y = dataset()
    trainer = reat_trainer(rebalance=rebalance, nb_epochs=2)
    calls = record_training_loss(trainer.get_classifier())
    weights_seen = record_attack_weights(trainer)
    loader = DeviceLoader(x, y, 16, shuffle=True, augment=True, seed=0)
    history = trainer.fit_loader(loader)

    batches = len(loader)
    assert len(calls) == 2 * batches and len(weights_seen) == 2 * batches
    assert all(c["training"] for c in calls)  # counted from train-mode logits
    assert len(trainer.adv_pred_history) == 2
    first = rbl_class_weights(COUNTS, COUNTS)  # before the first epoch n_c = N_c
    for epoch in range(2):
        epoch_calls = calls[epoch * batches:(epoch + 1) * batches]
        independent = torch.bincount(torch.cat([c["pred"] for c in epoch_calls]), minlength=C)
        record = trainer.adv_pred_history[epoch]
        assert record["epoch"] == epoch
        assert sum(record["adv_pred_counts"]) == N
        assert record["adv_pred_counts"] == independent.tolist()
        for c in range(C):
            assert history[epoch][f"adv_pred/class_{c}"] == float(independent[c])
        # weights used during epoch e: from the training counts (e = 0), else from epoch e - 1's counts
        expected = first if epoch == 0 else rbl_class_weights(COUNTS, trainer.adv_pred_history[epoch - 1]
                                                              ["adv_pred_counts"])
        for w in weights_seen[epoch * batches:(epoch + 1) * batches]:
            assert torch.equal(w, expected)
        assert record["attack_class_weights"] == expected.tolist()
        for c in range(C):
            assert history[epoch][f"rbl_weight/class_{c}"] == float(expected[c])
    # after the last epoch the attack holds the weights of the last epoch's counts
    assert torch.equal(trainer.attack.class_weights,
                       rbl_class_weights(COUNTS, trainer.adv_pred_history[-1]["adv_pred_counts"]))
    assert trainer.epoch_artifacts() == {"adv_pred_hist.json": trainer.adv_pred_history}


def test_reat_art_fit_on_numpy():
    x, y = dataset()
    trainer = REATTrainer(make_classifier(tail="reference"), train_counts=COUNTS, nb_epochs=1, batch_size=16,
                          max_iter=1, eval_attack_steps=1)
    assert isinstance(trainer.attack, RebalancedPGD) and trainer.attack.max_iter == 1
    before = params(trainer.get_classifier().model)
    trainer.fit(x, np.eye(C)[y], validation_data=(x[::4], y[::4]))
    assert [sum(r["adv_pred_counts"]) for r in trainer.adv_pred_history] == [N]
    assert {"train/loss_lt", "train/loss_tail", "val/clean_acc", "val/pgd1_acc"} <= set(trainer.history[0])
    assert all(not torch.equal(a, b) for a, b in zip(before, params(trainer.get_classifier().model)))


def test_reat_checkpoint_restores_attack_state(tmp_path):
    x, y = dataset()
    trainer = reat_trainer(rebalance="logit", nb_epochs=1, checkpoint_dir=tmp_path)
    trainer.fit_loader(DeviceLoader(x, y, 16, shuffle=True))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    fresh = reat_trainer(seed=5, rebalance="logit", nb_epochs=1)
    assert not torch.equal(fresh.attack.class_weights, trainer.attack.class_weights)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.attack.class_weights, trainer.attack.class_weights)
    assert fresh.adv_pred_history == trainer.adv_pred_history


# --------------------------------------------------------------------------- 6. PGD-AT


def pgd_trainer(seed=0, random_start="uniform", attack_steps=1, scheduler=True, tail=None, **kwargs):
    clf = make_classifier(seed, tail=tail)
    attack = TensorPGD(clf, eps=EPS, eps_step=STEP, max_iter=attack_steps, random_start=random_start)
    sched = torch.optim.lr_scheduler.MultiStepLR(clf.optimizer, milestones=[1], gamma=0.1) if scheduler else None
    kwargs.setdefault("eval_attack_steps", 1)
    return PGDATTrainer(clf, attack=attack, batch_size=16, scheduler=sched, **kwargs)


def test_attack_chunk_reaches_the_training_and_validation_attacks():
    clf = make_classifier(0)
    assert PGDATTrainer(clf, batch_size=16).attack.gradient_chunk is None  # the attacks' "auto"
    trainer = PGDATTrainer(clf, batch_size=16, attack_chunk=5)
    assert trainer.attack.gradient_chunk == trainer.eval_attack.gradient_chunk == 5
    assert PGDATTrainer(clf, batch_size=16, attack_chunk=0).attack.chunk_rows == 0


@pytest.mark.parametrize("batch_size", [16, 8])
def test_scheduler_is_stepped_once_per_epoch(batch_size):
    x, y = dataset()
    trainer = pgd_trainer(nb_epochs=2)
    calls = record_training_loss(trainer.get_classifier())
    loader = DeviceLoader(x, y, batch_size, shuffle=True)
    history = trainer.fit_loader(loader)
    batches = len(loader)
    assert batches == N // batch_size
    assert [c["lr"] for c in calls[:batches]] == [0.1] * batches
    assert [c["lr"] for c in calls[batches:]] == pytest.approx([0.01] * batches, rel=1e-12)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.01], rel=1e-12)
    assert trainer.scheduler.last_epoch == 2


def test_checkpoints_last_and_best(tmp_path):
    """best.pt holds the epoch with the highest validation robust accuracy (first one on ties)."""
    x, y = dataset()
    trainer = pgd_trainer(nb_epochs=4, checkpoint_dir=tmp_path / "ckpt", checkpoint_meta={"run": "t"})
    scores = iter([0.2, 0.5, 0.5, 0.3])
    trainer.validate = lambda loader: {trainer.selection_metric: next(scores)}
    states = []
    trainer.callbacks.append(lambda epoch, metrics: states.append(
        {k: v.clone() for k, v in trainer.get_classifier().model.state_dict().items()}))
    trainer.fit_loader(DeviceLoader(x, y, 16, shuffle=True), val_loader=object())

    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["best.json", "best.pt", "last.json", "last.pt"]  # manifests; no temporary files left behind
    last = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)
    assert last["epoch"] == 4 and best["epoch"] == 2
    assert best["best_metric"] == 0.5 and last["best_metric"] == 0.5
    assert_state_equal(last["model"], states[3])
    assert_state_equal(best["model"], states[1])
    assert last["meta"] == {"run": "t"}
    assert last["scheduler"]["last_epoch"] == 4


def test_checkpoints_with_real_validation_and_without_validation(tmp_path):
    x, y = dataset()
    trainer = pgd_trainer(nb_epochs=2, checkpoint_dir=tmp_path / "val")
    trainer.fit(x, y, validation_data=(x[::4], y[::4]))
    scores = [h["val/pgd1_acc"] for h in trainer.history]
    best = torch.load(tmp_path / "val" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 + int(np.argmax(scores))
    assert best["best_metric"] == max(scores)

    trainer = pgd_trainer(nb_epochs=2, checkpoint_dir=tmp_path / "noval")
    trainer.fit(x, y)
    last = torch.load(tmp_path / "noval" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "noval" / "best.pt", weights_only=True)
    assert last["epoch"] == best["epoch"] == 2  # without validation the last epoch is the best
    assert_state_equal(best["model"], last["model"])


def test_state_dict_round_trip():
    x, y = dataset()
    trainer = pgd_trainer(nb_epochs=1)
    trainer.fit_loader(DeviceLoader(x, y, 16, shuffle=True))
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = pgd_trainer(seed=3, nb_epochs=1)
    assert not torch.equal(params(fresh.get_classifier().model)[0], params(trainer.get_classifier().model)[0])
    fresh.load_state_dict(state)
    assert fresh.start_epoch == 1 and fresh.best_metric == trainer.best_metric
    assert fresh.scheduler.last_epoch == 1
    assert fresh.get_classifier().optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert_state_equal(fresh.state_dict(), trainer.state_dict())


@pytest.mark.parametrize("method", ["pgd-at", "reat-logit"])
def test_resume_from_last_checkpoint_reproduces_uninterrupted_training(tmp_path, method):
    """2 epochs in one go == 1 epoch, checkpoint, fresh process state, 1 more epoch (deterministic attack)."""
    x, y = dataset()

    def build(seed, **kwargs):
        if method == "pgd-at":
            return pgd_trainer(seed, random_start="none", attack_steps=2, nb_epochs=2, **kwargs)
        return reat_trainer(seed, rebalance="logit", random_start="none", nb_epochs=2, **kwargs)

    def loader():
        return DeviceLoader(x, y, 16, shuffle=True, augment=True, seed=4)

    straight = build(0)
    straight.fit_loader(loader())

    first = build(0, checkpoint_dir=tmp_path)
    first.fit_loader(loader(), nb_epochs=1)
    resumed = build(7)
    resumed.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True))
    resumed.fit_loader(loader())

    for a, b in zip(params(straight.get_classifier().model), params(resumed.get_classifier().model)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert resumed.start_epoch == 2
    if method != "pgd-at":
        assert resumed.adv_pred_history == straight.adv_pred_history
        assert torch.equal(resumed.attack.class_weights, straight.attack.class_weights)


def test_checkpoint_history_includes_the_saved_epoch(tmp_path):
    x, y = dataset()
    trainer = pgd_trainer(nb_epochs=2, checkpoint_dir=tmp_path)
    trainer.fit_loader(DeviceLoader(x, y, 16, shuffle=True))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert len(last["history"]) == last["epoch"] == 2
    resumed = pgd_trainer(nb_epochs=2)
    resumed.load_state_dict(last)
    assert len(resumed.history) == resumed.start_epoch


def test_art_fit_accepts_float_nchw_like_uint8_nhwc():
    """ART-style fit(x, y): float NCHW in [0, 1] trains exactly like the same images as uint8 NHWC."""
    x, y = dataset()
    results = []
    for images in (x, to_float_nchw(x)):
        trainer = pgd_trainer(nb_epochs=1, attack_steps=2)
        torch.manual_seed(11)  # the attack's uniform start draws from the global generator
        trainer.fit(images, y)
        results.append(params(trainer.get_classifier().model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(results[0][0], params(make_classifier(0).model)[0])  # it trained


def test_fit_one_hot_labels_equal_integer_labels():
    x, y = dataset()
    results = []
    for labels in (y, np.eye(C, dtype=np.float32)[y]):
        trainer = pgd_trainer(nb_epochs=1, random_start="none")
        trainer.fit(to_float_nchw(x), labels)
        results.append(params(trainer.get_classifier().model))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- METHODS registry


def method_parts(seed=0):
    model, optimizer = model_and_optimizer(seed)
    return MethodParts(model, build_loss("bsl", COUNTS), optimizer, C, np.array(COUNTS), SHAPE, torch.device("cpu"))


def config(**overrides):
    values = dict(epochs=2, batch_size=16, eps=EPS, step_size=STEP, attack_steps=3, eval_attack_steps=2,
                  milestones=[1])
    values.update(overrides)
    return TrainConfig(**values).validate()


def test_methods_build_pgd_at(tmp_path):
    parts = method_parts()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(parts.optimizer, milestones=[1])
    trainer = METHODS.get("pgd-at")(config(method="pgd-at"), parts, scheduler=scheduler, checkpoint_dir=tmp_path)
    assert type(trainer) is PGDATTrainer
    clf = trainer.get_classifier()
    assert type(clf) is LongTailClassifier
    assert clf.model is parts.model and clf.optimizer is parts.optimizer and clf.loss_fn is parts.loss
    assert type(trainer.attack) is TensorPGD
    assert (trainer.attack.eps, trainer.attack.eps_step, trainer.attack.max_iter) == (EPS, STEP, 3)
    assert trainer.eval_attack.max_iter == 2 and trainer.eval_attack.eps == EPS
    assert (trainer.nb_epochs, trainer.batch_size) == (2, 16)
    assert trainer.scheduler is scheduler and trainer.checkpoint_dir == Path(tmp_path)
    x, y = dataset()
    trainer.fit_loader(DeviceLoader(x, y, 16), nb_epochs=1)
    assert (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("tail", ["reference", "paper", "none"])
@pytest.mark.parametrize("groups", ["reference", "paper"])
def test_methods_build_reat(tail, groups):
    parts = method_parts()
    cfg = config(method="reat", rbl="logit", tail=tail, tail_weight=0.5, class_groups=groups)
    trainer = METHODS.get("reat")(cfg, parts)
    assert type(trainer) is REATTrainer
    assert type(trainer.attack) is RebalancedPGD
    assert trainer.attack.rebalance == "logit"
    assert np.array_equal(trainer.attack.train_counts, COUNTS)
    assert (trainer.attack.eps, trainer.attack.eps_step, trainer.attack.max_iter) == (EPS, STEP, 3)
    assert torch.equal(trainer.attack.class_weights, rbl_class_weights(COUNTS, COUNTS))
    clf = trainer.get_classifier()
    assert clf.model is parts.model and clf.optimizer is parts.optimizer
    if tail == "none":
        assert type(clf) is LongTailClassifier
    else:
        assert type(clf) is TAILPyTorchClassifier
        assert (clf.tail_mode, clf.tail_weight) == (tail, 0.5)
        assert clf.tail_classes == class_groups(C, groups)["tail"]
        np.testing.assert_array_equal(clf.train_counts, COUNTS)


def test_methods_default_attack_steps_and_unknown_method():
    trainer = METHODS.get("pgd-at")(config(attack_steps=None), method_parts())
    assert trainer.attack.max_iter == 10
    with pytest.raises(UsageError):
        METHODS.get("fgsm-at")
