"""Several processes with torch.distributed (issue 6): sharding, and 2 gloo processes == 1 process.

The equivalence test spawns two CPU processes (gloo on 127.0.0.1, a free port) that each call
`train()` with torchrun's environment variables set, exactly as `torchrun --nproc-per-node 2
--no-python art-reat train ...` does, on tiny npz data written to a temporary folder. REAT with
TAIL and logit RBL (so that epoch e's prediction counts change epoch e+1's attack) trains a small
conv model WITHOUT BatchNorm (registered here only), with a global batch of 25 (uneven slices of
13 and 12: the loss rescaling and the padded gather are exercised). The RBL counts, every epoch
metric and the final weights must match one process on the same data within float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
import torch
import torch.nn.functional as F
from torch import nn

from art_reat.config import TrainConfig
from art_reat.data import DeviceLoader
from art_reat.distributed import (BatchShard, ShardedLoader, backend_for, rank_device, shard_of, shard_sizes,
                                  torchrun_env)
from art_reat.errors import UsageError
from art_reat.models import MODELS
from art_reat.models.base import FeatureModel

TINY = "test-tiny-conv-nobn"
COUNTS = [30, 22, 16, 12, 9, 7, 6, 5, 4, 3]  # 10 classes: the reference tail is {7, 8, 9}
SIZE = 8
REPO = Path(__file__).resolve().parents[1]


class TinyConvNoBN(FeatureModel):
    """Two convolutions, no BatchNorm: its forward pass does not depend on the rest of the batch."""

    def __init__(self, num_classes: int, in_channels: int = 3, normalization=None) -> None:
        super().__init__(16, num_classes, in_channels, normalization)
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(self.normalize(x)))
        x = F.relu(self.conv2(F.max_pool2d(x, 2)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _register_tiny() -> None:
    if TINY not in MODELS:
        MODELS.register(TINY)(lambda num_classes, in_channels=3, normalization=None:
                              TinyConvNoBN(num_classes, in_channels, normalization))


@pytest.fixture(autouse=True, scope="module")
def _tiny_model_registered():
    """In the test process the model is registered only while this module's tests run (other
    modules enumerate the registry)."""
    _register_tiny()
    yield
    MODELS._entries.pop(TINY, None)


# ----------------------------------------------------------------------------- torchrun environment


def test_torchrun_env_detection():
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None  # one process: plain run
    assert torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, {"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}):
        with pytest.raises(UsageError, match="torchrun environment"):
            torchrun_env(bad)


def test_backend_and_device_of_a_rank():
    """The CUDA branch's choices, checked without a GPU."""
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"
    assert rank_device("auto", 2, cuda_available=True) == torch.device("cuda", 2)
    assert rank_device("cuda", 1, cuda_available=True) == torch.device("cuda", 1)
    assert rank_device("auto", 2, cuda_available=False) == torch.device("cpu")
    assert rank_device("cpu", 2, cuda_available=True) == torch.device("cpu")
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        rank_device("cuda:0", 1, cuda_available=True)
    with pytest.raises(UsageError, match="CUDA is not available"):
        rank_device("cuda", 0, cuda_available=False)


# ----------------------------------------------------------------------------- sharding


def test_shard_sizes_split_evenly():
    assert shard_sizes(25, 2) == (13, 12)
    assert shard_sizes(24, 3) == (8, 8, 8)
    assert shard_sizes(5, 4) == (2, 1, 1, 1)
    assert shard_of(25, 2, 1) == BatchShard(13, 25, 25, (13, 12))


