"""The evaluation suite: clean accuracy and a list of attacks on a test set, resumable per batch.

Each attack runs chunk by chunk (one chunk = one attack batch). With a `state_dir`, the
predictions of every finished chunk are saved at once, so an interrupted evaluation (AutoAttack
takes hours on big models) resumes where it stopped; chunk c's random start is seeded with
`seed + c`, so a resumed evaluation gives the same numbers as an uninterrupted one.

Out of memory: a chunk that does not fit is evaluated in halves (then quarters, ... down to one
sample), with a warning naming the `--batch-size` that fits; the smaller size is kept for the
following chunks. A split chunk draws the random start of the whole chunk and slices it, so the
numbers do not depend on the split. One sample that does not fit is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from art_reat.accel import to_device
from art_reat.attacks import ThreatModel, build_attack
from art_reat.errors import ArtReatError
from art_reat.evaluation.metrics import accuracy_report


@dataclass
class SuiteResult:
    reports: Dict[str, dict]  # attack name ("clean" first) -> accuracy_report
    threat: ThreatModel
    n_samples: int
    flags: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"threat_model": vars(self.threat), "n_samples": self.n_samples, "reports": self.reports,
                "flags": self.flags}


class ChunkState:
    """Per-attack predictions of finished chunks, saved atomically as `<dir>/<key>.npz`."""

    def __init__(self, state_dir: Optional[Path], key: str, n: int) -> None:
        self.path = None if state_dir is None else Path(state_dir) / f"{key}.npz"
        self.pred = np.full(n, -1, dtype=np.int64)
        if self.path is not None and self.path.exists():
            with np.load(self.path) as saved:
                if saved["pred"].shape == self.pred.shape:
                    self.pred = saved["pred"].copy()

    def done(self, sl: slice) -> bool:
        return bool((self.pred[sl] >= 0).all())

    def store(self, sl: slice, pred: np.ndarray) -> None:
        self.pred[sl] = pred
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp.npz")
            np.savez(tmp, pred=self.pred)
            os.replace(tmp, self.path)


def _to_batch(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = to_device(x, device)  # pinned and non-blocking on CUDA
    # contiguous NCHW: pyautoattack `.view`s input gradients, which fails on permuted strides
    return (t.permute(0, 3, 1, 2).float().div_(255.0) if t.dtype == torch.uint8 else t.float()).contiguous()


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) out-of-memory error: ``torch.OutOfMemoryError`` or a RuntimeError saying so."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "not enough memory", "can't allocate memory"))


def _release_memory(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _predict_chunk(model, attack, x: np.ndarray, labels: torch.Tensor, start: int, stop: int, size: int,
                   device, chunk_seed: int, name: str):
    """Predictions for samples ``[start, stop)`` (one resumable chunk), in pieces of at most ``size``.

    On out-of-memory the piece is halved and retried, down to one sample; the size that worked is
    returned for the next chunks. Every piece of the chunk draws its random start from the chunk's
    generator for the whole chunk (`TensorPGD.shard`), so the result does not depend on the split.
    """
    from art_reat.distributed import BatchShard

    total = stop - start
    preds = []
    pos = start
    while pos < stop:
        take = min(size, stop - pos)
        try:
            xb = _to_batch(x[pos:pos + take], device)
            yb = labels[pos:pos + take].to(device, non_blocking=True)
            if attack is not None:
                generator = torch.Generator(device=device).manual_seed(chunk_seed)
                sharded = hasattr(attack, "shard")
                if sharded:
                    attack.shard = BatchShard(pos - start, pos - start + take, total)
                try:
                    xb = attack.perturb(xb, yb, generator=generator)
                finally:
                    if sharded:
                        attack.shard = None
            with torch.no_grad():
                preds.append(model(xb).argmax(dim=1).cpu().numpy())
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            xb = yb = None
            _release_memory(device)
            option = "--aa-batch-size" if name == "aa" else "--batch-size"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            if take <= 1:
                raise ArtReatError(f"out of memory evaluating {name!r} even with {option} 1 ({first}): free device "
                                   f"memory (other processes?) or use a device with more memory") from None
            size = max(1, take // 2)
            warnings.warn(f"out of memory evaluating {name!r} with {take} samples at a time: continuing with {size} "
                          f"(give {option} {size} to start there)", RuntimeWarning, stacklevel=2)
            continue
        pos += take
    return np.concatenate(preds), size


def state_key(identity: Mapping[str, object], attack: str) -> str:
    """Key of one attack's resume file: the attack name plus a hash of what was evaluated."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{attack}-{digest}"


