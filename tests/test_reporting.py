"""Sweeps, reports, figures and Fig. 3's AE-distance recorder (issue 5).

Every MLflow store is a temporary SQLite file; "fake" runs are written directly with the MLflow
client (params, tags, metrics), so that the expected tables can be computed by hand. The real
sweep trains small-cnn on a tiny random npz dataset (16x16 images) for one epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from art_reat.config import TrainConfig
from art_reat.experiments.sweep import (CONFIG_HASH_TAG, KIND_TAG, config_hash, plan_sweep, run_sweep)
from art_reat.reporting import ReportConfig, group_runs, load_runs, make_report, mean_se
from art_reat.reporting import figures
from art_reat.tracking.mlflow_tracking import PARENT_RUN_TAG, _param_str
from cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
C = 10


def uri_of(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def assert_png(path: Path) -> None:
    path = Path(path)
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


# ----------------------------------------------------------------------------- mean and standard error


def test_mean_and_standard_error_match_an_independent_computation():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        values = rng.uniform(0, 1, n).tolist()
        mean, se = mean_se(values)
        assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert se == pytest.approx(statistics.stdev(values) / math.sqrt(n), abs=1e-12)  # n - 1 denominator
    assert mean_se([0.25]) == (0.25, None)  # one seed: no standard error
    assert math.isnan(mean_se([])[0]) and mean_se([])[1] is None
    # by hand: 0.60, 0.62, 0.64 -> sample std 0.02, SE 0.02 / sqrt(3)
    mean, se = mean_se([0.60, 0.62, 0.64])
    assert mean == pytest.approx(0.62) and se == pytest.approx(0.02 / math.sqrt(3))


# ----------------------------------------------------------------------------- fake finished runs

ATTACK_KEYS = ("clean_acc", "robust_acc/pgd20", "robust_acc/pgd100", "robust_acc/cw100", "robust_acc/aa")


def log_fake_run(client, experiment_id: str, start: int, method: str, ur: float, seed: int,
                 metrics: Dict[str, float], epoch_seconds: List[float], status: str = "FINISHED",
                 parent: Optional[str] = None, extra_tags: Optional[dict] = None) -> str:
    from mlflow.entities import Metric, Param

    tags = {"method": method, "ur": str(ur), "seed": str(seed), **(extra_tags or {})}
    if parent:
        tags[PARENT_RUN_TAG] = parent
    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=f"{method}-{ur:g}-{seed}")
    run_id = run.info.run_id
    config = TrainConfig(method=method, ur=ur, seed=seed, model="small-cnn")
    params = [Param(k, _param_str(v)) for k, v in config.to_dict().items()]
    batch = [Metric(k, v, 0, 0) for k, v in metrics.items()]
    for epoch, seconds in enumerate(epoch_seconds):
        batch.append(Metric("epoch_seconds", seconds, 0, epoch))
        batch.append(Metric("ae_distance", 1.0 / (epoch + 1 + seed), 0, epoch))
        for c in range(C):
            batch.append(Metric(f"adv_pred/class_{c}", float(100 - 5 * c + epoch * c), 0, epoch))
    client.log_batch(run_id, params=params, metrics=batch)
    client.set_terminated(run_id, status)
    return run_id


def attack_metrics(clean, pgd20, pgd100, cw100, aa, head, body, tail, extra=None) -> Dict[str, float]:
    out = dict(zip(ATTACK_KEYS, (clean, pgd20, pgd100, cw100, aa)))
    out.update({"robust_acc/pgd20/head": head, "robust_acc/pgd20/body": body, "robust_acc/pgd20/tail": tail})
    for c in range(C):
        out[f"clean_acc/class_{c}"] = clean
        out[f"robust_acc/pgd20/class_{c}"] = pgd20
    out.update({"audit/robust_acc/pgd10": pgd20 + 0.01, "audit/robust_acc/pgd20": pgd20,
                "audit/robust_acc/pgd50": pgd100, "audit/robust_acc/pgd100": pgd100})
    out.update(extra or {})
    return out


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """Group A: PGD-AT UR=100, seeds 0-2; group B: REAT UR=100, seeds 0-1 (children of a sweep parent,
    with the logit-scaled attack too); group C: REAT UR=50, seed 0, training metrics only. Ignored:
    a FAILED run, an older run with a seed that is run again, and the sweep parent itself."""
    folder = tmp_path_factory.mktemp("fake_store")
    uri = uri_of(folder)
    client = client_of(uri)
    exp = client.create_experiment("exp", artifact_location=(folder / "artifacts").as_uri())
    t0 = 1_700_000_000_000
    # an older PGD-AT seed-0 run: replaced by the newer one with the same seed
    log_fake_run(client, exp, t0, "pgd-at", 100.0, 0, attack_metrics(.10, .10, .10, .10, .10, .1, .1, .1), [99.0])
    a = [(.60, .30, .29, .28, .27, .50, .30, .10), (.62, .31, .30, .29, .28, .50, .31, .12),
         (.64, .32, .31, .30, .29, .50, .32, .14)]
    for seed, values in enumerate(a):
        log_fake_run(client, exp, t0 + 10 + seed, "pgd-at", 100.0, seed, attack_metrics(*values),
                     [10.0 + 2 * seed, 12.0 + 2 * seed])
    log_fake_run(client, exp, t0 + 15, "pgd-at", 100.0, 3, attack_metrics(.99, .99, .99, .99, .99, .9, .9, .9),
                 [1.0], status="FAILED")
    parent = client.create_run(exp, start_time=t0 + 19, tags={KIND_TAG: "sweep"}, run_name="sweep").info.run_id
    client.set_terminated(parent, "FINISHED")
    b = [(.63, .33, .32, .30, .29, .48, .33, .20, .25), (.65, .35, .34, .30, .31, .50, .35, .22, .27)]
    for seed, values in enumerate(b):
        log_fake_run(client, exp, t0 + 20 + seed, "reat", 100.0, seed,
                     attack_metrics(*values[:8], extra={"robust_acc/pgd20-x10": values[8]}),
                     [20.0 + 2 * seed, 22.0 + 2 * seed], parent=parent)
    training_only = {"test/clean_acc": .70, "test/pgd20_acc": .36, "test/pgd20_acc/head": .55,
                     "test/pgd20_acc/body": .35, "test/pgd20_acc/tail": .25}
    training_only.update({f"test/clean_acc/class_{c}": .7 for c in range(C)})
    training_only.update({f"test/pgd20_acc/class_{c}": .36 for c in range(C)})
    log_fake_run(client, exp, t0 + 30, "reat", 50.0, 0, training_only, [30.0])
    return uri, parent


EXPECTED_MD = """\
| Method | UR | n | Clean | PGD-20 | PGD-100 | CW-100 | AA | PGD-20 (x10) | Head (PGD-20) | Body (PGD-20) | Tail (PGD-20) |
|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| pgd-at | 100 | 3 | 62.00 (1.15) | 31.00 (0.58) | 30.00 (0.58) | 29.00 (0.58) | 28.00 (0.58) | - | 50.00 (0.00) | 31.00 (0.58) | 12.00 (1.15) |
| reat | 100 | 2 | 64.00 (1.00) | 34.00 (1.00) | **33.00** (1.00) | **30.00** (0.00) | **30.00** (1.00) | **26.00** (1.00) | 49.00 (1.00) | 34.00 (1.00) | 21.00 (1.00) |
| reat | 50 | 1 | **70.00** | **36.00** | - | - | - | - | **55.00** | **35.00** | **25.00** |
"""

EXPECTED_COST_MD = """\
| Method | UR | n | s / epoch | Epochs |
|:---|:---|---:|---:|---:|
| pgd-at | 100 | 3 | 13.0 (1.2) | 2.0 (0.0) |
| reat | 100 | 2 | 22.0 (1.0) | 2.0 (0.0) |
| reat | 50 | 1 | 30.0 | 1.0 |
"""


def invoke(args: List[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def test_report_md_table_over_fake_runs(fake_store, tmp_path):
    uri, _ = fake_store
    result = invoke(["report", "--experiment", "exp", "--tracking-uri", uri, "--no-log", "--out", str(tmp_path)])
    assert EXPECTED_MD in result.stdout
    assert EXPECTED_COST_MD in result.stdout
    assert (tmp_path / "accuracy.md").read_text() == EXPECTED_MD
    assert (tmp_path / "training_cost.md").read_text() == EXPECTED_COST_MD
    for name in ("adv_pred_distribution.png", "per_class_accuracy.png", "robust_acc_vs_steps.png",
                 "ae_distance.png", "training_cost.png"):
        assert_png(tmp_path / name)


def test_report_csv_and_latex(fake_store):
    uri, _ = fake_store
    text = invoke(["report", "--experiment", "exp", "--tracking-uri", uri, "--no-log", "--format", "csv"]).stdout
    rows = list(csv.reader(io.StringIO(text.split("\n\n")[0])))
    header = rows[0]
    assert header[:3] == ["Method", "UR", "n"] and header[3:5] == ["Clean", "Clean SE"]
    table = {(r[0], r[1]): dict(zip(header, r)) for r in rows[1:]}
    assert set(table) == {("pgd-at", "100"), ("reat", "100"), ("reat", "50")}
    pgd = table[("pgd-at", "100")]
    assert float(pgd["Clean"]) == pytest.approx(62.0) and float(pgd["Clean SE"]) == pytest.approx(2 / math.sqrt(3), abs=1e-4)
    assert pgd["PGD-20 (x10)"] == "" and pgd["n"] == "3"
    assert table[("reat", "50")]["Clean SE"] == "" and float(table[("reat", "50")]["Tail (PGD-20)"]) == pytest.approx(25)
    assert "**" not in text

    latex = invoke(["report", "--experiment", "exp", "--tracking-uri", uri, "--no-log", "--format", "latex"]).stdout
    assert "\\begin{tabular}{llrrrrrrrrrr}" in latex
    assert "Method & UR & n & Clean & PGD-20 & PGD-100 & CW-100 & AA & PGD-20 (x10) & Head (PGD-20)" in latex
    assert ("reat & 50 & 1 & \\textbf{70.00} & \\textbf{36.00} & - & - & - & - & \\textbf{55.00} & "
            "\\textbf{35.00} & \\textbf{25.00} \\\\") in latex
    assert ("pgd-at & 100 & 3 & 62.00 (1.15) & 31.00 (0.58) & 30.00 (0.58) & 29.00 (0.58) & 28.00 (0.58) & - & "
            "50.00 (0.00) & 31.00 (0.58) & 12.00 (1.15) \\\\") in latex


def test_report_of_a_sweep_parent_is_logged_to_it(fake_store, tmp_path):
    uri, parent = fake_store
    result = invoke(["report", "--experiment", "exp", "--tracking-uri", uri, "--parent-run", parent])
    lines = [l for l in result.stdout.splitlines() if l.startswith("| reat") or l.startswith("| pgd-at")]
    # only the sweep's children: one group, the method column alone defines it
    assert lines[0].startswith("| reat | 2 | **64.00** (1.00) | **34.00** (1.00)")
    assert len(lines) == 2  # accuracy and cost rows
    client = client_of(uri)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/accuracy.md", "report/training_cost.md", "report/adv_pred_distribution.png"} <= logged


def test_report_run_is_created_and_ignored_by_later_reports(fake_store):
    uri, _ = fake_store
    first = make_report(ReportConfig(experiment="exp", tracking_uri=uri))
    client = client_of(uri)
    run = client.get_run(first.logged_to)
    assert run.data.tags[KIND_TAG] == "report" and run.info.status == "FINISHED"
    assert "report/accuracy.md" in {a.path for a in client.list_artifacts(first.logged_to, "report")}
    second = make_report(ReportConfig(experiment="exp", tracking_uri=uri, log=False))
    assert second.text == first.text and second.logged_to is None


def test_grouping_uses_the_newest_run_of_a_seed_and_skips_failed_runs(fake_store):
    uri, _ = fake_store
    grouped = group_runs(load_runs("exp", uri))
    assert grouped.key_fields == ["method", "ur"]
    pgd = grouped.groups[0]
    assert grouped.label(pgd) == "pgd-at, UR=100"
    assert sorted(pgd.seeds) == ["0", "1", "2"]
    assert all(r.metrics["clean_acc"] > 0.5 for r in pgd.runs)


def test_report_errors_are_one_line(fake_store, tmp_path):
    uri, _ = fake_store
    result = CliRunner().invoke(main, ["report", "--experiment", "nope", "--tracking-uri", uri])
    assert result.exit_code == 2 and "no experiment 'nope'" in result.output


# ----------------------------------------------------------------------------- figures on tiny inputs


def test_every_figure_function_writes_a_png(tmp_path):
    groups = {"head": [0], "body": [1], "tail": [2]}
    counts = {"pgd-at": np.array([[5, 3, 1], [6, 2, 1]]), "reat": np.array([[4, 3, 2], [3, 3, 3]])}
    assert_png(figures.adv_pred_distribution_figure(counts, tmp_path / "a.png", groups, train_counts=[5, 3, 1]))
    accuracy = {"pgd-at": {"clean": [0.9, 0.5, 0.1], "robust": [0.5, 0.2, 0.0]}, "reat": {"clean": [0.8, 0.6, 0.2]}}
    assert_png(figures.per_class_accuracy_figure(accuracy, tmp_path / "b.png", groups))
    assert_png(figures.attack_steps_figure({"pgd-at": {10: 0.4, 20: 0.38, 100: 0.37}}, tmp_path / "c.png"))
    assert_png(figures.ae_distance_figure({"pgd-at": [(0, 1.2), (1, 0.8)], "reat": [(0, 1.0)]}, tmp_path / "d.png"))
    assert_png(figures.training_cost_figure({"pgd-at": (46.0, 1.0), "reat": (54.0, None)}, tmp_path / "e.png"))
    rng = np.random.default_rng(0)
    assert_png(figures.tsne_scatter_figure(rng.normal(size=(9, 2)), np.arange(9) % 3, tmp_path / "f.png", groups))


def test_tsne_figure_attacks_the_model_and_embeds_its_features(tmp_path):
    from art_reat.attacks import TensorPGD
    from art_reat.estimators import LongTailClassifier
    from art_reat.models import build_model

    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3).eval()
    classifier = LongTailClassifier(model, torch.nn.CrossEntropyLoss(), 3, input_shape=(3, 16, 16),
                                    device=torch.device("cpu"))
    attack = TensorPGD(classifier, eps=8 / 255, eps_step=2 / 255, max_iter=1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    features = figures.adversarial_features(model, x, y, attack)
    assert features.shape == (12, model.feature_dim)
    assert not np.allclose(features, figures.adversarial_features(model, x, y, None))  # the attack did something
    assert_png(figures.tsne_figure(model, x, y, attack, {"head": [0], "body": [1], "tail": [2]}, tmp_path / "t.png"))


# ----------------------------------------------------------------------------- sweeps


def test_sweep_plan_is_the_product_and_fails_early():
    plan = plan_sweep({"model": "small-cnn"}, {"method": ["pgd-at", "reat"], "seed": [0, 1, 1], "ur": [100.0]})
    assert [v for v, _ in plan.children] == [{"method": m, "seed": s, "ur": 100.0} for m in ("pgd-at", "reat")
                                             for s in (0, 1)]
    assert plan.varying == {"method": ["pgd-at", "reat"], "seed": [0, 1]}
    assert len({config_hash(c) for _, c in plan.children}) == 4
    # the hash ignores where a run goes, not what it trains
    a = TrainConfig(seed=0)
    assert config_hash(a) == config_hash(TrainConfig(seed=0, experiment="x", run_name="y", output_dir="z"))
    assert config_hash(a) != config_hash(TrainConfig(seed=1))
    from art_reat.errors import UsageError

    with pytest.raises(UsageError, match="epochs"):
        plan_sweep({}, {"epochs": [1, 0]})
    with pytest.raises(UsageError, match="method"):
        plan_sweep({}, {"method": ["pgd-at", "nope"]})


def test_sweep_resume_skips_finished_children(tmp_path, monkeypatch):
    """A fake `train` (a run with the sweep's tags, no training): the third child fails once; the
    sweep run again resumes the same parent, skips the two finished children, trains the rest."""
    from art_reat import training
    from art_reat.tracking import tracked_run

    uri = uri_of(tmp_path)
    calls: List[int] = []
    fail_seed = {"value": 2}

    def fake_train(config, progress=False, parent_run_id=None, extra_tags=None):
        calls.append(config.seed)
        with tracked_run(config.tracking_uri, config.experiment, config.run_name,
                         {"method": config.method, **(extra_tags or {})}, parent_run_id=parent_run_id) as run:
            if config.seed == fail_seed["value"]:
                raise RuntimeError("boom")
            return training.TrainResult(run.run_id, config, [], {}, tmp_path)

    monkeypatch.setattr(training, "train", fake_train)
    base = {"tracking_uri": uri, "experiment": "sw", "model": "small-cnn"}
    plan = plan_sweep(base, {"seed": [0, 1, 2, 3]})
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(plan)
    assert calls == [0, 1, 2]
    client = client_of(uri)
    exp = client.get_experiment_by_name("sw").experiment_id
    parents = client.search_runs([exp], f"tags.`{KIND_TAG}` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    parent_id = parents[0].info.run_id

    fail_seed["value"] = None
    calls.clear()
    result = run_sweep(plan_sweep(base, {"seed": [3, 2, 1, 0]}))  # same sweep, flags in another order
    assert calls == [3, 2]
    assert result.resumed and result.parent_run_id == parent_id
    assert sorted(int(o.values["seed"]) for o in result.skipped) == [0, 1]
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'")
    status = sorted((c.data.tags[CONFIG_HASH_TAG], c.info.status) for c in children)
    assert len(children) == 5 and [s for _, s in status].count("FAILED") == 1
    assert {h for h, s in status if s == "FINISHED"} == {config_hash(c) for _, c in plan.children}
    sweep_json = json.loads(Path(client.download_artifacts(parent_id, "sweep.json", str(tmp_path))).read_text())
    assert [c["status"] for c in sweep_json["children"]] == ["trained", "trained", "skipped", "skipped"]

    calls.clear()
    run_sweep(plan, fresh=True)  # a new parent trains everything again
    assert calls == [0, 1, 2, 3]


def tiny_npz(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [12, 8, 4]).astype(np.int64)
    np.savez(folder / "train.npz", x=rng.integers(0, 256, (len(y), 16, 16, 3), dtype=np.uint8), y=y)
    yt = np.repeat(np.arange(3), 4).astype(np.int64)
    np.savez(folder / "test.npz", x=rng.integers(0, 256, (len(yt), 16, 16, 3), dtype=np.uint8), y=yt)
    return folder


def test_sweep_cli_trains_nested_runs_resumes_and_reports(tmp_path):
    data = tiny_npz(tmp_path)
    uri = uri_of(tmp_path)
    args = ["sweep", "--dataset", "npz", "--data-dir", str(data), "--model", "small-cnn", "--epochs", "1",
            "--batch-size", "8", "--attack-steps", "1", "--eval-attack-steps", "1", "--val-fraction", "0",
            "--method", "pgd-at", "--method", "reat", "--seed", "0", "--record-ae-distance", "6",
            "--tracking-uri", uri, "--experiment", "tiny", "--output-dir", str(tmp_path / "out")]
    first = invoke(args)
    assert "sweep: 2 run(s) over method {pgd-at, reat}" in first.stdout and "2 trained, 0 skipped" in first.stdout
    client = client_of(uri)
    exp = client.get_experiment_by_name("tiny").experiment_id
    parent = client.search_runs([exp], f"tags.`{KIND_TAG}` = 'sweep'")[0]
    assert json.loads(parent.data.params["sweep/method"]) == ["pgd-at", "reat"]
    children = client.search_runs([exp], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["pgd-at", "reat"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "ae_distance")] == [0]
        assert child.data.metrics["ae_distance"] > 0

    second = invoke(args)
    assert "(resumed): 0 trained, 2 skipped" in second.stdout
    assert len(client.search_runs([exp], "")) == 3  # nothing new but the reopened parent

    report = invoke(["report", "--experiment", "tiny", "--tracking-uri", uri, "--parent-run", parent.info.run_id,
                     "--out", str(tmp_path / "report")])
    assert "| pgd-at | 1 |" in report.stdout and "| reat | 1 |" in report.stdout
    assert "PGD-1" in report.stdout  # the training's own PGD-1 when no PGD-20 was run
    for name in ("adv_pred_distribution.png", "per_class_accuracy.png", "ae_distance.png", "training_cost.png"):
        assert_png(tmp_path / "report" / name)


def test_sweep_takes_every_train_option():
    from cli.main import train
    from cli.sweep import sweep

    train_names = {p.name for p in train.params} - {"resume"}  # train-only: a sweep resumes by running it again
    sweep_params = {p.name: p for p in sweep.params}
    assert train_names <= set(sweep_params)
    assert sweep_params["seed"].multiple and sweep_params["method"].multiple
    assert not sweep_params["experiment"].multiple and not sweep_params["tracking_uri"].multiple


# ----------------------------------------------------------------------------- Fig. 3 recorder


def test_ae_distance_recorder_does_not_change_training():
    """Same data, same seed: the recorder adds `ae_distance` and leaves the weights as they were."""
    from art_reat.trainers.ae_distance import AEDistanceRecorder
    from art_reat.data import DeviceLoader
    from art_reat.estimators import LongTailClassifier
    from art_reat.models import build_model
    from art_reat.trainers import PGDATTrainer

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    y = np.arange(24) % 3

    def fit(record: bool):
        torch.manual_seed(0)
        model = build_model("small-cnn", num_classes=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        clf = LongTailClassifier(model, torch.nn.CrossEntropyLoss(), 3, input_shape=(3, 16, 16), optimizer=opt,
                                 device=torch.device("cpu"))
        trainer = PGDATTrainer(clf, nb_epochs=2, batch_size=8, max_iter=1)
        if record:
            trainer.callbacks.append(AEDistanceRecorder.for_training(trainer, x, y, n=6, seed=0))
        history = trainer.fit_loader(DeviceLoader(x, y, 8, torch.device("cpu"), shuffle=True, seed=0), None, 2)
        return model, history

    plain, h0 = fit(False)
    recorded, h1 = fit(True)
    for a, b in zip(plain.state_dict().values(), recorded.state_dict().values()):
        assert torch.equal(a, b)
    assert "ae_distance" not in h0[0]
    assert [h["ae_distance"] > 0 for h in h1] == [True, True]
    assert sum(h1[0][f"adv_pred/class_{c}"] for c in range(3)) == 24  # every trainer counts AE predictions
