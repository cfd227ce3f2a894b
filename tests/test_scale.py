"""Speed paths and memory (issue 6): --amp, --channels-last, --compile, host->device copies, and
evaluation batches that adapt to out-of-memory errors.

Everything runs on the CPU (bf16 autocast, channels-last and torch.compile work there too); the
CUDA-only branches (pinned non-blocking copies, SyncBatchNorm, DDP device ids) are checked by
exercising their logic with CPU stand-ins.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from art_reat import accel
from art_reat.accel import AcceleratedModel, accelerate, ddp_options, full_precision, sync_batchnorm, to_device
from art_reat.attacks import TensorPGD, ThreatModel
from art_reat.data import DeviceLoader
from art_reat.distributed import BatchShard
from art_reat.errors import ArtReatError
from art_reat.estimators import LongTailClassifier, TAILPyTorchClassifier
from art_reat.evaluation import suite
from art_reat.evaluation.suite import is_out_of_memory, run_suite
from art_reat.models import build_model
from art_reat.trainers import PGDATTrainer, REATTrainer
from art_reat.trainers.trades import NormalStartPGD

C = 4
SIZE = 8


# one torch thread for the module (tests/conftest.py): small ops on 2 busy cores run far faster
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(n: int = 24, seed: int = 0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(n, SIZE, SIZE, 3)).astype(np.uint8), np.arange(n) % C


def classifier(model_name: str = "small-cnn", cls=LongTailClassifier, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=C, width=0.25) if model_name == "small-cnn" else build_model(
        model_name, num_classes=C)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return cls(model, nn.CrossEntropyLoss(), C, input_shape=(3, SIZE, SIZE), optimizer=optimizer, **kwargs)


# ----------------------------------------------------------------------------- AcceleratedModel


def test_amp_runs_the_forward_in_bf16_and_returns_float32():
    clf = classifier()
    original = clf.model
    seen = {}
    original.features[0][0].register_forward_hook(lambda m, i, o: seen.update(conv_out=o.dtype))
    wrapper = accelerate(clf, amp=True)
    assert isinstance(wrapper, AcceleratedModel) and clf.model is wrapper
    x = torch.rand(5, 3, SIZE, SIZE)
    logits = clf.model(x)
    features, logits2 = clf.model.forward_features(x)
    assert seen["conv_out"] == torch.bfloat16
    assert logits.dtype == features.dtype == logits2.dtype == torch.float32
    # validation and the final test: float32 throughout
    seen.clear()
    with full_precision(clf.model):
        assert clf.model(x).dtype == torch.float32
    assert seen["conv_out"] == torch.float32
    with torch.no_grad():
        reference = original(x)
    torch.testing.assert_close(logits.detach(), reference, atol=0.1, rtol=0.05)  # bf16 rounding only


def test_channels_last_model_and_inputs():
    clf = classifier()
    params_before = list(clf.model.parameters())
    seen = {}
    clf.model.features[0][0].register_forward_pre_hook(
        lambda m, i: seen.update(channels_last=i[0].is_contiguous(memory_format=torch.channels_last)))
    accelerate(clf, channels_last=True)
    assert all(a is b for a, b in zip(clf.model.parameters(), params_before))  # the optimiser's parameters
    conv = clf.model.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    clf.model(torch.rand(3, 3, SIZE, SIZE))
    assert seen["channels_last"]


def test_accelerated_model_looks_like_the_original():
    clf = classifier()
    original = clf.model
    keys = list(original.state_dict())
    names = [n for n, _ in original.named_parameters()]
    wrapper = accelerate(clf, amp=True, channels_last=True)
    assert list(wrapper.state_dict()) == keys  # checkpoints carry no prefix
    assert [n for n, _ in wrapper.named_parameters()] == names
    assert [n for n, _ in wrapper.named_buffers()] == [n for n, _ in original.named_buffers()]
    assert wrapper.head is original.head and wrapper.feature_dim == original.feature_dim
    wrapper.eval()
    assert not original.training and not wrapper._adapter.training
    wrapper.train()
    assert original.training and wrapper._adapter.training
    state = {k: torch.zeros_like(v) for k, v in original.state_dict().items()}
    wrapper.load_state_dict(state)
    assert float(original.head.weight.detach().abs().sum()) == 0
    with pytest.raises(RuntimeError, match="accelerated already"):
        accelerate(clf, amp=True)
    assert accelerate(classifier()) is None  # nothing asked: the model stays as it is


@pytest.mark.parametrize("method", ["pgd-at", "reat"])
def test_one_epoch_with_amp_and_channels_last(method):
    x, y = data()
    if method == "reat":
        clf = classifier(cls=TAILPyTorchClassifier, train_counts=[6] * C, tail_classes=[3])
        trainer = REATTrainer(clf, train_counts=np.array([6] * C), nb_epochs=1, batch_size=8, max_iter=2, seed=0)
    else:
        clf = classifier()
        trainer = PGDATTrainer(clf, nb_epochs=1, batch_size=8, max_iter=2, seed=0)
    before = [p.detach().clone() for p in clf.model.parameters()]
    accelerate(clf, amp=True, channels_last=True)
    metrics = trainer.train_epoch(0, DeviceLoader(x, y, 8, augment=True, shuffle=True))
    assert np.isfinite(metrics["train/loss"]) and sum(metrics[f"adv_pred/class_{c}"] for c in range(C)) == len(y)
    assert any(not torch.equal(a, b) for a, b in zip(before, clf.model.parameters()))  # it trained
    assert clf.model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    if method == "reat":
        assert "train/loss_tail" in metrics


def test_compile_builds_and_trains_one_step():
    """torch.compile on the CPU (needs gcc): the training forward and the attack's forward are
    compiled; checkpoints still hold the original module's keys. About 45 s on one core."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    x, y = data(8)
    clf = classifier()
    keys = list(clf.model.state_dict())
    trainer = PGDATTrainer(clf, nb_epochs=1, batch_size=8, max_iter=1, seed=0)
    wrapper = accelerate(clf, compile=True)
    assert wrapper.compiled and type(wrapper._plain).__name__ == "OptimizedModule"
    start = time.perf_counter()
    metrics = trainer.train_epoch(0, DeviceLoader(x, y, 8))
    assert np.isfinite(metrics["train/loss"])
    assert list(trainer.state_dict()["model"]) == keys
    assert time.perf_counter() - start < 600


