"""ART evasion attacks of art-reat and the registry of evaluation attacks."""

from art_reat.attacks.adaptive import CWMarginPGD, LogitScaledPGD, cw_margin_loss
from art_reat.attacks.autoattack import StandardAutoAttack
from art_reat.attacks.pgd import TensorPGD
from art_reat.attacks.rebalanced import REBALANCE_SCHEMES, RebalancedPGD
from art_reat.attacks.registry import ATTACKS, AttackSpec, ThreatModel, build_attack, parse_attack

__all__ = ["ATTACKS", "AttackSpec", "CWMarginPGD", "LogitScaledPGD", "REBALANCE_SCHEMES", "RebalancedPGD",
           "StandardAutoAttack", "TensorPGD", "ThreatModel", "build_attack", "cw_margin_loss", "parse_attack"]
