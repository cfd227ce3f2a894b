"""End-to-end tests of `art-reat attack` (click CliRunner, in-process), SPEC section 9.

One tiny run is trained once per module through the library (`art_reat.training.train`) on small
npz files written to a temporary folder (10 classes, 16x16x3, long-tailed train set), with its own
SQLite MLflow store and output folder. The attack command is then run against it by run id and by
checkpoint file, with the audit, and with bad inputs. Every test runs in its own temporary working
directory, so nothing is written to the repository's ./mlruns or ./outputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from click.testing import Result

from support import describe, invoke

C = 10
TRAIN_COUNTS = [30, 20, 14, 10, 7, 5, 4, 4, 3, 3]  # long-tailed, every class present
TEST_PER_CLASS = 5
EVAL_SAMPLES = 20
EPS = 8 / 255
GROUPS = ("head", "body", "tail")


# one torch thread for the module (tests/conftest.py): small ops on 2 busy cores run far faster
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the trained run


@dataclass
class Trained:
    run_id: str
    uri: str
    data_dir: Path
    output_dir: Path
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def best(self) -> Path:
        return self.output_dir / self.run_id / "best.pt"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def write_data(folder: Path, seed: int = 0) -> tuple:
    """Class-coloured noisy 16x16 images; labels 0..C-1, none empty."""
    rng = np.random.RandomState(seed)
    colours = rng.randint(40, 216, size=(C, 1, 1, 3))

    def images(y):
        x = colours[y] + rng.randint(-40, 41, size=(len(y), 16, 16, 3))
        return np.clip(x, 0, 255).astype(np.uint8)

    y_train = np.repeat(np.arange(C), TRAIN_COUNTS)
    y_test = np.repeat(np.arange(C), TEST_PER_CLASS)
    x_train, x_test = images(y_train), images(y_test)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=x_train, y=y_train)
    np.savez(folder / "test.npz", x=x_test, y=y_test)
    return x_test, y_test


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    from art_reat.config import TrainConfig
    from art_reat.training import train

    root = tmp_path_factory.mktemp("attack-cli")
    x_test, y_test = write_data(root / "data")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = TrainConfig(dataset="npz", data_dir=str(root / "data"), model="small-cnn", epochs=1, batch_size=32,
                         attack_steps=1, eval_attack_steps=1, tracking_uri=uri, output_dir=str(root / "out"),
                         device="cpu", experiment="attack-cli")
    result = train(config)
    out = Trained(result.run_id, uri, root / "data", root / "out", x_test, y_test)
    assert out.best.is_file(), list((root / "out" / result.run_id).iterdir())
    return out


# ----------------------------------------------------------------------------- helpers




@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative defaults (./mlruns, outputs/attack_state) stay in tmp_path
    return tmp_path


def attack_args(trained: Trained, workdir: Path, *extra: str, run: bool = True) -> List[str]:
    args = ["attack", "--tracking-uri", trained.uri, "--eval-samples", str(EVAL_SAMPLES),
            "--state-dir", str(workdir / "state")]
    if run:
        args += ["--run-id", trained.run_id]
    return args + list(extra)


def parse_tables(stdout: str) -> List[dict]:
    """Every printed suite: title line, {attack: [overall, head, body, tail]}, {attack: [per-class]}."""
    tables, current, section = [], None, None
    number = r"(-?\d+\.\d+|nan)"
    for line in stdout.splitlines():
        if re.match(r"^(Robust accuracy|Gradient-masking audit) \(%\): ", line):
            current = {"title": line, "rows": {}, "per_class": {}, "header": None}
            tables.append(current)
            section = "rows"
            continue
        if current is None:
            continue
        if line.startswith("attack "):
            current["header"] = line.split()
            continue
        if line.startswith("per class"):
            assert line.split()[2:] == [str(c) for c in range(C)], line
            section = "per_class"
            continue
        match = re.match(rf"^(\S+)((?:\s+{number})+)\s*$", line)
        if match and section is not None:
            current[section][match.group(1)] = [float(v) for v in match.group(2).split()]
        else:
            section = None
    return tables


def metrics_of(trained: Trained) -> Dict[str, float]:
    return trained.client().get_run(trained.run_id).data.metrics


def download_json(trained: Trained, path: str, dst: Path) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    return json.loads(Path(trained.client().download_artifacts(trained.run_id, path, str(dst))).read_text())


def eval_subset(trained: Trained):
    from art_reat.data import stratified_subset

    pick = stratified_subset(trained.y_test, EVAL_SAMPLES, seed=0, num_classes=C)
    return trained.x_test[pick], trained.y_test[pick]


# ----------------------------------------------------------------------------- 8. a real evaluation


@pytest.fixture(scope="module")
def main_eval(trained, tmp_path_factory):
    """`art-reat attack --run-id ... --attacks pgd2,cw2 --adaptive-scale 10`, once per module."""
    folder = tmp_path_factory.mktemp("main-eval")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    try:
        result = invoke(attack_args(trained, folder, "--data-dir", str(trained.data_dir), "--attacks", "pgd2,cw2",
                                    "--adaptive-scale", "10"))
    finally:
        mp.undo()
    assert result.exit_code == 0, describe(result)
    # what was logged, read at once (later tests log to the same run)
    return Evaluated(result, folder, metrics_of(trained),
                     [f.path for f in trained.client().list_artifacts(trained.run_id)],
                     download_json(trained, "attack_report.json", folder / "dl"))


@dataclass
class Evaluated:
    result: Result
    folder: Path
    metrics: Dict[str, float]
    artifacts: List[str]
    report: dict


def test_attack_prints_the_table_with_every_attack_and_per_class_lines(main_eval):
    result = main_eval.result
    tables = parse_tables(result.stdout)
    assert len(tables) == 1, result.stdout
    table = tables[0]
    assert f"{EVAL_SAMPLES} test images" in table["title"]
    assert re.search(r"linf eps=0\.031373\b", table["title"]), table["title"]  # the run's eps, 8/255
    assert re.search(r"step=0\.0078431\b", table["title"]), table["title"]  # eps / 4
    assert table["header"] == ["attack", "overall", *GROUPS]
    assert list(table["rows"]) == ["clean", "pgd2", "cw2", "pgd2-x10"]
    assert list(table["per_class"]) == ["clean", "pgd2", "cw2", "pgd2-x10"]
    for values in table["rows"].values():
        assert len(values) == 4 and all(0 <= v <= 100 for v in values)
    for values in table["per_class"].values():
        assert len(values) == C and all(0 <= v <= 100 for v in values)
    assert "Gradient-masking audit" not in result.stdout


def test_attack_logs_metrics_to_the_training_run(trained, main_eval):
    result, metrics = main_eval.result, main_eval.metrics
    for name in ("pgd2", "cw2", "pgd2-x10"):
        key = f"robust_acc/{name}"
        assert key in metrics
        for group in GROUPS:
            assert f"{key}/{group}" in metrics
        for c in range(C):
            assert f"{key}/class_{c}" in metrics
    assert "clean_acc" in metrics and "clean_acc/tail" in metrics and "clean_acc/class_9" in metrics
    assert metrics["robust_acc_drop/pgd2-x10"] == pytest.approx(
        metrics["robust_acc/pgd2"] - metrics["robust_acc/pgd2-x10"], abs=1e-12)
    assert not any(k.startswith("robust_acc_drop/") and k != "robust_acc_drop/pgd2-x10" for k in metrics)
    # the printed table shows the logged numbers
    table = parse_tables(result.stdout)[0]
    for name, values in table["rows"].items():
        key = "clean_acc" if name == "clean" else f"robust_acc/{name}"
        want = [metrics[key]] + [metrics[f"{key}/{g}"] for g in GROUPS]
        assert values == [round(100 * v, 2) for v in want], (name, values, want)
        per_class = [metrics[f"{key}/class_{c}"] for c in range(C)]
        assert table["per_class"][name] == [round(100 * v, 1) for v in per_class]
    assert f"logged to MLflow run {trained.run_id}" in result.stdout
    # logging results does not reopen or fail the finished training run
    assert trained.client().get_run(trained.run_id).info.status == "FINISHED"


def test_attack_clean_accuracy_matches_an_independent_prediction(trained, main_eval):
    """Rebuild the model from best.pt and predict the same stratified subset with plain loops."""
    from art_reat.models import build_model

    state = torch.load(trained.best, map_location="cpu", weights_only=True)
    model = build_model("small-cnn", C, in_channels=3)
    model.load_state_dict(state["model"])
    model.eval()
    x, y = eval_subset(trained)
    assert len(y) == EVAL_SAMPLES and np.bincount(y, minlength=C).tolist() == [EVAL_SAMPLES // C] * C
    with torch.no_grad():
        pred = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    metrics = main_eval.metrics
    per_class = []
    for c in range(C):
        idx = [i for i in range(len(y)) if y[i] == c]
        per_class.append(sum(pred[i] == c for i in idx) / len(idx))
        assert metrics[f"clean_acc/class_{c}"] == pytest.approx(per_class[c], abs=1e-12)
    assert metrics["clean_acc"] == pytest.approx(float(np.mean(pred == y)), abs=1e-12)
    from art_reat.data import class_groups

    for group, classes in class_groups(C).items():
        assert metrics[f"clean_acc/{group}"] == pytest.approx(sum(per_class[c] for c in classes) / len(classes))


def test_attack_report_artifact(trained, main_eval):
    assert "attack_report.json" in main_eval.artifacts
    report, metrics, folder = main_eval.report, main_eval.metrics, main_eval.folder
    suite = report["suite"]
    assert list(suite["reports"]) == ["clean", "pgd2", "cw2", "pgd2-x10"]
    assert suite["n_samples"] == EVAL_SAMPLES
    assert suite["threat_model"]["norm"] == "linf"
    assert suite["threat_model"]["eps"] == pytest.approx(EPS)
    assert suite["flags"] == []
    assert suite["reports"]["pgd2"]["overall"] == pytest.approx(metrics["robust_acc/pgd2"])
    assert suite["reports"]["cw2"]["per_class"] == pytest.approx([metrics[f"robust_acc/cw2/class_{c}"] for c in range(C)])
    assert report["config"]["run_id"] == trained.run_id
    assert report["config"]["attacks"] == ["pgd2", "cw2"]
    assert report["config"]["adaptive_scale"] == 10
    assert "audit" not in report
    # the per-attack resume files went to --state-dir
    names = sorted(p.name for p in (folder / "state").iterdir())
    assert [re.sub(r"-[0-9a-f]{12}\.npz$", "", n) for n in names] == ["cw2", "pgd2", "pgd2-x10"], names


def test_attack_by_checkpoint_gives_the_same_numbers_and_uses_the_runs_data_dir(trained, main_eval, workdir):
    first = parse_tables(main_eval.result.stdout)[0]
    # no --data-dir: the training run's own data folder is used
    result = invoke(attack_args(trained, workdir, "--checkpoint", str(trained.best), "--attacks", "pgd2,cw2",
                                "--adaptive-scale", "10", run=False))
    assert result.exit_code == 0, describe(result)
    table = parse_tables(result.stdout)[0]
    assert table["rows"] == first["rows"] and table["per_class"] == first["per_class"]
    # the checkpoint names its run, which is in this store: results are logged there
    assert f"logged to MLflow run {trained.run_id}" in result.stdout
    # a new state file per attack: a checkpoint file is a different identity from runs:/<id>/...
    assert len(list((workdir / "state").iterdir())) == 3


def test_attack_by_checkpoint_of_a_run_not_in_the_store_prints_only(trained, workdir):
    state = torch.load(trained.best, map_location="cpu", weights_only=True)
    state["meta"]["run_id"] = "f" * 32
    copy = workdir / "copied.pt"
    torch.save(state, copy)
    before = metrics_of(trained)
    result = invoke(attack_args(trained, workdir, "--checkpoint", str(copy), "--attacks", "pgd1", run=False))
    assert result.exit_code == 0, describe(result)
    assert list(parse_tables(result.stdout)[0]["rows"]) == ["clean", "pgd1"]
    assert "not logged" in result.stdout
    assert "robust_acc/pgd1" not in metrics_of(trained) and "robust_acc/pgd1" not in before


def test_attack_l2_names_metrics_and_artifact_by_norm(trained, workdir):
    result = invoke(attack_args(trained, workdir, "--attacks", "pgd2", "--norm", "l2"))
    assert result.exit_code == 0, describe(result)
    table = parse_tables(result.stdout)[0]
    assert re.search(r"l2 eps=1\b", table["title"]) and re.search(r"step=0\.2\b", table["title"]), table["title"]
    metrics = metrics_of(trained)
    assert "robust_acc/pgd2-l2" in metrics and "robust_acc/pgd2-l2/class_0" in metrics
    assert table["rows"]["pgd2"][0] == round(100 * metrics["robust_acc/pgd2-l2"], 2)
    paths = [f.path for f in trained.client().list_artifacts(trained.run_id)]
    assert "attack_report_l2.json" in paths


def test_attack_audit_prints_the_audit_table_and_logs_it(trained, workdir, tmp_path):
    result = invoke(attack_args(trained, workdir, "--attacks", "pgd2", "--audit"))
    assert result.exit_code == 0, describe(result)
    tables = parse_tables(result.stdout)
    assert len(tables) == 2, result.stdout
    audit = tables[1]
    assert audit["title"].startswith("Gradient-masking audit (%): ")
    assert list(audit["rows"]) == ["clean", "pgd10", "pgd20", "pgd50", "pgd100", "pgd20-x10", "pgd20-x100"]
    assert audit["per_class"] == {}  # the audit table has no per-class lines
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING: ")]
    no_sign = "audit: no sign of gradient masking" in result.stdout
    assert no_sign == (not warnings)

    metrics = metrics_of(trained)
    acc = {name: metrics[f"audit/robust_acc/{name}"] for name in ("pgd10", "pgd20", "pgd50", "pgd100", "pgd20-x10",
                                                                   "pgd20-x100")}
    assert metrics["audit/flags"] == len(warnings)
    assert not any(k.startswith("audit/") and "/class_" in k for k in metrics)
    for name, value in acc.items():
        assert audit["rows"][name][0] == round(100 * value, 2)
    # the rule of SPEC section 9's audit: rising with steps, or a drop > 2 points under scaling
    steps = ["pgd10", "pgd20", "pgd50", "pgd100"]
    expected = sum(acc[b] > acc[a] for a, b in zip(steps, steps[1:]))
    expected += sum(acc["pgd20"] - acc[s] > 0.02 + 1e-9 for s in ("pgd20-x10", "pgd20-x100"))
    assert len(warnings) == expected, (acc, warnings)
    report = download_json(trained, "attack_report.json", tmp_path / "dl")
    assert list(report["audit"]["reports"]) == list(audit["rows"])
    assert report["audit"]["flags"] == [w[len("WARNING: "):] for w in warnings]


# ----------------------------------------------------------------------------- 9. bad inputs


def garbage(path: Path, trained: Trained) -> None:
    path.write_bytes(np.random.RandomState(0).bytes(2048))


def other_model(path: Path, trained: Trained) -> None:
    """A small-cnn with 5 classes saved under the run's meta (10 classes): the weights do not fit."""
    from art_reat.models import build_model

    state = torch.load(trained.best, map_location="cpu", weights_only=True)
    state["model"] = build_model("small-cnn", 5, in_channels=3).state_dict()
    torch.save(state, path)


