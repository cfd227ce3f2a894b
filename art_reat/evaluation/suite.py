"""The evaluation suite: clean accuracy and a list of attacks on a test set, resumable per batch.

Each attack runs chunk by chunk (one chunk = one attack batch). With a `state_dir`, the
predictions of every finished chunk are saved at once, so an interrupted evaluation (AutoAttack
takes hours on big models) resumes where it stopped; chunk c's random start is seeded with
`seed + c`, so a resumed evaluation gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from art_reat.attacks import ThreatModel, build_attack
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
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    # contiguous NCHW: pyautoattack `.view`s input gradients, which fails on permuted strides
    return (t.permute(0, 3, 1, 2).float().div_(255.0) if t.dtype == torch.uint8 else t.float()).contiguous()


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
            for index, start in enumerate(range(0, len(y), chunk)):
                sl = slice(start, start + chunk)
                if state.done(sl):
                    continue
                xb = _to_batch(x[sl], device)
                yb = labels[sl].to(device)
                if attack is not None:
                    generator = torch.Generator(device=device).manual_seed(seed + index)
                    xb = attack.perturb(xb, yb, generator=generator)
                with torch.no_grad():
                    state.store(sl, model(xb).argmax(dim=1).cpu().numpy())
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
