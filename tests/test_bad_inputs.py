"""The bad-input matrix (issue 7): every row goes through the command line AND the Python API.

Each bad input must give one clear line (`Error: ...` on stderr; an `ArtReatError` whose message is
one line in the API) and exit code 2 (usage: the user must fix the input) or 1 (runtime: disk,
tracking store, a run still being trained), no traceback, and no MLflow run left RUNNING; the
finished reference run that the resume / attack rows point at must stay FINISHED.

Rows: configuration values, a user's npz data broken in every way `read_npz` checks, CIFAR files
missing without --download or a corrupt array cache, an unreachable tracking store, a full disk,
and `--resume` / `art-reat attack` given unknown runs, truncated, tampered or foreign checkpoints,
changed options or a run whose process is still alive. (The CIFAR-10 rows of tests/test_cli.py and
the attack-option rows of tests/test_attack_cli.py are not repeated here.)
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from art_reat.config import TrainConfig
from art_reat.errors import ArtReatError
from cli.main import main
from support import describe, fresh_mlflow_store

C = 4
COUNTS = [24, 12, 8, 6]
SIZE = 12
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"


# one torch thread for the module (tests/conftest.py): small ops on 2 busy cores run far faster
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- data


def images(rng, n: int, size: int = SIZE) -> np.ndarray:
    return rng.randint(0, 256, size=(n, size, size, 3)).astype(np.uint8)


def save(folder: Path, name: str, **arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **arrays)


def good_arrays(counts=COUNTS, seed: int = 0):
    rng = np.random.RandomState(seed)
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    yt = np.repeat(np.arange(len(counts)), 4).astype(np.int64)
    return images(rng, len(y)), y, images(rng, len(yt)), yt


def write_bad_data(root: Path) -> Dict[str, Path]:
    """One folder per broken npz data set (train.npz + test.npz), plus a good one."""
    x, y, xt, yt = good_arrays()
    n = len(y)
    sets = {
        "good": dict(train=dict(x=x, y=y), test=dict(x=xt, y=yt)),
        "labels-out-of-range": dict(train=dict(x=x, y=y), test=dict(x=xt, y=np.where(yt == 3, 7, yt))),
        "negative-labels": dict(train=dict(x=x, y=np.where(y == 0, -1, y)), test=dict(x=xt, y=yt)),
        "float-images": dict(train=dict(x=x.astype(np.float32) / 255, y=y), test=dict(x=xt, y=yt)),
        "float-labels": dict(train=dict(x=x, y=y.astype(np.float32)), test=dict(x=xt, y=yt)),
        "mismatched-lengths": dict(train=dict(x=x, y=y[:-1]), test=dict(x=xt, y=yt)),
        "non-image-shape": dict(train=dict(x=x.reshape(n, -1), y=y), test=dict(x=xt, y=yt)),
        "empty-class": dict(train=dict(x=x, y=np.where(y == 2, 3, y)), test=dict(x=xt, y=yt)),
        "missing-y": dict(train=dict(x=x), test=dict(x=xt, y=yt)),
        "test-size-differs": dict(train=dict(x=x, y=y), test=dict(x=images(np.random.RandomState(1), len(yt), 16),
                                                                   y=yt)),
        "three-classes": dict(train=dict(x=x[y < 3], y=y[y < 3]), test=dict(x=xt[yt < 3], y=yt[yt < 3])),
    }
    folders = {}
    for name, splits in sets.items():
        folder = root / name
        for split, arrays in splits.items():
            save(folder, f"{split}.npz", **arrays)
        folders[name] = folder
    folders["no-test-file"] = root / "no-test-file"
    save(folders["no-test-file"], "train.npz", x=x, y=y)
    folders["empty"] = root / "empty"
    folders["empty"].mkdir()
    folders["corrupt-cache"] = root / "corrupt-cache"
    (folders["corrupt-cache"] / "cifar10").mkdir(parents=True)
    (folders["corrupt-cache"] / "cifar10" / "train.npz").write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    (folders["corrupt-cache"] / "cifar10" / "test.npz").write_bytes(b"garbage")
    return folders


# ----------------------------------------------------------------------------- the reference run


@dataclass
class Context:
    uri: str
    data: Dict[str, Path]
    run_id: str
    output_dir: Path
    tmp: Optional[Path] = None

    @property
    def last(self) -> Path:
        return self.output_dir / self.run_id / "last.pt"

    def fill(self, text: str) -> str:
        for key, value in (("{tmp}", self.tmp), ("{run}", self.run_id), ("{uri}", self.uri)):
            text = text.replace(key, str(value))
        return re.sub(r"\{data:([\w-]+)\}", lambda m: str(self.data[m.group(1)]), text)




@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Context:
    from art_reat.training import train

    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_bad_data(root / "data")
    uri = fresh_mlflow_store(tmp_path_factory, "bad-inputs-store")
    config = TrainConfig(dataset="npz", data_dir=str(data["good"]), model="small-cnn", epochs=2, batch_size=16,
                         attack_steps=1, eval_attack_steps=1, val_fraction=0.2, device="cpu", tracking_uri=uri,
                         output_dir=str(root / "out"), experiment="reference")
    result = train(config)
    return Context(uri, data, result.run_id, root / "out")


def all_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


# ----------------------------------------------------------------------------- files some rows need


def _copy_last(ctx: Context, name: str, manifest: bool = True) -> Path:
    from art_reat.checkpoints import manifest_path

    path = ctx.tmp / name
    shutil.copy(ctx.last, path)
    if manifest:
        shutil.copy(manifest_path(ctx.last), manifest_path(path))
    return path


def prepare_truncated(ctx: Context) -> None:
    path = _copy_last(ctx, "truncated.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def prepare_tampered(ctx: Context) -> None:
    path = _copy_last(ctx, "tampered.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))


def prepare_garbage(ctx: Context) -> None:
    (ctx.tmp / "garbage.pt").write_bytes(os.urandom(4096))


def prepare_manifest_not_json(ctx: Context) -> None:
    path = _copy_last(ctx, "last.pt")
    path.with_name("last.json").write_text("{ this is not json")


def prepare_other_model(ctx: Context) -> None:
    """The reference checkpoint with the weights of another model (3 classes), a valid manifest."""
    from art_reat.checkpoints import write_checkpoint
    from art_reat.models import build_model

    state = torch.load(ctx.last, weights_only=True)
    state["model"] = build_model("small-cnn", num_classes=3).state_dict()
    write_checkpoint(state, ctx.tmp / "other-model.pt", {"epoch": state["epoch"]})


class RunsCode:
    """Unpickling this object would run a shell command (what a full `torch.load` would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def prepare_code_checkpoint(ctx: Context) -> None:
    state = torch.load(ctx.last, weights_only=True)
    state["trainer"] = {"payload": RunsCode(ctx.tmp / "pwned")}
    torch.save(state, ctx.tmp / "code.pt")  # no manifest: only weights_only loading protects the user


def prepare_live_lock(ctx: Context) -> None:
    """A copy of the run's checkpoint folder whose lock is held by a live process (our parent)."""
    folder = ctx.tmp / "out-copy" / ctx.run_id
    folder.mkdir(parents=True)
    for name in ("last.pt", "last.json"):
        shutil.copy(ctx.last.with_name(name), folder / name)
    (folder / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))


