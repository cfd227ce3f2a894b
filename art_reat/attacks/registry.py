"""The registry of evaluation attacks and the names users type (`pgd20`, `cw100`, `aa`, `pgd20-x10`).

A name is a family plus a step count, optionally `-xA` for the logit-scaled (adaptive) variant:
`pgd20` is PGD-20 with CE, `pgd20-x10` is PGD-20 on CE(10 * logits), `cw100` is PGD-100 on the CW
margin loss, `aa` is standard AutoAttack. A new family is one builder registered here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from art_reat.attacks.adaptive import CWMarginPGD, LogitScaledPGD
from art_reat.attacks.autoattack import StandardAutoAttack
from art_reat.attacks.pgd import TensorPGD
from art_reat.errors import UsageError
from art_reat.registry import Registry

ATTACKS: Registry = Registry("attack")
NORMS = ("linf", "l2")
_NAME = re.compile(r"^(?P<family>[a-z]+?)(?P<steps>\d*)(?:-x(?P<scale>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class ThreatModel:
    """Norm, radius and PGD step size (SPEC section 9: L-inf 8/255 and 2/255; L2 1.0 and 0.2)."""

    norm: str = "linf"
    eps: float = 8 / 255
    step: float = 2 / 255

    @classmethod
    def for_norm(cls, norm: str = "linf", eps: Optional[float] = None, step: Optional[float] = None) -> "ThreatModel":
        if norm not in NORMS:
            raise UsageError(f"invalid norm {norm!r}: must be one of {', '.join(NORMS)}")
        if eps is None:
            eps = 8 / 255 if norm == "linf" else 1.0
        if not eps > 0 or (norm == "linf" and eps > 1):
            raise UsageError(f"invalid eps {eps!r}: must be in (0, 1] for linf, > 0 for l2")
        if step is None:
            step = eps / 4 if norm == "linf" else eps / 5
        if not step > 0:
            raise UsageError(f"invalid step size {step!r}: must be > 0")
        return cls(norm, float(eps), float(step))

    @property
    def art_norm(self):
        return float("inf") if self.norm == "linf" else 2


@dataclass(frozen=True)
class AttackSpec:
    name: str
    family: str
    steps: Optional[int]
    scale: Optional[float]


def parse_attack(name: str) -> AttackSpec:
    match = _NAME.match(name.strip().lower())
    usage = ("use pgdN or cwN (e.g. pgd20, pgd100, cw100) or aa, with -xA for a logit-scaled variant "
             "(e.g. pgd20-x10)")
    if not match or match["family"] not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}: {usage}")
    family, steps, scale = match["family"], match["steps"], match["scale"]
    if family == "aa":
        if steps or scale:
            raise UsageError(f"invalid attack {name!r}: AutoAttack takes no step count or scale; {usage}")
        return AttackSpec(name, family, None, None)
    if not steps or int(steps) < 1:
        raise UsageError(f"invalid attack {name!r}: give the number of steps, {usage}")
    if scale is not None and family != "pgd":
        raise UsageError(f"invalid attack {name!r}: logit scaling applies to pgdN only; {usage}")
    if scale is not None and not float(scale) > 0:
        raise UsageError(f"invalid attack {name!r}: the logit scale must be > 0; {usage}")
    return AttackSpec(name, family, int(steps), float(scale) if scale else None)


def build_attack(name: str, classifier, threat: ThreatModel, batch_size: int = 128, seed: int = 0):
    spec = parse_attack(name)
    return ATTACKS.get(spec.family)(classifier, threat, spec, batch_size=batch_size, seed=seed)


@ATTACKS.register("pgd")
def _pgd(classifier, threat: ThreatModel, spec: AttackSpec, batch_size: int, seed: int) -> TensorPGD:
    common = dict(norm=threat.art_norm, eps=threat.eps, eps_step=threat.step, max_iter=spec.steps,
                  batch_size=batch_size)
    if spec.scale is not None:
        return LogitScaledPGD(classifier, alpha=spec.scale, **common)
    return TensorPGD(classifier, **common)


@ATTACKS.register("cw")
def _cw(classifier, threat: ThreatModel, spec: AttackSpec, batch_size: int, seed: int) -> CWMarginPGD:
    return CWMarginPGD(classifier, norm=threat.art_norm, eps=threat.eps, eps_step=threat.step,
                       max_iter=spec.steps, batch_size=batch_size)


@ATTACKS.register("aa")
def _aa(classifier, threat: ThreatModel, spec: AttackSpec, batch_size: int, seed: int) -> StandardAutoAttack:
    return StandardAutoAttack(classifier, norm=threat.norm, eps=threat.eps, batch_size=batch_size, seed=seed)
