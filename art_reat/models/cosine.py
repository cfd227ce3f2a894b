"""RoBal's cosine classifier (SPEC section 7): a bias-free head on normalised features.

``z_c = (f / ||f||) . (W_c / (||W_c|| + gamma))``, the "scale-1 cosine" logits: bounded by 1 in
absolute value and invariant to the scale of the features. ``gamma`` > 0 lets a class vector with a
small norm keep a smaller logit (RoBal's "bias" on the weight norm).

At inference RoBal uses ``s * z - tau_p * log(prior)``. :meth:`CosineClassifier.set_inference_adjustment`
stores (s, tau_p, prior) as buffers (so they move with ``.to(device)`` and travel in every
``state_dict`` and checkpoint); the module then returns the adjusted logits in EVAL mode, which is
what ART's ``predict`` / ``loss_gradient`` and every evaluation attack see, and the scale-1 cosine in
TRAIN mode (what the RoBal training loss expects). :meth:`CosineClassifier.cosine` always returns the
scale-1 cosine, whatever the mode.

Usable with every backbone of the registry::

    model = build_model("resnet18", 10)
    model.head = CosineClassifier(model.feature_dim, 10, gamma=0.03125)
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import numpy as np
import torch
from torch import nn

from art_reat.errors import UsageError

PriorLike = Union[Sequence[float], np.ndarray, torch.Tensor]

#: Guard of the feature normalisation: an all-zero feature vector gives all-zero cosines, not NaN.
FEATURE_NORM_EPS = 1e-12


class CosineClassifier(nn.Module):
    """Bias-free cosine head ``[B, in_features] -> [B, num_classes]``.

    :param in_features: feature dimension (``model.feature_dim``).
    :param num_classes: number of classes C.
    :param gamma: added to each class vector's norm (0.03125; RoBal's CIFAR-100 "R" variant: 0.0625).

    Parameter ``weight`` has shape ``[C, in_features]`` (like ``nn.Linear``, no bias). Buffers:
    ``gamma``, and the inference adjustment ``s`` (scale), ``tau_p`` and ``prior`` (a probability
    vector). Without :meth:`set_inference_adjustment` they are s = 1, tau_p = 0, uniform prior, so
    eval mode returns the plain scale-1 cosine too.
    """

    def __init__(self, in_features: int, num_classes: int, gamma: float = 0.03125) -> None:
        super().__init__()
        in_features, num_classes = int(in_features), int(num_classes)
        if in_features < 1:
            raise UsageError(f"cosine classifier needs in_features >= 1, got {in_features}")
        if num_classes < 2:
            raise UsageError(f"cosine classifier needs num_classes >= 2, got {num_classes}")
        if not (math.isfinite(float(gamma)) and float(gamma) >= 0):
            raise UsageError(f"invalid cosine-classifier gamma {gamma!r}: must be a number >= 0")
        self.in_features = in_features
        self.out_features = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.register_buffer("gamma", torch.tensor(float(gamma)))
        self.register_buffer("s", torch.tensor(1.0))
        self.register_buffer("tau_p", torch.tensor(0.0))
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes))

    @property
    def num_classes(self) -> int:
        return self.out_features

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Scale-1 cosine logits ``(f/||f||) . (W_c / (||W_c|| + gamma))``, in train and eval mode."""
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise UsageError(f"cosine classifier expects features of shape (B, {self.in_features}), "
                             f"got {tuple(features.shape)}")
        f = features / features.norm(dim=1, keepdim=True).clamp_min(FEATURE_NORM_EPS)
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.gamma)
        return f @ w.t()

    def adjust(self, cos: torch.Tensor) -> torch.Tensor:
        """RoBal's inference logits ``s * cos - tau_p * log(prior)`` from scale-1 cosine logits."""
        return self.s * cos - self.tau_p * self.prior.log()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(features)
        return cos if self.training else self.adjust(cos)

    def set_inference_adjustment(self, s: float, tau_p: float, prior: PriorLike) -> "CosineClassifier":
        """Eval-mode logits become ``s * cos - tau_p * log(prior)``.

        ``prior`` is the class prior or the per-class training counts N_c (normalised to sum 1).
        """
        s, tau_p = float(s), float(tau_p)
        if not (math.isfinite(s) and s > 0):
            raise UsageError(f"invalid inference scale s {s!r}: must be a number > 0")
        if not math.isfinite(tau_p):
            raise UsageError(f"invalid tau_p {tau_p!r}: must be a finite number")
        p = torch.as_tensor(np.asarray(prior.detach().cpu() if isinstance(prior, torch.Tensor) else prior,
                                       dtype=np.float64))
        if p.dim() != 1 or p.numel() != self.out_features:
            raise UsageError(f"prior must have one value for each of the {self.out_features} classes, "
                             f"got shape {tuple(p.shape)}")
        if not (torch.isfinite(p).all() and (p > 0).all()):
            raise UsageError(f"prior must be finite and > 0 for every class, got {p.tolist()}")
        p = p / p.sum()
        with torch.no_grad():
            self.s.fill_(s)
            self.tau_p.fill_(tau_p)
            self.prior.copy_(p.to(self.prior.dtype))
        return self

    @property
    def inference_adjustment(self) -> Dict[str, object]:
        return {"s": float(self.s), "tau_p": float(self.tau_p), "prior": self.prior.tolist()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, gamma={float(self.gamma):g}, "
                f"s={float(self.s):g}, tau_p={float(self.tau_p):g}")


def attach_cosine_head(model: nn.Module, num_classes: int, gamma: float = 0.03125) -> nn.Module:
    """Replace ``model.head`` (of a ``FeatureModel``) by a fresh :class:`CosineClassifier`, on the
    device and dtype of the old head; returns the model. The optimiser must be built afterwards."""
    if not hasattr(model, "head") or not hasattr(model, "feature_dim"):
        raise UsageError(f"{type(model).__name__} has no replaceable head: "
                         "the cosine classifier needs a FeatureModel")
    ref = next(iter(model.head.parameters()), None) if isinstance(model.head, nn.Module) else None
    head = CosineClassifier(model.feature_dim, num_classes, gamma)
    if ref is not None:
        head = head.to(device=ref.device, dtype=ref.dtype)
    model.head = head
    return model