@pytest.mark.parametrize("n, batch, world", [(114, 25, 2), (103, 20, 4), (41, 10, 3)])
def test_sharded_loader_union_is_the_single_process_batch(n, batch, world):
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, size=(n, SIZE, SIZE, 3)).astype(np.uint8)
    y = rng.randint(0, 10, size=n)

    def loader():
        return DeviceLoader(x, y, batch, augment=True, shuffle=True, seed=3)

    single = list(loader())
    shards = [ShardedLoader(loader(), rank, world) for rank in range(world)]
    per_rank = [list(s) for s in shards]
    last = n - (len(single) - 1) * batch
    kept = single[:-1] if last < world else single  # a last batch smaller than the world is skipped
    assert all(len(s) == len(kept) for s in shards)
    for b, (xg, yg) in enumerate(kept):
        xs = torch.cat([per_rank[r][b][0] for r in range(world)])
        ys = torch.cat([per_rank[r][b][1] for r in range(world)])
        assert torch.equal(xs, xg) and torch.equal(ys, yg)
        sizes = [per_rank[r][b][1].shape[0] for r in range(world)]
        assert max(sizes) - min(sizes) <= 1


def test_sharded_loader_reports_the_current_shard():
    x = np.zeros((10, SIZE, SIZE, 3), dtype=np.uint8)
    sharded = ShardedLoader(DeviceLoader(x, np.arange(10), 5), 1, 2)
    seen = [sharded.current_shard for _ in sharded]
    assert seen == [BatchShard(3, 5, 5, (3, 2))] * 2
    assert sharded.current_shard is None and sharded.num_samples == 10


# ----------------------------------------------------------------------------- 2 processes == 1 process


