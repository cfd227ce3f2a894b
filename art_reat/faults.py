"""Faults during training: SIGINT / SIGTERM, non-finite losses, a full disk, two processes on one run.

- `StopOnSignals`: while training, the first SIGINT or SIGTERM asks the trainer to stop at the end
  of the current batch; the trainer then writes a resumable checkpoint and raises
  `TrainingInterrupted` (exit 130 / 143, the MLflow run is marked KILLED). A second signal, or one
  that arrives outside the training loop (data loading, the final test), stops at once: the last
  checkpoint written is kept, nothing half-written replaces it (writes are atomic).
- `check_finite`: one host sync per batch; a NaN / inf loss or loss term raises `NonFiniteLoss`
  naming the epoch, the batch and the term, before the optimiser step.
- `check_free_space`: before the run opens, the output folder must have room for the checkpoints
  that the run keeps at the same time.
- `RunLock`: a lock file in a run's checkpoint folder, so that a run is never trained by two
  processes at once (`--resume` of a run whose process is still alive is refused).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Union

import torch

from art_reat.errors import ArtReatError, NonFiniteLoss, TrainingInterrupted



def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignals:
    """Context manager: graceful stop of ``self.trainer`` (set once it exists) on SIGINT / SIGTERM.

    The handler sets ``trainer.stop_signal`` while ``trainer.accepting_stop`` is true (inside
    `fit_loader`); otherwise, or on the second signal, it raises `TrainingInterrupted` at once.
    Handlers are only installed in the main thread and are restored on exit.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM), notify=None) -> None:
        self.signals = tuple(signals)
        self.trainer = None
        self.notify = notify if notify is not None else (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        trainer = self.trainer
        name = signal_name(signum)
        if trainer is not None and getattr(trainer, "accepting_stop", False) and trainer.stop_signal is None:
            trainer.stop_signal = signum
            self.notify(f"\n{name} received: finishing the current batch, then writing a resumable checkpoint "
                        f"(send {name} again to stop at once)")
            return
        if trainer is not None and trainer.stop_signal is not None:
            message = f"{name} received again: stopped at once, without a new checkpoint"
        else:
            message = f"{name} received outside the training loop: stopped at once"
        raise TrainingInterrupted(message, signum)

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (ValueError, OSError):  # not supported here
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def check_finite(loss: torch.Tensor, terms: Dict[str, torch.Tensor], epoch: int, batch: int, nb_epochs: int,
                 nb_batches: Optional[int], checkpoint_note: Union[str, Callable[[], str]] = "") -> None:
    """Raise `NonFiniteLoss` if the loss or one of its named terms is NaN / inf (one host sync).
    ``checkpoint_note`` (text, or a callable giving it) is appended to the message."""
    names = ["loss"] + list(terms)
    values = torch.stack([loss.detach().float().sum()] +
                         [torch.as_tensor(v).detach().float().sum().to(loss.device) for v in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    numbers = values.tolist()
    bad = [n for n, v in zip(names, numbers) if not math.isfinite(v)]
    shown = ", ".join(f"{n} = {v:g}" for n, v in zip(names, numbers))
    culprit = [n for n in bad if n != "loss"]
    which = (f"term {', '.join(culprit)}" if culprit else "the total loss (its terms are finite)")
    where = f"epoch {epoch + 1}/{nb_epochs}, batch {batch + 1}" + (f"/{nb_batches}" if nb_batches else "")
    note = checkpoint_note() if callable(checkpoint_note) else checkpoint_note
    raise NonFiniteLoss(f"non-finite training loss at {where}: {which} ({shown}); training stopped before the "
                        f"optimiser step{note}; try a smaller --lr")


def checkpoint_bytes_estimate(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Rough size of one checkpoint: the model's state plus one optimiser buffer per parameter
    (SGD momentum) and some slack for metadata."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(model_bytes + param_bytes + (1 << 20))


def check_free_space(folder: str | Path, model: torch.nn.Module, optimizer=None, keep_last: int = 0,
                     extra_copies: int = 2) -> int:
    """Raise `ArtReatError` when ``folder`` obviously has no room for the run's checkpoints:
    last + best + ``keep_last`` per-epoch files + one temporary copy + ``extra_copies`` (the MLflow
    artifacts of best and last, when the store is on the same disk). Returns the bytes needed."""
    per_file = checkpoint_bytes_estimate(model, optimizer)
    files = 3 + int(keep_last or 0) + int(extra_copies)
    need = per_file * files
    try:
        free = shutil.disk_usage(str(folder)).free
    except OSError:
        return need
    if free < need:
        raise ArtReatError(
            f"not enough free disk space for checkpoints in {str(folder)!r}: {free / 2**20:.1f} MB free, about "
            f"{need / 2**20:.1f} MB needed ({files} files of {per_file / 2**20:.1f} MB: last, best, "
            f"{int(keep_last or 0)} per-epoch, a temporary copy and the MLflow copies); free some space, "
            f"use a smaller --keep-last or another --output-dir")
    return need


class RunLock:
    """``<checkpoint_dir>/.lock`` holding the pid and host of the process training the run.

    `acquire` fails with a one-line `ArtReatError` when a live process on this host holds it; a lock
    left by a dead process (kill -9, power loss) is taken over. `release` removes it.
    """

    def __init__(self, folder: str | Path, run_id: str) -> None:
        self.path = Path(folder) / ".lock"
        self.run_id = run_id
        self.held = False

    def holder(self) -> Optional[dict]:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def busy(self) -> Optional[dict]:
        """The holder's info when a live process other than this one holds the lock."""
        info = self.holder()
        if not info or info.get("host") != socket.gethostname():
            return None  # absent, unreadable, or another host (cannot tell: treat as free)
        pid = int(info.get("pid", -1))
        if pid == os.getpid() or pid <= 0:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return info
        return info

    def acquire(self) -> "RunLock":
        info = self.busy()
        if info is not None:
            raise ArtReatError(f"run {self.run_id} is being trained by process {info.get('pid')} on this machine "
                               f"(lock {str(self.path)!r}); wait for it to finish or stop it first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".lock.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id}))
        os.replace(tmp, self.path)
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            info = self.holder()
            if info and int(info.get("pid", -1)) == os.getpid():
                try:
                    os.remove(self.path)
                except OSError:
                    pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["RunLock", "StopOnSignals", "check_finite", "check_free_space", "checkpoint_bytes_estimate", "signal_name"]