def run_suite(classifier, x: np.ndarray, y: np.ndarray, attacks: Sequence[str], threat: ThreatModel,
              num_classes: int, groups: Optional[Mapping[str, Sequence[int]]] = None, batch_size: int = 256,
              aa_batch_size: int = 500, seed: int = 0, state_dir: Optional[Path] = None,
              identity: Optional[Mapping[str, object]] = None,
              on_chunk: Optional[Callable[[str, int, int], None]] = None) -> SuiteResult:
    """Evaluate `classifier` (an ART PyTorchClassifier) on uint8 NHWC (or float NCHW) `x`, labels `y`."""
    device = classifier.device
    model = classifier.model
    labels = torch.as_tensor(y, dtype=torch.long)
    reports: Dict[str, dict] = {}
    identity = dict(identity or {}, n=len(y), threat=vars(threat), seed=seed,
                    labels=hashlib.sha256(np.asarray(y).tobytes()).hexdigest()[:12],
                    images=hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:12])
    was_training = model.training
    model.eval()
    try:
        for name in ["clean", *attacks]:
            attack = None if name == "clean" else build_attack(name, classifier, threat, batch_size=batch_size,
                                                               seed=seed)
            chunk = aa_batch_size if name == "aa" else batch_size
            state = ChunkState(state_dir if name != "clean" else None, state_key(identity, name), len(y))
            size = chunk  # what fits in memory: halved on out-of-memory, kept for the next chunks
            for index, start in enumerate(range(0, len(y), chunk)):
                sl = slice(start, start + chunk)
                if state.done(sl):
                    continue
                pred, size = _predict_chunk(model, attack, x, labels, start, min(start + chunk, len(y)), size,
                                            device, seed + index, name)
                state.store(sl, pred)
                if on_chunk is not None:
                    on_chunk(name, min(start + chunk, len(y)), len(y))
            reports[name] = accuracy_report(torch.from_numpy(state.pred), labels, num_classes, groups)
    finally:
        model.train(was_training)
    return SuiteResult(reports, threat, len(y))


def audit(classifier, x: np.ndarray, y: np.ndarray, threat: ThreatModel, num_classes: int,
          steps: Sequence[int] = (10, 20, 50, 100), scales: Sequence[float] = (1, 10, 100),
          scale_steps: int = 20, max_drop: float = 0.02, **kwargs) -> SuiteResult:
    """Gradient-masking diagnostics: robust accuracy against PGD steps and logit scales.

    Flags a model whose robust accuracy rises with more steps (a sound attack only gets stronger)
    or falls by more than `max_drop` when the attack's logits are scaled (masked gradients).
    """
    names = [f"pgd{s}" for s in steps] + [f"pgd{scale_steps}-x{_fmt(a)}" for a in scales if a != 1]
    result = run_suite(classifier, x, y, names, threat, num_classes, **kwargs)
    acc = {name: report["overall"] for name, report in result.reports.items()}
    for fewer, more in zip(steps, steps[1:]):
        if acc[f"pgd{more}"] > acc[f"pgd{fewer}"]:
            result.flags.append(f"robust accuracy rises from {100 * acc[f'pgd{fewer}']:.2f}% (PGD-{fewer}) to "
                                f"{100 * acc[f'pgd{more}']:.2f}% (PGD-{more}): the attack is not converging")
    base = acc[f"pgd{scale_steps}"] if f"pgd{scale_steps}" in acc else None
    for a in scales:
        if a == 1 or base is None:
            continue
        scaled = acc[f"pgd{scale_steps}-x{_fmt(a)}"]
        if base - scaled > max_drop + 1e-9:  # accuracies are ratios of counts: ignore float rounding
            result.flags.append(f"robust accuracy falls from {100 * base:.2f}% to {100 * scaled:.2f}% when the "
                                f"attack's logits are scaled x{_fmt(a)}: gradient masking")
    return result


def _fmt(value: float) -> str:
    return f"{value:g}"