def renamed_model(path: Path, trained: Trained) -> None:
    """The run's small-cnn weights with meta saying resnet18."""
    state = torch.load(trained.best, map_location="cpu", weights_only=True)
    state["meta"]["config"]["model"] = "resnet18"
    torch.save(state, path)


def no_meta(path: Path, trained: Trained) -> None:
    state = torch.load(trained.best, map_location="cpu", weights_only=True)
    torch.save({"model": state["model"]}, path)


CHECKPOINTS = {"garbage.pt": garbage, "other-model.pt": other_model, "renamed.pt": renamed_model,
               "no-meta.pt": no_meta}

# (id, extra args with {tmp}, {run} and {best}, whether to add --run-id, regex of the Error: line[, mark])
BAD_INPUTS = [
    ("unknown-attack", ["--attacks", "pgd2,foo"], True, r"unknown attack 'foo'.*pgdN"),
    ("attack-without-steps", ["--attacks", "pgd"], True, r"'pgd'"),
    ("cw-with-scale", ["--attacks", "pgd1,cw2-x10"], True, r"'cw2-x10'"),
    ("run-id-and-checkpoint", ["--checkpoint", "{best}"], True, r"exactly one of --run-id and --checkpoint"),
    ("neither-run-id-nor-checkpoint", [], False, r"exactly one of --run-id and --checkpoint"),
    ("unknown-run-id", ["--run-id", "0123456789abcdef0123456789abcdef"], False, r"0123456789abcdef0123456789abcdef"),
    ("missing-checkpoint", ["--checkpoint", "{tmp}/nowhere.pt"], False, r"{tmp}/nowhere\.pt"),
    ("garbage-checkpoint", ["--checkpoint", "{tmp}/garbage.pt"], False, r"{tmp}/garbage\.pt"),
    ("checkpoint-of-another-model", ["--checkpoint", "{tmp}/other-model.pt"], False, r"{tmp}/other-model\.pt"),
    ("checkpoint-meta-names-another-model", ["--checkpoint", "{tmp}/renamed.pt"], False,
     r"{tmp}/renamed\.pt.*resnet18"),
    ("checkpoint-without-meta", ["--checkpoint", "{tmp}/no-meta.pt"], False, r"{tmp}/no-meta\.pt"),
    ("eps-zero", ["--eps", "0"], True, r"\beps\b\W+0(\.0*)?\b"),
    ("eps-above-1", ["--eps", "1.5"], True, r"\beps\b\W+1\.5\b"),
    ("step-size-negative", ["--step-size", "-0.1"], True, r"step size\W+-0\.1\b"),
    ("adaptive-scale-zero", ["--adaptive-scale", "0"], True, r"adaptive scale\W+0(\.0*)?\b"),
    ("adaptive-scale-negative", ["--adaptive-scale", "-3"], True, r"adaptive scale\W+-3(\.0*)?\b"),
    ("eval-samples-zero", ["--eval-samples", "0"], True, r"eval-samples\W+0\b"),
    ("eval-samples-above-test-set", ["--eval-samples", "500"], True, r"\b500\b"),
    ("batch-size-zero", ["--batch-size", "0"], True, r"batch-size\W+0\b"),
    ("missing-data-dir", ["--data-dir", "{tmp}/empty"], True, r"{tmp}/empty"),
]


