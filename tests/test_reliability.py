"""Resume, safe checkpoints and faults (issue 7): nothing is lost to a Ctrl-C, a full disk or a NaN.

Every training run here is tiny (small-cnn on 12x12 npz images written to a temporary folder, 4
classes) and goes to one SQLite MLflow store per module (copied from a template, since creating
MLflow's schema takes seconds). The resume-equivalence tests compare an uninterrupted run with one
interrupted by a real signal (sent to this process from inside training) and resumed: final
weights, optimiser state and every per-epoch metric must be bitwise equal (except the timing).
One test sends SIGINT to a real `art-reat train` subprocess and resumes it from the command line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from art_reat.checkpoints import load_checkpoint, manifest_path, write_checkpoint
from art_reat.config import TrainConfig
from art_reat.errors import CheckpointWriteError, DataError, TrainingInterrupted
from cli.main import main
from support import fresh_mlflow_store

C = 4
COUNTS = [24, 12, 8, 6]
SIZE = 12
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures and helpers


# one torch thread for the module (tests/conftest.py): small ops on 2 busy cores run far faster
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_npz(folder: Path, counts=COUNTS, test_per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    colours = rng.randint(40, 216, size=(len(counts), 1, 1, 3))

    def images(y):
        return np.clip(colours[y] + rng.randint(-40, 41, size=(len(y), SIZE, SIZE, 3)), 0, 255).astype(np.uint8)

    y = np.repeat(np.arange(len(counts)), counts)
    yt = np.repeat(np.arange(len(counts)), test_per_class)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=images(y), y=y)
    np.savez(folder / "test.npz", x=images(yt), y=yt)
    return folder




@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return fresh_mlflow_store(tmp_path_factory, "reliability-store")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("reliability-data"))


def make_config(data_dir: Path, uri: str, out: Path, experiment: str, **overrides) -> TrainConfig:
    values = dict(dataset="npz", data_dir=str(data_dir), model="small-cnn", epochs=3, batch_size=16, attack_steps=2,
                  eval_attack_steps=1, val_fraction=0.2, milestones=[2], device="cpu", tracking_uri=uri,
                  output_dir=str(out), experiment=experiment)
    values.update(overrides)
    return TrainConfig(**values)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str) -> list:
    c = client(uri)
    found = c.get_experiment_by_name(experiment)
    return c.search_runs([found.experiment_id]) if found is not None else []


def epoch_metrics(uri: str, run_id: str) -> Dict[str, List[tuple]]:
    """Every metric logged per epoch (not the final test metrics, not the timing) as [(step, value)]."""
    c = client(uri)
    out = {}
    for key in c.get_run(run_id).data.metrics:
        if key.startswith("test/") or key == "epoch_seconds":
            continue
        out[key] = sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))
    return out


def assert_same_state(a, b, path="state"):
    """Bitwise equality of nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def without_timing(history: List[dict]) -> List[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def signal_after_epoch(monkeypatch, epoch: int, signum: int) -> None:
    """Send `signum` to this process once epoch `epoch` (0-based) has been logged (a real signal)."""
    import art_reat.training as training

    original = training._log_epoch

    def log_then_signal(run, trainer, e, metrics):
        original(run, trainer, e, metrics)
        if e == epoch:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(training, "_log_epoch", log_then_signal)


def signal_at_batch(monkeypatch, call: int, signum: int) -> None:
    """Send `signum` during the `call`-th training batch (1-based, counted over the whole run)."""
    from art_reat.trainers.pgd_at import PGDATTrainer

    original = PGDATTrainer.training_loss
    calls = {"n": 0}

    def loss_then_signal(self, x_adv, y):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return original(self, x_adv, y)

    monkeypatch.setattr(PGDATTrainer, "training_loss", loss_then_signal)


# ----------------------------------------------------------------------------- 1. resume equivalence


def test_resume_after_epoch_1_is_bitwise_the_uninterrupted_run(store, data_dir, tmp_path, monkeypatch):
    """3 epochs straight == interrupted (SIGINT) after epoch 1 + `art-reat train --resume RUN_ID`."""
    from art_reat.training import train

    straight = train(make_config(data_dir, store, tmp_path / "straight", "resume-epoch"))

    signal_after_epoch(monkeypatch, 0, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train(make_config(data_dir, store, tmp_path / "resumed", "resume-epoch"))
    monkeypatch.undo()
    interrupted = info.value
    run_id = next(r.info.run_id for r in runs_of(store, "resume-epoch") if r.info.run_id != straight.run_id)
    assert interrupted.exit_code == 130
    message = str(interrupted)
    assert "\n" not in message
    assert "SIGINT after epoch 1/3" in message and "KILLED" in message
    assert f"art-reat train --resume {run_id} --tracking-uri {store}" in message
    assert client(store).get_run(run_id).info.status == "KILLED"
    last = load_checkpoint(tmp_path / "resumed" / run_id / "last.pt")
    assert last["epoch"] == 1 and last["partial"] is None

    result = CliRunner().invoke(main, ["train", "--resume", run_id, "--tracking-uri", store])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"run {run_id}" in result.stdout

    run = client(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("resumes") == "1" and run.data.tags.get("resumed_at_epoch") == "1"
    a = load_checkpoint(straight.checkpoint_dir / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / run_id / "last.pt")
    for key in ("model", "optimizer", "scheduler", "trainer", "epoch", "best_metric"):
        assert_same_state(a[key], b[key], key)
    assert without_timing(a["history"]) == without_timing(b["history"])
    assert epoch_metrics(store, straight.run_id) == epoch_metrics(store, run_id)
    test_a = {k: v for k, v in client(store).get_run(straight.run_id).data.metrics.items() if k.startswith("test/")}
    test_b = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    assert test_a == test_b and test_a


def test_resume_mid_epoch_reat_from_the_checkpoint_file_is_bitwise_the_uninterrupted_run(store, data_dir, tmp_path,
                                                                                       monkeypatch):
    """REAT (RBL weights and counts in the checkpoint), SIGTERM inside epoch 2, resumed from last.pt."""
    from art_reat.resume import resume_training
    from art_reat.training import train

    settings = dict(method="reat", rbl="logit")
    straight = train(make_config(data_dir, store, tmp_path / "straight", "resume-batch", **settings))
    nb_batches = -(-int(0.8 * sum(COUNTS)) // 16)  # 3 batches of the 40 training images (10 held out)

    signal_at_batch(monkeypatch, nb_batches + 2, signal.SIGTERM)  # during batch 2 of epoch 2
    with pytest.raises(TrainingInterrupted) as info:
        train(make_config(data_dir, store, tmp_path / "resumed", "resume-batch", **settings))
    monkeypatch.undo()
    assert info.value.exit_code == 143
    assert f"SIGTERM during epoch 2/3, after batch 2/{nb_batches}" in str(info.value)
    run_id = next(r.info.run_id for r in runs_of(store, "resume-batch") if r.info.run_id != straight.run_id)
    assert client(store).get_run(run_id).info.status == "KILLED"
    path = tmp_path / "resumed" / run_id / "last.pt"
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["partial"] == {"epoch": 1, "batch": 2} and manifest["epoch"] == 1

    result = resume_training(str(path))  # by file: the checkpoint's run is in its own store, so it continues
    assert result.run_id == run_id
    assert client(store).get_run(run_id).info.status == "FINISHED"
    a = load_checkpoint(straight.checkpoint_dir / "last.pt")
    b = load_checkpoint(path)
    for key in ("model", "optimizer", "scheduler", "trainer", "epoch", "best_metric"):
        assert_same_state(a[key], b[key], key)
    assert without_timing(straight.history) == without_timing(result.history)
    assert epoch_metrics(store, straight.run_id) == epoch_metrics(store, run_id)
    assert straight.test == result.test


def test_sigint_to_a_running_train_process_then_resume_finishes_the_run(store, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "cli.main", "train"]
    args = ["--dataset", "npz", "--data-dir", str(data_dir), "--model", "small-cnn", "--epochs", "5",
            "--batch-size", "16", "--attack-steps", "1", "--eval-attack-steps", "1", "--val-fraction", "0.2",
            "--device", "cpu", "--tracking-uri", store, "--output-dir", str(out), "--experiment", "sigint"]
    process = subprocess.Popen(base + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/last.pt")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "training ended before the first checkpoint: " + process.stderr.read()[-2000:]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    run_id = list(out.glob("*/last.pt"))[0].parent.name
    lines = [line for line in stderr.splitlines() if line.startswith("Interrupted: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "SIGINT" in lines[0] and "KILLED" in lines[0]
    assert f"art-reat train --resume {run_id} --tracking-uri {store}" in lines[0]
    run = client(store).get_run(run_id)
    assert run.info.status == "KILLED"
    stopped_at = load_checkpoint(out / run_id / "last.pt")
    assert 1 <= stopped_at["epoch"] < 5

    # the resume runs in this process (the same command line, without paying for a second start-up)
    monkeypatch.chdir(tmp_path)
    resumed = CliRunner().invoke(main, ["train", "--resume", run_id, "--tracking-uri", store])
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    run = client(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = client(store).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(5))  # every epoch logged exactly once
    final = load_checkpoint(out / run_id / "last.pt")
    assert final["epoch"] == 5 and len(final["history"]) == 5 and final["partial"] is None
    assert "test/clean_acc" in run.data.metrics


# ----------------------------------------------------------------------------- 2. checkpoints


def test_manifest_and_keep_last_rotation(store, data_dir, tmp_path):
    from art_reat.training import train

    result = train(make_config(data_dir, store, tmp_path / "out", "keep-last", epochs=4, keep_last=2,
                               attack_steps=1))
    folder = result.checkpoint_dir
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == ["best.json", "best.pt", "epoch_003.json", "epoch_003.pt", "epoch_004.json", "epoch_004.pt",
                     "last.json", "last.pt"]
    for name in ("last.pt", "epoch_003.pt", "best.pt"):
        manifest = json.loads(manifest_path(folder / name).read_text())
        data = (folder / name).read_bytes()
        assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["bytes"] == len(data)
        assert manifest["file"] == name and manifest["run_id"] == result.run_id
        assert manifest["config"] == result.config.to_dict() and manifest["num_classes"] == C
        assert manifest["package_version"] and manifest["resumable"] is True
        state = load_checkpoint(folder / name)
        assert manifest["epoch"] == state["epoch"]
        assert manifest["metrics"]["train/loss"] == state["history"][-1]["train/loss"]
    assert json.loads(manifest_path(folder / "epoch_003.pt").read_text())["epoch"] == 3
    assert not (folder / ".lock").exists()  # released at the end
    artifacts = {f.path for f in client(store).list_artifacts(result.run_id, "checkpoints")}
    assert {"checkpoints/last.pt", "checkpoints/last.json", "checkpoints/best.pt", "checkpoints/best.json"} <= artifacts


def test_truncated_tampered_and_mismatched_checkpoints_are_named_one_line_errors(store, data_dir, tmp_path):
    from art_reat.training import train

    result = train(make_config(data_dir, store, tmp_path / "out", "tamper", epochs=1, attack_steps=1))
    good = result.checkpoint_dir / "last.pt"
    data = good.read_bytes()

    def copy(name: str, payload: bytes, manifest: bool = True) -> Path:
        path = tmp_path / name
        path.write_bytes(payload)
        if manifest:
            shutil.copy(manifest_path(good), manifest_path(path))
        return path

    cases = {
        copy("truncated.pt", data[: len(data) // 2]): r"is truncated: \d+ bytes",
        copy("tampered.pt", data[:100] + bytes([data[100] ^ 1]) + data[101:]): r"fails its checksum",
        copy("cut-no-manifest.pt", data[: len(data) // 2], manifest=False): r"cannot be read",
    }
    for path, pattern in cases.items():
        with pytest.raises(DataError, match=pattern) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    load_checkpoint(good)  # the original is fine


def test_write_failure_keeps_the_previous_checkpoint_and_manifest(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    write_checkpoint({"model": {"w": torch.ones(3)}, "meta": {"config": {}}}, path, {"epoch": 1})
    before = (path.read_bytes(), manifest_path(path).read_text())
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_fails_on_the_manifest(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the payload's temporary file is written, the manifest's is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_the_manifest)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        write_checkpoint({"model": {"w": torch.zeros(3)}, "meta": {"config": {}}}, path, {"epoch": 2})
    assert str(path) in str(info.value)
    assert (path.read_bytes(), manifest_path(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.pt"]  # no temporary files
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


# ----------------------------------------------------------------------------- 3. faults


def test_disk_full_on_the_second_save_fails_cleanly_and_keeps_epoch_1(store, data_dir, tmp_path, monkeypatch):
    from art_reat.training import train

    real_save = torch.save
    calls = {"n": 0}

    def save_fails_second_time(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_fails_second_time)
    with pytest.raises(CheckpointWriteError) as info:
        train(make_config(data_dir, store, tmp_path / "out", "enospc", attack_steps=1))
    monkeypatch.undo()
    assert info.value.exit_code == 1 and "No space left on device" in str(info.value)
    (run,) = runs_of(store, "enospc")
    assert run.info.status == "FAILED"
    folder = tmp_path / "out" / run.info.run_id
    last = load_checkpoint(folder / "last.pt")  # verified against its manifest
    assert last["epoch"] == 1
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_non_finite_loss_stops_names_epoch_batch_and_term_keeps_the_checkpoint(store, data_dir, tmp_path, monkeypatch):
    """Through the CLI: exit 1, one line naming epoch, batch and the term; last.pt still epoch 1."""
    from art_reat.trainers.pgd_at import PGDATTrainer

    original = PGDATTrainer.training_loss
    calls = {"n": 0}

    def poisoned(self, x_adv, y):
        loss, logits, terms = original(self, x_adv, y)
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, batch 1 (3 batches per epoch)
            bad = torch.tensor(float("nan"))
            return loss + bad, logits, {**terms, "tail": bad}
        return loss, logits, terms

    monkeypatch.setattr(PGDATTrainer, "training_loss", poisoned)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "train", "--dataset", "npz", "--data-dir", str(data_dir), "--model", "small-cnn", "--epochs", "3",
        "--batch-size", "16", "--attack-steps", "1", "--eval-attack-steps", "1", "--val-fraction", "0.2",
        "--device", "cpu", "--tracking-uri", store, "--output-dir", str(out), "--experiment", "nan"])
    assert result.exit_code == 1, result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "non-finite training loss at epoch 2/3, batch 1/3: term tail (" in errors[0]
    assert "tail = nan" in errors[0] and "last good checkpoint is kept" in errors[0]
    (run,) = runs_of(store, "nan")
    assert run.info.status == "FAILED"
    last = load_checkpoint(out / run.info.run_id / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_resume_is_refused_while_the_runs_process_is_alive(store, data_dir, tmp_path, monkeypatch):
    """A lock held by a live process: refused before the run is reopened (it stays as it was)."""
    import socket

    from art_reat.errors import ArtReatError
    from art_reat.resume import resume_training
    from art_reat.training import train

    signal_after_epoch(monkeypatch, 0, signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train(make_config(data_dir, store, tmp_path / "out", "lock", attack_steps=1))
    monkeypatch.undo()
    (run,) = runs_of(store, "lock")
    lock = tmp_path / "out" / run.info.run_id / ".lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "run_id": run.info.run_id}))
    with pytest.raises(ArtReatError, match=f"being trained by process {os.getppid()}"):
        resume_training(run.info.run_id, {"tracking_uri": store})
    assert client(store).get_run(run.info.run_id).info.status == "KILLED"
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))  # a dead process: stale
    result = resume_training(run.info.run_id, {"tracking_uri": store, "epochs": 2})  # --epochs may change
    assert result.run_id == run.info.run_id and len(result.history) == 2
    assert client(store).get_run(run.info.run_id).info.status == "FINISHED"


def test_resume_of_a_checkpoint_whose_run_is_not_in_the_store_starts_a_run_with_its_history(
        store, data_dir, tmp_path, tmp_path_factory):
    """A checkpoint copied elsewhere: a new run in the given store continues it, with every epoch logged."""
    from art_reat.resume import resume_training
    from art_reat.training import train

    first = train(make_config(data_dir, store, tmp_path / "out", "copied", epochs=2, attack_steps=1))
    copy = tmp_path / "copied"
    shutil.copytree(first.checkpoint_dir, copy)
    other = fresh_mlflow_store(tmp_path_factory, "other-store")
    result = resume_training(str(copy / "last.pt"), {"tracking_uri": other, "epochs": 3,
                                                     "output_dir": str(tmp_path / "out2")})
    assert result.run_id != first.run_id and len(result.history) == 3
    run = client(other).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_run"] == first.run_id and run.data.tags["resumed_at_epoch"] == "2"
    assert sorted(m.step for m in client(other).get_metric_history(result.run_id, "train/loss")) == [0, 1, 2]
    assert epoch_metrics(other, result.run_id)["train/loss"][:2] == epoch_metrics(store, first.run_id)["train/loss"]
    assert load_checkpoint(tmp_path / "out2" / result.run_id / "last.pt")["epoch"] == 3
    assert client(store).get_run(first.run_id).info.status == "FINISHED"  # the original run is untouched