def test_cuda_branches_of_ddp_and_syncbatchnorm_on_cpu():
    model = build_model("small-cnn", num_classes=C, width=0.25)
    params = list(model.parameters())
    assert sync_batchnorm(model, torch.device("cpu")) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # gloo: per-rank statistics
    converted = sync_batchnorm(model, torch.device("cuda", 0))
    assert converted is model and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))  # the optimiser keeps working
    assert ddp_options(torch.device("cuda", 3)) == {"device_ids": [3], "output_device": 3}
    assert ddp_options(torch.device("cpu")) == {}


def test_to_device_copies_and_the_pinned_non_blocking_branch(monkeypatch):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_device(array, "cpu", torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == array.astype(np.float32).tolist()
    # the accelerator branch, with the CPU standing in: pinned memory, then a non-blocking copy
    calls = []
    monkeypatch.setattr(accel.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self, raising=True)
    original_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append(("to", kwargs.get("non_blocking", False)))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    out = to_device(array, torch.device("meta"), torch.long)
    assert out.device.type == "meta" and out.dtype == torch.long
    assert calls[0] == "pin" and calls[1] == ("to", True)


def test_train_cli_with_amp_and_channels_last(tmp_path):
    """`art-reat train --amp --channels-last` end to end: options reach the config and the run."""
    from cli.main import main

    rng = np.random.RandomState(0)
    y = np.repeat(np.arange(C), [12, 8, 6, 6])
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "train.npz", x=rng.randint(0, 256, (len(y), SIZE, SIZE, 3)).astype(np.uint8), y=y)
    np.savez(tmp_path / "data" / "test.npz", x=rng.randint(0, 256, (8, SIZE, SIZE, 3)).astype(np.uint8),
             y=np.arange(8) % C)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--dataset", "npz", "--data-dir", str(tmp_path / "data"), "--model", "small-cnn", "--method",
            "reat", "--epochs", "1", "--batch-size", "16", "--attack-steps", "1", "--eval-attack-steps", "1",
            "--val-fraction", "0.2", "--device", "cpu", "--amp", "--channels-last", "--tracking-uri", uri,
            "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("art-reat").experiment_id])[0]
    params = run.data.params
    assert (params["amp"], params["channels_last"], params["compile"]) == ("True", "True", "False")
    assert run.info.status == "FINISHED" and "test/pgd1_acc" in run.data.metrics
    checkpoint = torch.load(tmp_path / "out" / run.info.run_id / "best.pt", weights_only=True)
    fresh = build_model("small-cnn", num_classes=C)
    fresh.load_state_dict(checkpoint["model"])  # an ordinary checkpoint


# ----------------------------------------------------------------------------- random start of a slice


@pytest.mark.parametrize("norm, attack_cls, start", [("inf", TensorPGD, "uniform"), (2, TensorPGD, "uniform"),
                                                     ("inf", TensorPGD, "one-sided"), ("inf", NormalStartPGD, "normal")])