def patch_full_disk(monkeypatch) -> None:
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("art_reat.faults.shutil.disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 4096, 4096))


# ----------------------------------------------------------------------------- the matrix

# (id, kind, spec, exit code, regex the message must match, prepare(ctx) or None, patch(monkeypatch) or None)
# kind "train": spec = config values on top of BASE; "resume": (target, {overrides}); "attack": AttackConfig values.
Row = tuple
ROWS: List[Row] = [
    # configuration values
    ("ur-below-1", "train", {"ur": 0.5}, 2, r"\bur\b\W+0\.5\b"),
    ("eps-zero", "train", {"eps": 0.0}, 2, r"\beps\b\W+0\.0\b"),
    ("eps-above-1", "train", {"eps": 1.5}, 2, r"\beps\b\W+1\.5\b.*\(0, 1\]"),
    ("attack-steps-zero", "train", {"attack_steps": 0}, 2, r"attack.steps\W+0\b"),
    ("batch-size-zero", "train", {"batch_size": 0}, 2, r"batch.size\W+0\b"),
    ("unknown-model", "train", {"model": "resnet-999"}, 2, r"resnet-999"),
    ("unknown-method", "train", {"method": "bogus-at"}, 2, r"bogus-at"),
    ("unknown-dataset", "train", {"dataset": "cifar11lt"}, 2, r"cifar11lt"),
    ("unknown-loss", "train", {"loss": "hinge-x"}, 2, r"hinge-x"),
    ("keep-last-negative", "train", {"keep_last": -1}, 2, r"keep.last\W+-1\b"),
    ("attack-chunk-negative", "train", {"attack_chunk": -2}, 2, r"attack.chunk\W+-2\b.*>= 0"),
    # a user's npz data
    ("npz-labels-out-of-range", "train", {"data_dir": "{data:labels-out-of-range}"}, 2,
     r"labels-out-of-range/test\.npz.*labels must lie in \[0, 4\).*7"),
    ("npz-negative-labels", "train", {"data_dir": "{data:negative-labels}"}, 2, r"negative-labels/train\.npz.*-1"),
    ("npz-float-images", "train", {"data_dir": "{data:float-images}"}, 2, r"float-images/train\.npz.*uint8.*float32"),
    ("npz-float-labels", "train", {"data_dir": "{data:float-labels}"}, 2, r"float-labels/train\.npz.*integer"),
    ("npz-mismatched-lengths", "train", {"data_dir": "{data:mismatched-lengths}"}, 2, r"50 images but y has 49"),
    ("npz-non-image-shape", "train", {"data_dir": "{data:non-image-shape}"}, 2, r"non-image-shape/train\.npz.*NHWC|"
                                                                                 r"non-image-shape/train\.npz.*\[N, H"),
    ("npz-empty-class", "train", {"data_dir": "{data:empty-class}"}, 2, r"empty-class/train\.npz.*\[2\].*no training"),
    ("npz-missing-array", "train", {"data_dir": "{data:missing-y}"}, 2, r"missing-y/train\.npz.*missing array.*\by\b"),
    ("npz-test-image-size-differs", "train", {"data_dir": "{data:test-size-differs}"}, 2, r"test\.npz.*16"),
    ("npz-missing-test-file", "train", {"data_dir": "{data:no-test-file}"}, 2, r"missing data file .*test\.npz"),
    ("cifar-missing-without-download", "train", {"dataset": "cifar10lt", "data_dir": "{data:empty}"}, 2,
     r"empty/cifar10/train\.npz.*--download"),
    ("corrupt-array-cache", "train", {"dataset": "cifar10lt", "data_dir": "{data:corrupt-cache}"}, 2,
     r"corrupt-cache/cifar10/train\.npz.*corrupt"),
    # runtime: the environment, not the input (exit 1)
    ("unreachable-tracking-store", "train", {"tracking_uri": "sqlite:///{tmp}/a-file.txt/mlflow.db"}, 1,
     r"cannot open MLflow tracking store"),
    ("not-enough-disk-space", "train", {}, 1, r"not enough free disk space .* MB free", None, patch_full_disk),
    # --resume
    ("resume-unknown-run-id", "resume", (UNKNOWN_RUN, {}), 2, UNKNOWN_RUN + r".*no run with that id"),
    ("resume-missing-checkpoint", "resume", ("{tmp}/nowhere.pt", {}), 2, r"{tmp}/nowhere\.pt.*does not exist"),
    ("resume-truncated-checkpoint", "resume", ("{tmp}/truncated.pt", {}), 2, r"{tmp}/truncated\.pt.* truncated",
     prepare_truncated),
    ("resume-tampered-checkpoint", "resume", ("{tmp}/tampered.pt", {}), 2, r"{tmp}/tampered\.pt.*checksum",
     prepare_tampered),
    ("resume-garbage-checkpoint", "resume", ("{tmp}/garbage.pt", {}), 2, r"{tmp}/garbage\.pt.*cannot be read",
     prepare_garbage),
    ("resume-manifest-not-json", "resume", ("{tmp}/last.pt", {}), 2, r"{tmp}/last\.json.*cannot be read",
     prepare_manifest_not_json),
    ("resume-checkpoint-that-would-run-code", "resume", ("{tmp}/code.pt", {}), 2,
     r"{tmp}/code\.pt.*refused.*could run code.*posix\.system", prepare_code_checkpoint),
    ("resume-checkpoint-of-another-model", "resume", ("{tmp}/other-model.pt", {"epochs": 3}), 2,
     r"{tmp}/other-model\.pt.*does not fit model 'small-cnn' with 4 classes: size mismatch for head\.weight",
     prepare_other_model),
    ("resume-changed-option", "resume", ("{run}", {"lr": 0.5}), 2, r"--lr 0\.5 \(saved: 0\.1\) differs"),
    ("resume-finished-run", "resume", ("{run}", {}), 2, r"run {run} already finished its 2 epochs"),
    ("resume-fewer-epochs", "resume", ("{run}", {"epochs": 1}), 2, r"invalid epochs 1.*already at epoch 2"),
    ("resume-data-with-other-class-count", "resume", ("{run}", {"epochs": 3, "data_dir": "{data:three-classes}"}), 2,
     r"trained with 4 classes, but .*three-classes.* have 3"),
    ("resume-run-still-being-trained", "resume", ("{run}", {"epochs": 3, "output_dir": "{tmp}/out-copy"}), 1,
     rf"run {{run}} is being trained by process {os.getppid()}", prepare_live_lock),
    # art-reat attack
    ("attack-unknown-run-id", "attack", {"run_id": UNKNOWN_RUN}, 2, r"unknown run id '" + UNKNOWN_RUN),
    ("attack-tampered-checkpoint", "attack", {"checkpoint": "{tmp}/tampered.pt"}, 2, r"{tmp}/tampered\.pt.*checksum",
     prepare_tampered),
    ("attack-truncated-checkpoint", "attack", {"checkpoint": "{tmp}/truncated.pt"}, 2,
     r"{tmp}/truncated\.pt.* truncated", prepare_truncated),
]

BASE = dict(dataset="npz", model="small-cnn", epochs=1, batch_size=16, attack_steps=1, eval_attack_steps=1,
            val_fraction=0.2, device="cpu", experiment="bad-inputs")


def _flags(values: Dict[str, object]) -> List[str]:
    out: List[str] = []
    for key, value in values.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def build(ctx: Context, kind: str, spec) -> tuple:
    """(CLI arguments, API call) of one row."""
    if kind == "train":
        values = {**BASE, "data_dir": str(ctx.data["good"]), "tracking_uri": ctx.uri,
                  "output_dir": str(ctx.tmp / "out"), **spec}
        values = {k: ctx.fill(v) if isinstance(v, str) else v for k, v in values.items()}

        def api():
            from art_reat.training import train

            return train(TrainConfig.from_dict(values))

        return ["train", *_flags(values)], api
    if kind == "resume":
        target, overrides = spec
        target = ctx.fill(target)
        overrides = {"tracking_uri": ctx.uri, **{k: ctx.fill(v) if isinstance(v, str) else v
                                                  for k, v in overrides.items()}}

        def api():
            from art_reat.resume import resume_training

            return resume_training(target, overrides)

        return ["train", "--resume", target, *_flags(overrides)], api
    values = {"tracking_uri": ctx.uri, "eval_samples": 8, "state_dir": str(ctx.tmp / "state"), "device": "cpu",
              "attacks": ["pgd1"], **{k: ctx.fill(v) if isinstance(v, str) else v for k, v in spec.items()}}

    def api():
        from art_reat.evaluation.evaluate import AttackConfig, evaluate

        return evaluate(AttackConfig(**values))

    cli_values = {k: (",".join(v) if isinstance(v, list) else v) for k, v in values.items()}
    return ["attack", *_flags(cli_values)], api




def test_the_matrix_has_at_least_20_rows_of_each_interface():
    assert len(ROWS) >= 20
    assert len({row[0] for row in ROWS}) == len(ROWS)
    assert {row[1] for row in ROWS} == {"train", "resume", "attack"}


@pytest.mark.parametrize("row", [pytest.param(row, id=row[0]) for row in ROWS])
def test_bad_input_gives_one_line_and_exit_code_through_cli_and_api(context, tmp_path, monkeypatch, row):
    name, kind, spec, code, pattern = row[:5]
    prepare = row[5] if len(row) > 5 else None
    patch = row[6] if len(row) > 6 else None
    ctx = Context(context.uri, context.data, context.run_id, context.output_dir, tmp_path)
    (tmp_path / "a-file.txt").write_text("a regular file, not a folder\n")
    monkeypatch.chdir(tmp_path)  # relative defaults (./mlruns, outputs) stay in tmp_path
    if prepare is not None:
        prepare(ctx)
    if patch is not None:
        patch(monkeypatch)
    regex = re.compile(ctx.fill(pattern.replace("{tmp}", re.escape(str(tmp_path)))), re.IGNORECASE)
    args, api = build(ctx, kind, spec)

    # the command line
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, describe(result)
    assert isinstance(result.exception, SystemExit), describe(result)  # no uncaught exception
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, describe(result)
    assert not [line for line in lines if line not in errors and not line.startswith(("Usage:", "Try "))], \
        describe(result)
    assert regex.search(errors[0]), errors[0]

    # the Python API
    with pytest.raises(ArtReatError) as info:
        api()
    message = str(info.value)
    assert info.value.exit_code == code, message
    assert "\n" not in message and regex.search(message), message
    assert errors[0] == f"Error: {message}"  # the CLI prints the API's message

    assert not (tmp_path / "pwned").exists()  # nothing in a checkpoint was ever executed

    # no run left RUNNING, the reference run untouched
    runs = all_runs(ctx.uri)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert {r.info.run_id: r.info.status for r in runs}[ctx.run_id] == "FINISHED"
