"""Every REAT variant trains end to end through `train()` and logs what it promises.

`--method reat` with each `--rbl` scheme and each `--tail` form, on a tiny long-tailed npz dataset
written here: the run finishes, the per-epoch prediction histogram of the training adversarial
examples covers every training image, and the attack's class weights logged for epoch 0 are the
ones of the scheme (independently recomputed for the schemes defined by training counts).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from art_reat.attacks import REBALANCE_SCHEMES
from art_reat.config import TrainConfig
from art_reat.training import train

COUNTS = [30, 18, 11, 7, 5, 4, 3, 3, 2, 2]


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lt")
    rng = np.random.default_rng(0)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)]).astype(np.int64)
    np.savez(root / "train.npz", x=rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8), y=y)
    np.savez(root / "test.npz", x=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
             y=np.repeat(np.arange(10), 2).astype(np.int64))
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking store for the module: creating an MLflow SQLite schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def run_reat(npz_dir, store, tmp_path, **overrides):
    config = TrainConfig(dataset="npz", data_dir=str(npz_dir), model="small-cnn", method="reat", epochs=2,
                         batch_size=32, attack_steps=1, eval_attack_steps=1, val_fraction=0.0,
                         tracking_uri=store, output_dir=str(tmp_path / "out"),
                         experiment="variants", **overrides)
    result = train(config)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    return result, client.get_run(result.run_id), client


def expected_first_weights(scheme: str) -> np.ndarray:
    n = np.asarray(COUNTS, dtype=np.float64)
    if scheme == "rw":
        w = 1 / n
    elif scheme == "rws":
        w = np.sqrt(1 / n)
    elif scheme == "enr":
        beta = (n.sum() - 1) / n.sum()
        w = (1 - beta) / (1 - beta ** n)
    elif scheme in ("reference", "logit"):  # first epoch: predicted counts = training counts
        beta = (n - 1) / n
        effective = (1 - beta ** n) / (1 - beta)
        w = 1 / (effective + 1e-5)
    else:  # brw, none: the true-label weights stay uniform
        w = np.ones_like(n)
    return w / w.sum() * len(n)


@pytest.mark.parametrize("rbl", REBALANCE_SCHEMES)
def test_every_rbl_scheme_trains_and_logs_its_weights(npz_dir, store, tmp_path, rbl):
    result, run, client = run_reat(npz_dir, store, tmp_path, rbl=rbl, tail="reference")
    assert run.info.status == "FINISHED"
    for epoch, metrics in enumerate(result.history):
        counts = [metrics[f"adv_pred/class_{c}"] for c in range(10)]
        assert sum(counts) == sum(COUNTS), (epoch, counts)
    first = [result.history[0][f"rbl_weight/class_{c}"] for c in range(10)]
    np.testing.assert_allclose(first, expected_first_weights(rbl), rtol=1e-4)
    hist = json.loads(open(client.download_artifacts(run.info.run_id, "adv_pred_hist.json", str(tmp_path))).read())
    assert [h["epoch"] for h in hist] == [0, 1]


@pytest.mark.parametrize("tail", ["reference", "paper", "none"])
def test_every_tail_form_trains(npz_dir, store, tmp_path, tail):
    result, run, _ = run_reat(npz_dir, store, tmp_path, rbl="logit", tail=tail)
    assert run.info.status == "FINISHED"
    logged_tail = "train/loss_tail" in result.history[0]
    assert logged_tail == (tail != "none")