def test_sharded_random_start_is_the_slice_of_the_whole_batch(norm, attack_cls, start):
    clf = classifier()
    kwargs = {} if attack_cls is NormalStartPGD else {"random_start": start}
    attack = attack_cls(clf, norm=norm, eps=8 / 255 if norm == "inf" else 0.5, eps_step=2 / 255, max_iter=1, **kwargs)
    x = torch.rand(7, 3, SIZE, SIZE)

    def delta(part, shard):
        attack.shard = shard
        try:
            return attack._random_delta(part, torch.Generator().manual_seed(5))
        finally:
            attack.shard = None

    whole = delta(x, None)
    pieces = [delta(x[a:b], BatchShard(a, b, 7)) for a, b in ((0, 4), (4, 6), (6, 7))]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="shard holds"):
        delta(x[:3], BatchShard(0, 4, 7))


# ----------------------------------------------------------------------------- out of memory in evaluation


class RaisingAttack:
    """An attack that runs out of memory above ``limit`` samples and otherwise returns x."""

    shard = None

    def __init__(self, limit: int, error=None) -> None:
        self.limit, self.sizes, self.shards = limit, [], []
        self.error = error or (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))

    def perturb(self, x, y, generator=None):
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise self.error()
        self.shards.append(self.shard)
        return x


def eval_classifier():
    clf = classifier()
    clf.model.eval()
    return clf


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_evaluation_chunks_halve_on_out_of_memory(monkeypatch):
    x, y = data(40)
    clf = eval_classifier()
    threat = ThreatModel.for_norm()
    reference = run_suite(clf, x, y, [], threat, C, batch_size=16)
    attack = RaisingAttack(limit=5)
    monkeypatch.setattr(suite, "build_attack", lambda *args, **kwargs: attack)
    with pytest.warns(RuntimeWarning, match=r"--batch-size 4 to start there"):
        result = run_suite(clf, x, y, ["pgd20"], threat, C, batch_size=16)
    # chunk 1 (16): 16 and 8 fail, 4 fits and is kept; chunk 2 (16): 4 x 4; chunk 3 (8): 2 x 4
    assert attack.sizes == [16, 8] + [4] * 4 + [4] * 4 + [4] * 2
    assert attack.shards[0] == BatchShard(0, 4, 16) and attack.shards[-1] == BatchShard(4, 8, 8)
    assert result.reports["pgd20"] == reference.reports["clean"]  # the identity attack: every sample predicted


def test_out_of_memory_down_to_one_sample_is_a_one_line_error(monkeypatch):
    x, y = data(6)
    attack = RaisingAttack(limit=0, error=lambda: RuntimeError("CUDA out of memory. Tried to allocate 20 MiB\nmore"))
    monkeypatch.setattr(suite, "build_attack", lambda *args, **kwargs: attack)
    with pytest.warns(RuntimeWarning), pytest.raises(ArtReatError) as info:
        run_suite(eval_classifier(), x, y, ["pgd20"], ThreatModel.for_norm(), C, batch_size=4)
    message = str(info.value)
    assert "\n" not in message and "--batch-size 1" in message and "out of memory" in message
    assert attack.sizes == [4, 2, 1]


def test_other_errors_are_not_retried(monkeypatch):
    x, y = data(6)
    attack = RaisingAttack(limit=0, error=lambda: RuntimeError("shape mismatch"))
    monkeypatch.setattr(suite, "build_attack", lambda *args, **kwargs: attack)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_suite(eval_classifier(), x, y, ["pgd20"], ThreatModel.for_norm(), C, batch_size=4)
    assert attack.sizes == [4]


def test_a_split_chunk_gives_the_same_adversarial_predictions(monkeypatch):
    """A real PGD that runs out of memory above 3 samples: the pieces draw the chunk's random start."""
    x, y = data(20)
    clf = eval_classifier()
    threat = ThreatModel.for_norm("linf", 16 / 255, 4 / 255)
    whole = run_suite(clf, x, y, ["pgd3"], threat, C, batch_size=10, seed=1)
    real_build = suite.build_attack
    sizes = []

    def build(*args, **kwargs):
        attack = real_build(*args, **kwargs)
        perturb = attack.perturb

        def limited(xb, yb, generator=None):
            sizes.append(int(xb.shape[0]))
            if xb.shape[0] > 3:
                raise RuntimeError("CUDA out of memory")
            return perturb(xb, yb, generator=generator)

        attack.perturb = limited
        return attack

    monkeypatch.setattr(suite, "build_attack", build)
    with pytest.warns(RuntimeWarning):
        split = run_suite(clf, x, y, ["pgd3"], threat, C, batch_size=10, seed=1)
    assert max(s for s in sizes if s <= 3) == 2 and sizes[:3] == [10, 5, 2]
    assert split.reports["pgd3"] == whole.reports["pgd3"]
