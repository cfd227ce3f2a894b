"""End-to-end tests of the `art-reat train` command line (click CliRunner, in-process).

Every run writes to a temporary SQLite MLflow store and a temporary output folder; nothing goes
into the repository's ./mlruns or ./outputs. The training runs use the real CIFAR-10 arrays of the
shared data folder (../shared/data beside the repository) and are skipped when it is absent; each
training run is done once per module and shared by the tests that read it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from click.testing import Result

from art_reat.config import TrainConfig
from support import describe, invoke

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
HAVE_DATA = all((DATA_DIR / "cifar10" / f"{split}.npz").is_file() for split in ("train", "test"))
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"real CIFAR-10 arrays not found at {DATA_DIR}/cifar10/{{train,test}}.npz"
)

NUM_CLASSES = 10
EPS = 8 / 255
# fast settings (seconds per run on a CPU); --eval-attack-steps 2 names the robust metrics "pgd2"
FAST = ["--model", "small-cnn", "--train-subset", "200", "--eval-samples", "50", "--attack-steps", "2",
        "--eval-attack-steps", "2", "--batch-size", "64"]
CIFAR10LT = ["--dataset", "cifar10lt", "--ur", "100", "--data-dir", str(DATA_DIR)]
GROUPS = ("head", "body", "tail")
DEFAULT_ATTACK_STEPS = 10  # PGD-10: the training attack of PGD-AT (and REAT) when --attack-steps is not given
EPOCH_METRICS = ("train/loss", "train/adv_acc", "val/clean_acc", "val/pgd2_acc", "lr", "epoch_seconds")


# ----------------------------------------------------------------------------- helpers




def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def all_runs(uri: str) -> list:
    """Every run in every experiment of the store (empty when the database was never created)."""
    from mlflow.tracking import MlflowClient

    db = Path(uri[len("sqlite:///"):])
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def param_str(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


@dataclass
class TrainedRun:
    """One `art-reat train` invocation and what it left in its MLflow store."""

    result: Result
    uri: str
    folder: Path
    output_dir: Path
    experiment: str
    expected: TrainConfig  # the resolved configuration the run should have logged
    runs: list
    run: object = None
    client: object = None

    def metric_history(self, key: str) -> list:
        return sorted(self.client.get_metric_history(self.run.info.run_id, key), key=lambda m: m.step)

    def artifact(self, path: str) -> Path:
        dst = self.folder / "downloads"
        dst.mkdir(exist_ok=True)
        return Path(self.client.download_artifacts(self.run.info.run_id, path, str(dst)))

    def artifact_paths(self, folder: Optional[str] = None) -> List[str]:
        return [f.path for f in self.client.list_artifacts(self.run.info.run_id, folder)]


def train_run(folder: Path, args: List[str], experiment: str, expected: Dict) -> TrainedRun:
    """Run `art-reat train ARGS` with a temporary store/output dir; require exit code 0."""
    from mlflow.tracking import MlflowClient

    uri = store_uri(folder)
    output_dir = folder / "out"
    result = invoke(["train", *args, "--tracking-uri", uri, "--output-dir", str(output_dir)])
    if result.exit_code != 0:
        pytest.fail("art-reat train failed:\n" + describe(result), pytrace=False)
    expected_config = TrainConfig(**{**expected, "tracking_uri": uri, "output_dir": str(output_dir)})
    trained = TrainedRun(result, uri, folder, output_dir, experiment, expected_config, all_runs(uri))
    trained.client = MlflowClient(tracking_uri=uri)
    if len(trained.runs) == 1:
        trained.run = trained.runs[0]
    return trained


def base_expected(**overrides) -> Dict:
    values = dict(dataset="cifar10lt", ur=100.0, data_dir=str(DATA_DIR), model="small-cnn", train_subset=200,
                  eval_samples=50, attack_steps=2, eval_attack_steps=2, batch_size=64, eps=EPS, step_size=EPS / 4)
    values.update(overrides)
    return values


# ----------------------------------------------------------------------------- the training runs (one each)


@pytest.fixture(scope="module")
def pgd_run(tmp_path_factory) -> TrainedRun:
    """PGD-AT, 2 epochs (LR decayed after the first), default experiment name, eps/step from defaults."""
    if not HAVE_DATA:
        pytest.skip(f"real CIFAR-10 arrays not found at {DATA_DIR}")
    args = [*CIFAR10LT, *FAST, "--method", "pgd-at", "--epochs", "2", "--lr", "0.05", "--milestones", "1",
            "--lr-gamma", "0.5", "--run-name", "cli-e2e-pgd"]
    expected = base_expected(method="pgd-at", epochs=2, lr=0.05, milestones=[1], lr_gamma=0.5,
                             run_name="cli-e2e-pgd")
    return train_run(tmp_path_factory.mktemp("pgd"), args, "art-reat", expected)


@pytest.fixture(scope="module")
def reat_run(tmp_path_factory) -> TrainedRun:
    """REAT with the default (reference) RBL and TAIL."""
    if not HAVE_DATA:
        pytest.skip(f"real CIFAR-10 arrays not found at {DATA_DIR}")
    args = [*CIFAR10LT, *FAST, "--method", "reat", "--epochs", "1", "--experiment", "cli-reat"]
    expected = base_expected(method="reat", epochs=1, experiment="cli-reat")
    return train_run(tmp_path_factory.mktemp("reat"), args, "cli-reat", expected)


CONFIG_YAML = """\
# values for the --config test: some are used as they are, some are overridden by flags
method: reat
model: small-cnn
batch-size: 64          # dashes in keys are allowed
eval_attack_steps: 2
rbl: reference          # overridden by --rbl logit
tail: reference         # overridden by --tail paper
epochs: 3               # overridden by --epochs 1
seed: 3
lr: 0.07
tail_weight: 0.5
experiment: cli-config
"""


@pytest.fixture(scope="module")
def config_run(tmp_path_factory) -> TrainedRun:
    """REAT --rbl logit --tail paper, with the rest of its options from a YAML file."""
    if not HAVE_DATA:
        pytest.skip(f"real CIFAR-10 arrays not found at {DATA_DIR}")
    folder = tmp_path_factory.mktemp("config")
    config_file = folder / "run.yaml"
    config_file.write_text(CONFIG_YAML)
    args = ["--config", str(config_file), *CIFAR10LT, "--train-subset", "200", "--eval-samples", "50",
            "--attack-steps", "2", "--rbl", "logit", "--tail", "paper", "--epochs", "1"]
    expected = base_expected(method="reat", rbl="logit", tail="paper", epochs=1, seed=3, lr=0.07, tail_weight=0.5,
                             experiment="cli-config")
    return train_run(folder, args, "cli-config", expected)


ALL_RUNS = ["pgd_run", "reat_run", "config_run"]
REAT_RUNS = ["reat_run", "config_run"]


@pytest.fixture(params=ALL_RUNS)
def any_run(request) -> TrainedRun:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=REAT_RUNS)
def reat_any(request) -> TrainedRun:
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------- 1. end to end (all runs)


@needs_data
def test_store_holds_exactly_one_finished_run(any_run):
    from mlflow import search_runs, set_tracking_uri

    assert len(any_run.runs) == 1, [r.info.status for r in any_run.runs]
    assert any_run.run.info.status == "FINISHED"
    set_tracking_uri(any_run.uri)
    try:
        frame = search_runs(experiment_names=[any_run.experiment])
    finally:
        set_tracking_uri(None)
    assert list(frame["run_id"]) == [any_run.run.info.run_id]
    # artifacts live beside the temporary store, not in the repository's ./mlruns
    assert any_run.run.info.artifact_uri.startswith(any_run.folder.as_uri())


@needs_data
def test_summary_table_matches_the_logged_test_metrics(any_run):
    out = any_run.result.stdout
    run_id = any_run.run.info.run_id
    assert f"run {run_id}" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["test"])
    assert header.split() == ["test", "overall", *GROUPS]
    metrics = any_run.run.data.metrics
    for name in ("clean", "pgd2"):
        row = next(line for line in lines if line.split()[:1] == [name]).split()
        values = [metrics[f"test/{name}_acc"]] + [metrics[f"test/{name}_acc/{g}"] for g in GROUPS]
        assert row[1:] == [f"{100 * v:.2f}%" for v in values], (name, row)
    assert f"checkpoints: {any_run.output_dir / run_id}" in out


@needs_data
def test_params_hold_the_full_resolved_config(any_run):
    params = any_run.run.data.params
    expected = any_run.expected.to_dict()
    missing = sorted(set(expected) - set(params))
    assert not missing, f"config fields not logged as params: {missing}"
    wrong = {k: (params[k], param_str(v)) for k, v in expected.items() if params[k] != param_str(v)}
    assert not wrong, f"param (logged, expected): {wrong}"
    n_train, n_val, n_test = (int(params[k]) for k in ("n_train", "n_val", "n_test"))
    assert n_train + n_val == 200 and n_val >= NUM_CLASSES and n_test == 50


@needs_data
def test_eps_defaults_to_8_over_255_and_step_size_to_eps_over_4(any_run):
    params = any_run.run.data.params
    assert float(params["eps"]) == pytest.approx(8 / 255, rel=1e-12)
    assert float(params["step_size"]) == pytest.approx(8 / 255 / 4, rel=1e-12)


@needs_data
def test_tags(any_run):
    tags = any_run.run.data.tags
    config = any_run.expected
    assert tags["method"] == config.method
    assert tags["dataset"] == "cifar10lt"
    assert float(tags["ur"]) == 100.0
    assert tags["model"] == "small-cnn"
    assert tags["loss"] == config.loss
    assert tags.get("git_commit", "").strip(), "git_commit tag missing or empty"


@needs_data
def test_per_epoch_metrics(any_run):
    epochs = any_run.expected.epochs
    for key in EPOCH_METRICS:
        history = any_run.metric_history(key)
        assert [m.step for m in history] == list(range(epochs)), key
        for m in history:
            assert math.isfinite(m.value), (key, m.value)
            if "acc" in key:
                assert 0.0 <= m.value <= 1.0, (key, m.value)
    assert all(m.value > 0 for m in any_run.metric_history("epoch_seconds"))
    assert all(m.value > 0 for m in any_run.metric_history("train/loss"))


@needs_data
def test_lr_follows_the_milestones(pgd_run):
    # --lr 0.05 --milestones 1 --lr-gamma 0.5: the second epoch runs at 0.025
    assert [m.value for m in pgd_run.metric_history("lr")] == pytest.approx([0.05, 0.025])


@needs_data
def test_final_test_metrics(any_run):
    metrics = any_run.run.data.metrics
    keys = []
    for name in ("clean", "pgd2"):
        keys += [f"test/{name}_acc"] + [f"test/{name}_acc/{g}" for g in GROUPS]
        keys += [f"test/{name}_acc/class_{c}" for c in range(NUM_CLASSES)]
    missing = [k for k in keys if k not in metrics]
    assert not missing, f"missing test metrics: {missing}"
    for key in keys:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
        assert [m.step for m in any_run.metric_history(key)] == [any_run.expected.epochs], key
    for name in ("clean", "pgd2"):  # 5 test images per class: overall = mean of the per-class accuracies
        per_class = [metrics[f"test/{name}_acc/class_{c}"] for c in range(NUM_CLASSES)]
        assert metrics[f"test/{name}_acc"] == pytest.approx(sum(per_class) / NUM_CLASSES)
        assert metrics[f"test/{name}_acc/tail"] == pytest.approx(sum(per_class[7:]) / 3)  # reference rule


@needs_data
def test_artifacts_config_json_and_best_checkpoint(any_run):
    assert "config.json" in any_run.artifact_paths()
    assert "checkpoints/best.pt" in any_run.artifact_paths("checkpoints")
    saved = json.loads(any_run.artifact("config.json").read_text())
    assert TrainConfig.from_dict(saved) == any_run.expected
    checkpoint = torch.load(any_run.artifact("checkpoints/best.pt"), map_location="cpu", weights_only=True)
    assert checkpoint["meta"]["config"] == any_run.expected.to_dict()
    assert checkpoint["meta"]["num_classes"] == NUM_CLASSES
    assert checkpoint["model"], "empty model state dict"
    assert (any_run.output_dir / any_run.run.info.run_id / "best.pt").is_file()


@needs_data
def test_train_subset_keeps_the_long_tail(pgd_run):
    data = json.loads(pgd_run.artifact("data.json").read_text())
    counts = data["train_counts"]
    assert len(counts) == NUM_CLASSES and sum(counts) == int(pgd_run.run.data.params["n_train"])
    assert all(n >= 1 for n in counts), counts
    assert counts == sorted(counts, reverse=True), f"not long-tailed: {counts}"
    assert counts[0] >= 20 * counts[-1], f"imbalance of UR=100 lost by --train-subset: {counts}"


@needs_data
def test_defaulted_attack_steps_are_logged_resolved(tmp_path):
    # a tiny run (20 images, one batch) without --attack-steps: the method default is used
    args = [*CIFAR10LT, "--model", "small-cnn", "--method", "pgd-at", "--epochs", "1", "--train-subset", "20",
            "--val-fraction", "0", "--eval-samples", "10", "--eval-attack-steps", "1", "--batch-size", "32"]
    run = train_run(tmp_path, args, "art-reat", base_expected(
        method="pgd-at", epochs=1, train_subset=20, val_fraction=0.0, eval_samples=10, eval_attack_steps=1,
        batch_size=32, attack_steps=DEFAULT_ATTACK_STEPS))
    assert run.run.data.params["attack_steps"] == str(DEFAULT_ATTACK_STEPS)
    assert json.loads(run.artifact("config.json").read_text())["attack_steps"] == DEFAULT_ATTACK_STEPS


# ----------------------------------------------------------------------------- 2. REAT


@needs_data
def test_reat_logs_adversarial_prediction_counts(reat_any):
    n_train = int(reat_any.run.data.params["n_train"])
    epochs = reat_any.expected.epochs
    per_class = [reat_any.metric_history(f"adv_pred/class_{c}") for c in range(NUM_CLASSES)]
    for c, history in enumerate(per_class):
        assert [m.step for m in history] == list(range(epochs)), f"adv_pred/class_{c}"
        assert all(m.value >= 0 and m.value == int(m.value) for m in history)
    for epoch in range(epochs):
        assert sum(history[epoch].value for history in per_class) == n_train

    assert "adv_pred_hist.json" in reat_any.artifact_paths()
    hist = json.loads(reat_any.artifact("adv_pred_hist.json").read_text())
    assert [entry["epoch"] for entry in hist] == list(range(epochs))
    for entry in hist:
        counts = entry["adv_pred_counts"]
        assert counts == [int(per_class[c][entry["epoch"]].value) for c in range(NUM_CLASSES)]
        assert len(entry["attack_class_weights"]) == NUM_CLASSES


@needs_data
def test_pgd_at_logs_no_reat_artifacts(pgd_run):
    assert "adv_pred_hist.json" not in pgd_run.artifact_paths()
    assert not [k for k in pgd_run.run.data.metrics if k.startswith("rbl_weight/")]
    # every method logs what its training AEs are predicted as (the paper's Fig. 1 is PGD-AT's)
    counts = [pgd_run.run.data.metrics[f"adv_pred/class_{c}"] for c in range(NUM_CLASSES)]
    assert sum(counts) == int(pgd_run.run.data.params["n_train"])


# ----------------------------------------------------------------------------- 3. --config file


@needs_data
def test_config_file_values_are_used_and_flags_override_them(config_run):
    params = config_run.run.data.params
    # from the file only
    assert params["method"] == "reat"
    assert params["model"] == "small-cnn"
    assert params["batch_size"] == "64"  # key written with a dash in the file
    assert params["eval_attack_steps"] == "2"
    assert params["seed"] == "3"
    assert float(params["lr"]) == 0.07
    assert float(params["tail_weight"]) == 0.5
    assert params["experiment"] == "cli-config"
    assert config_run.client.get_experiment(config_run.run.info.experiment_id).name == "cli-config"
    # the file says otherwise; the flag wins
    assert params["rbl"] == "logit"
    assert params["tail"] == "paper"
    assert params["epochs"] == "1"
    assert len(config_run.metric_history("train/loss")) == 1
    # untouched by both: the defaults
    assert params["loss"] == TrainConfig().loss
    assert params["val_fraction"] == str(TrainConfig().val_fraction)


# ----------------------------------------------------------------------------- 4. bad inputs


def _no_data(reason: str = ""):
    return pytest.mark.skipif(not HAVE_DATA, reason=f"needs {DATA_DIR}/cifar10 ({reason})")


_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid")

CONFIG_FILES = {
    "unknown-key.yaml": "model: small-cnn\nmodle: resnet18\n",
    "malformed.yaml": "model: [small-cnn, resnet18\nepochs: 1\n",
    "epochs-abc.yaml": "epochs: abc\n",
    "epochs-float.yaml": "epochs: 1.5\n",
    "milestones-abc.yaml": "milestones: abc\n",
}

# (id, extra args with {tmp} for the test's temporary folder, regex the Error: line must match, marks)
BAD_INPUTS = [
    ("unknown-dataset", ["--dataset", "cifar11lt"], r"cifar11lt", ()),
    ("unknown-model", ["--model", "resnet-999"], r"resnet-999", ()),
    ("unknown-loss", ["--loss", "hinge-x"], r"hinge-x", ()),
    ("unknown-method", ["--method", "trades-x"], r"trades-x", ()),
    ("unknown-rbl", ["--method", "reat", "--rbl", "bogus-rbl"], r"bogus-rbl", ()),
    ("unknown-tail", ["--method", "reat", "--tail", "bogus-tail"], r"bogus-tail", ()),
    ("ur-below-1", ["--ur", "0.5"], r"\bur\b\W+0?\.5\b", ()),
    ("eps-zero", ["--eps", "0"], r"\beps\b\W+0(\.0*)?\b", ()),
    ("eps-above-1", ["--eps", "2"], r"\beps\b\W+2(\.0*)?\b", ()),
    ("attack-steps-zero", ["--attack-steps", "0"], r"attack.steps\W+0\b", ()),
    ("epochs-zero", ["--epochs", "0"], r"epochs\W+0\b", ()),
    ("train-subset-too-large", ["--train-subset", "20000"], r"subset.*\b20000\b", (_no_data("subset size"),)),
    ("val-fraction-above-1", ["--val-fraction", "1.5"], r"val.fraction\W+1\.5\b", ()),
    ("missing-data-dir", ["--data-dir", "{tmp}/empty"], r"{tmp}/empty", ()),
    ("unwritable-output-dir", ["--output-dir", "{tmp}/a-file.txt/out"], r"{tmp}/a-file\.txt", ()),
    ("config-unknown-key", ["--config", "{tmp}/unknown-key.yaml"], r"\bmodle\b", ()),
    ("config-malformed-yaml", ["--config", "{tmp}/malformed.yaml"], r"malformed\.yaml", ()),
    ("device-cuda-without-cuda", ["--device", "cuda"], r"\bcuda\b", (_cuda,)),
    ("milestones-not-numbers", ["--milestones", "abc"], r"\babc\b", ()),
    # values of the wrong type in a config file (click converts the flags, nothing converts the file)
    ("config-epochs-not-a-number", ["--config", "{tmp}/epochs-abc.yaml"], r"epochs\W+'?abc\b", ()),
    ("config-epochs-not-an-integer", ["--config", "{tmp}/epochs-float.yaml"], r"epochs\W+1\.5\b", ()),
    ("config-milestones-not-a-list", ["--config", "{tmp}/milestones-abc.yaml"], r"milestones\W+'?abc\b",
     ()),
]


@pytest.mark.parametrize(
    "extra, pattern",
    [pytest.param(extra, pattern, id=name, marks=marks) for name, extra, pattern, marks in BAD_INPUTS],
)
def test_bad_input_is_one_error_line_exit_2_and_no_run(tmp_path, extra, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file.txt").write_text("a regular file, not a folder\n")
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    uri = store_uri(tmp_path)
    options = {"--epochs": "1", "--tracking-uri": uri, "--output-dir": str(tmp_path / "out")}
    for key, value in zip(extra[::2], extra[1::2]):
        options.pop(key, None)  # the row's own value of a base option
        if key == "--config" and value.startswith("{tmp}/epochs-"):
            options.pop("--epochs")  # a flag would override the file's bad value
    args = ["train", *CIFAR10LT, *FAST, *[x for kv in options.items() for x in kv]]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]

    result = invoke(args)

    assert result.exit_code == 2, describe(result)
    assert isinstance(result.exception, SystemExit), describe(result)  # no uncaught exception
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, describe(result)
    # nothing else on stderr, except click's own "Usage: ... / Try ... for help." for option-parsing errors
    others = [line for line in lines if line not in errors and not line.startswith(("Usage:", "Try "))]
    assert not others, describe(result)
    assert re.search(pattern.replace("{tmp}", re.escape(str(tmp_path))), errors[0], re.IGNORECASE), errors[0]
    # validation happens before an MLflow run is opened: no run at all (so none left RUNNING)
    assert all_runs(uri) == [], [r.info.status for r in all_runs(uri)]