def write_npz(folder: Path) -> Path:
    rng = np.random.RandomState(0)
    colours = rng.randint(40, 216, size=(len(COUNTS), 1, 1, 3))

    def images(y):
        return np.clip(colours[y] + rng.randint(-40, 41, size=(len(y), SIZE, SIZE, 3)), 0, 255).astype(np.uint8)

    y = np.repeat(np.arange(len(COUNTS)), COUNTS)
    yt = np.repeat(np.arange(len(COUNTS)), 3)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=images(y), y=y)
    np.savez(folder / "test.npz", x=images(yt), y=yt)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, values: dict, out: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then `train()`."""
    _register_tiny()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from art_reat.training import train

    result = train(TrainConfig(**values))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"run_id": result.run_id, "history": result.history,
                                                         "test": result.test}))


def _faulty_worker(rank: int, world: int, port: int, values: dict, out: str, fault: str, fault_rank: int) -> None:
    """A process whose rank ``fault_rank`` gets a NaN loss or a stop request at its 2nd batch; every
    process records how it ended instead of raising (so that the test sees all of them)."""
    import signal

    from art_reat.trainers.pgd_at import PGDATTrainer

    original = PGDATTrainer.training_loss
    calls = []

    def training_loss(self, x_adv, y):
        loss, logits, terms = original(self, x_adv, y)
        calls.append(1)
        if rank == fault_rank and len(calls) == 2:
            if fault == "nan":
                loss = loss * float("nan")
            else:
                self.stop_signal = signal.SIGTERM
        return loss, logits, terms

    PGDATTrainer.training_loss = training_loss
    try:
        _worker(rank, world, port, values, out)
        ended = "finished"
    except BaseException as exc:  # TrainingInterrupted is a KeyboardInterrupt
        ended = f"{type(exc).__name__}: {exc}"
    import torch.distributed as dist

    Path(out, f"fault{rank}.json").write_text(json.dumps({"ended": ended, "batches": len(calls),
                                                          "group_left": dist.is_initialized()}))


def _resume_worker(rank: int, world: int, port: int, run_id: str, uri: str, out: str) -> None:
    """`art-reat train --resume RUN_ID` in a torchrun-like process."""
    _register_tiny()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from art_reat.resume import resume_training

    result = resume_training(run_id, {"tracking_uri": uri})
    Path(out, f"resumed{rank}.json").write_text(json.dumps({"history": result.history}))


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def runs_in(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found is not None else []


def test_two_gloo_processes_equal_one_process_reat_with_tail(tmp_path):
    import torch.multiprocessing as mp

    data = write_npz(tmp_path / "data")
    values = dict(dataset="npz", data_dir=str(data), model=TINY, method="reat", rbl="logit", tail="reference",
                  epochs=3, batch_size=25, lr=0.2, attack_steps=2, eval_attack_steps=1, val_fraction=0.0,
                  milestones=[10], device="cpu", tracking_uri=store_uri(tmp_path))
    mp.spawn(_worker, args=(2, free_port(), dict(values, experiment="two", output_dir=str(tmp_path / "out2")),
                            str(tmp_path)), nprocs=2, join=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from art_reat.training import train

        single = train(TrainConfig(**dict(values, experiment="one", output_dir=str(tmp_path / "out1"))))
    finally:
        torch.set_num_threads(previous)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())

    # rank 0 tracks the run, rank 1 tracks nothing
    assert rank1["run_id"] is None and rank1["test"] == {}
    runs = runs_in(store_uri(tmp_path), "two")
    assert [r.info.run_id for r in runs] == [rank0["run_id"]] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["world_size"] == "2"
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [rank0["run_id"]]

    assert len(single.history) == len(rank0["history"]) == len(rank1["history"]) == 3
    counts_changed = False
    for epoch, (one, r0, r1) in enumerate(zip(single.history, rank0["history"], rank1["history"])):
        keys = set(one) - {"epoch_seconds"}
        assert keys == set(r0) - {"epoch_seconds"} == set(r1) - {"epoch_seconds"}
        for key in sorted(keys):
            if key.startswith("adv_pred/"):  # RBL prediction counts: integers, all-reduced
                assert one[key] == r0[key] == r1[key], (epoch, key)
            else:
                assert r0[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (epoch, key)
                assert r1[key] == r0[key], (epoch, key)
        counts = [one[f"adv_pred/class_{c}"] for c in range(len(COUNTS))]
        assert sum(counts) == sum(COUNTS)
        counts_changed |= max(counts) < sum(COUNTS)
    assert counts_changed, "the test data should make the model predict more than one class"
    assert single.history[-1]["train/loss_tail"] > 0
    for name, report in single.test.items():
        assert rank0["test"][name]["overall"] == pytest.approx(report["overall"], abs=1e-9)

    one = torch.load(single.checkpoint_dir / "last.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "out2" / rank0["run_id"] / "last.pt", weights_only=True)["model"]
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None or shutil.which("art-reat") is None,
                    reason="torchrun / art-reat not on PATH")
def test_torchrun_cli_two_processes(tmp_path):
    """The documented command: `torchrun --nproc-per-node 2 --no-python art-reat train ...` (small-cnn,
    BatchNorm per rank on the CPU), with --amp and --channels-last; one run, one summary."""
    data = write_npz(tmp_path / "data")
    # this checkout first on the path (an editable install may point elsewhere)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--no-python", "art-reat", "train", "--dataset", "npz", "--data-dir", str(data), "--model", "small-cnn",
           "--method", "reat", "--epochs", "1", "--batch-size", "25", "--attack-steps", "1", "--eval-attack-steps", "1",
           "--val-fraction", "0.1", "--device", "cpu", "--amp", "--channels-last", "--tracking-uri",
           store_uri(tmp_path), "--output-dir", str(tmp_path / "out"), "--experiment", "torchrun"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = runs_in(store_uri(tmp_path), "torchrun")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["amp"] == "True" and runs[0].data.tags["world_size"] == "2"
    assert done.stdout.count("checkpoints:") == 1  # only rank 0 prints the summary
    assert (tmp_path / "out" / runs[0].info.run_id / "best.pt").is_file()


@pytest.mark.parametrize("fault", ["nan", "stop"])
def test_a_fault_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path, fault):
    """A NaN loss or a SIGTERM on rank 1 only: both ranks stop after the same batch (no rank waits
    forever in a collective), rank 0 marks the run FAILED / KILLED, and the process group is gone."""
    import torch.multiprocessing as mp

    data = write_npz(tmp_path / "data")
    values = dict(dataset="npz", data_dir=str(data), model=TINY, method="reat", epochs=1, batch_size=25,
                  attack_steps=1, eval_attack_steps=1, val_fraction=0.0, device="cpu", tracking_uri=store_uri(tmp_path),
                  experiment=fault, output_dir=str(tmp_path / "out"))
    mp.spawn(_faulty_worker, args=(2, free_port(), values, str(tmp_path), fault, 1), nprocs=2, join=True)
    ends = [json.loads((tmp_path / f"fault{r}.json").read_text()) for r in range(2)]
    assert [e["batches"] for e in ends] == [2, 2]
    assert not any(e["group_left"] for e in ends)
    (run,) = runs_in(store_uri(tmp_path), fault)
    if fault == "nan":
        assert ends[1]["ended"].startswith("NonFiniteLoss: non-finite training loss at epoch 1/1, batch 2/5")
        assert ends[0]["ended"].startswith("NonFiniteLoss: non-finite training loss on another process at epoch 1/1, "
                                           "batch 2/5")
        assert run.info.status == "FAILED"
    else:
        assert all(e["ended"].startswith("TrainingInterrupted: SIGTERM during epoch 1/1, after batch 2/5") for e in ends)
        assert "resume with: art-reat train --resume" in ends[0]["ended"]
        assert run.info.status == "KILLED"
        state = torch.load(tmp_path / "out" / run.info.run_id / "last.pt", weights_only=True)
        partial = state["partial"]
        assert partial["batch"] == 2 and partial["seen"] == 50  # the global count: both ranks' slices
        assert int(partial["adv_pred"].sum()) == 50 and int(state["trainer"]["adv_pred_counts"].sum()) == 50
        # resumed by 2 processes: the running sums are counted once (rank 1 starts from zero), and the
        # epoch equals one uninterrupted process
        mp.spawn(_resume_worker, args=(2, free_port(), run.info.run_id, store_uri(tmp_path), str(tmp_path)), nprocs=2,
                 join=True)
        resumed = [json.loads((tmp_path / f"resumed{r}.json").read_text())["history"] for r in range(2)]
        from art_reat.training import train

        single = train(TrainConfig(**dict(values, experiment="single", output_dir=str(tmp_path / "out1")))).history
        for history in resumed:
            assert len(history) == 1
            for key, value in single[0].items():
                if key != "epoch_seconds":
                    assert history[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_sweep_refuses_to_run_under_torchrun(monkeypatch):
    from cli.main import main

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["sweep", "--seed", "0", "--seed", "1"])
    assert result.exit_code == 2 and "a sweep runs in one process" in result.output


def test_end_meets_at_a_barrier_only_after_an_agreed_stop(monkeypatch):
    """`distributed.end`: barrier then teardown when every rank stopped together; straight teardown
    after an error on one rank (its peers may never reach a barrier); a failing barrier still tears down."""
    from art_reat import distributed
    from art_reat.distributed import DistContext

    calls = []
    monkeypatch.setattr(distributed, "abort", lambda ctx: calls.append("abort"))

    class Ctx(DistContext):
        def barrier(self):
            calls.append("barrier")
            if self.local_rank == 99:
                raise RuntimeError("peer gone")

    distributed.end(Ctx(0, 2, 0, torch.device("cpu"), "gloo"))
    assert calls == ["abort"]
    calls.clear()
    distributed.end(Ctx(0, 2, 0, torch.device("cpu"), "gloo", stopped_together=True))
    assert calls == ["barrier", "abort"]
    calls.clear()
    distributed.end(Ctx(0, 2, 99, torch.device("cpu"), "gloo", stopped_together=True))
    assert calls == ["barrier", "abort"]
    distributed.end(None)  # one process: nothing to do