@pytest.mark.parametrize("extra, with_run, pattern",
                         [pytest.param(*row[1:4], id=row[0], marks=row[4:]) for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(trained, workdir, extra, with_run, pattern):
    for name, make in CHECKPOINTS.items():
        make(workdir / name, trained)
    (workdir / "empty").mkdir()
    fill = {"{tmp}": str(workdir), "{best}": str(trained.best), "{run}": trained.run_id}

    def sub(text: str, escape: bool = False) -> str:
        for key, value in fill.items():
            text = text.replace(key, re.escape(value) if escape else value)
        return text

    extra = [sub(a) for a in extra]
    base = attack_args(trained, workdir, run=with_run)
    if "--eval-samples" in extra:  # the row's own value replaces the base one
        i = base.index("--eval-samples")
        del base[i:i + 2]
    if not any(a in extra for a in ("--attacks",)):
        extra += ["--attacks", "pgd1"]
    before = set(metrics_of(trained))

    result = invoke(base + extra)

    assert result.exit_code == 2, describe(result)
    assert isinstance(result.exception, SystemExit), describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, describe(result)
    # nothing else on stderr but progress bars of work already done (none for most rows)
    others = [line for line in lines if line not in errors and not re.match(r"^\s*[\w\- ]+:\s+\d+%\|", line)]
    assert not others, describe(result)
    assert re.search(sub(pattern, escape=True), errors[0]), errors[0]
    assert "logged to MLflow" not in result.stdout
    assert set(metrics_of(trained)) == before  # nothing logged


class PerturbCount:
    def __init__(self, monkeypatch) -> None:
        from art_reat.attacks import TensorPGD

        self.n = 0
        original = TensorPGD.perturb

        def perturb(attack, *args, **kwargs):
            self.n += 1
            return original(attack, *args, **kwargs)

        monkeypatch.setattr(TensorPGD, "perturb", perturb)


def test_unbuildable_attack_name_fails_before_any_attack_runs(trained, workdir, monkeypatch):
    count = PerturbCount(monkeypatch)
    result = invoke(attack_args(trained, workdir, "--attacks", "pgd1,cw2-x10"))
    assert result.exit_code == 2, describe(result)
    assert count.n == 0


def test_zero_logit_scale_in_an_attack_name_is_rejected(trained, workdir):
    result = invoke(attack_args(trained, workdir, "--attacks", "pgd2-x0"))
    assert result.exit_code == 2, describe(result)
    assert re.search(r"pgd2-x0|scale", result.stderr), describe(result)


class InterruptAt:
    """TensorPGD.perturb raising KeyboardInterrupt at its n-th call (as Ctrl-C would), counting calls."""

    def __init__(self, monkeypatch, at=None) -> None:
        from art_reat.attacks import TensorPGD

        self.calls = []
        original = TensorPGD.perturb

        def perturb(attack, x, y, generator=None):
            self.calls.append(type(attack).__name__)
            if at is not None and len(self.calls) == at:
                raise KeyboardInterrupt
            return original(attack, x, y, generator=generator)

        monkeypatch.setattr(TensorPGD, "perturb", perturb)


def test_interrupted_attack_resumes_from_the_state_dir_with_the_same_numbers(trained, workdir, monkeypatch):
    args = ["--attacks", "pgd2,cw2", "--batch-size", "8"]  # 20 images: 3 chunks per attack
    fresh = InterruptAt(monkeypatch)
    reference = invoke(attack_args(trained, workdir, *args, "--state-dir", str(workdir / "reference")))
    assert reference.exit_code == 0, describe(reference)
    assert fresh.calls == ["TensorPGD"] * 3 + ["CWMarginPGD"] * 3

    stop = InterruptAt(monkeypatch, at=5)  # pgd2's 3 chunks and cw2's first one finish
    interrupted = invoke(attack_args(trained, workdir, *args))
    assert interrupted.exit_code == 130, describe(interrupted)
    assert "Traceback" not in interrupted.stdout + interrupted.stderr
    assert "logged to MLflow" not in interrupted.stdout
    assert trained.client().get_run(trained.run_id).info.status == "FINISHED"

    resume = InterruptAt(monkeypatch)
    resumed = invoke(attack_args(trained, workdir, *args))
    assert resumed.exit_code == 0, describe(resumed)
    assert resume.calls == ["CWMarginPGD"] * 2  # only the unfinished chunks of cw2
    want, got = parse_tables(reference.stdout)[0], parse_tables(resumed.stdout)[0]
    assert got["rows"] == want["rows"] and got["per_class"] == want["per_class"]


def test_interrupted_attack_does_not_claim_a_run_was_killed(trained, workdir, monkeypatch):
    InterruptAt(monkeypatch, at=1)
    result = invoke(attack_args(trained, workdir, "--attacks", "pgd2"))
    assert result.exit_code == 130, describe(result)
    assert "KILLED" not in result.stderr
