"""ART estimators of art-reat."""

from art_reat.estimators.classifier import LongTailClassifier
from art_reat.estimators.tail import TAILPyTorchClassifier

__all__ = ["LongTailClassifier", "TAILPyTorchClassifier"]
