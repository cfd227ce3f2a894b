"""ART evasion attacks of art-reat."""

from art_reat.attacks.pgd import TensorPGD
from art_reat.attacks.rebalanced import REBALANCE_SCHEMES, RebalancedPGD

__all__ = ["REBALANCE_SCHEMES", "RebalancedPGD", "TensorPGD"]
