"""REAT's two ingredients (SPEC sections 4 and 5), as plain tensor functions.

* RBL: class weights for the attack loss from the effective number of the
  adversarial examples predicted per class last epoch (:func:`rbl_class_weights`),
  plus the Table 2 true-label weighting baselines (:func:`attack_class_weights`)
  and the BRW logit shift (:func:`brw_logit_shift`).
* TAIL: the tail-sample-mining feature regulariser (:func:`tail_regularizer`), in
  the paper's form (Eq. 3 / Algorithm 1) and in the released code's form (the
  default), both vectorised over the batch.

Class indices are 0-based everywhere.
"""

from __future__ import annotations

import math
import operator
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from art_reat.errors import UsageError

__all__ = [
    "ATTACK_WEIGHT_SCHEMES",
    "TAIL_MODES",
    "attack_class_weights",
    "brw_logit_shift",
    "rbl_class_weights",
    "tail_class_weights",
    "tail_regularizer",
    "tail_regularizer_core",
]

#: Names accepted by :func:`attack_class_weights` ("reference" is an alias of "rbl").
ATTACK_WEIGHT_SCHEMES = ("none", "rw", "rws", "enr", "rbl", "reference")

#: Names accepted by :func:`tail_regularizer`.
TAIL_MODES = ("reference", "paper")

#: The released code's guard in ``w = 1 / (E + 1e-5)``.
RBL_EPS = 1e-5

Counts = Union[torch.Tensor, Sequence[float], Sequence[int]]
DeviceLike = Optional[Union[str, torch.device]]


# --------------------------------------------------------------------------- helpers


def _as_counts(
    values: Counts,
    name: str,
    *,
    min_value: float,
    integer: bool,
    length: Optional[int] = None,
) -> torch.Tensor:
    """Validate a 1-D vector of per-class counts and return it as a float64 CPU tensor."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise UsageError(f"{name} has dtype {values.dtype}: expected real per-class counts")
        t = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(
                f"{name}={values!r} is not a sequence of numbers: expected one count per class"
            ) from None
    if t.dim() != 1 or t.numel() == 0:
        raise UsageError(
            f"{name} has shape {tuple(t.shape)}: expected a non-empty 1-D vector (one count per class)"
        )
    if length is not None and t.numel() != length:
        raise UsageError(
            f"{name} has {t.numel()} entries: expected {length}, one per class as in train_counts"
        )
    if not bool(torch.isfinite(t).all()):
        raise UsageError(f"{name} contains a non-finite value: counts must be finite numbers")
    bad = t < min_value
    if bool(bad.any()):
        c = int(torch.nonzero(bad)[0, 0])
        raise UsageError(
            f"{name}[{c}]={t[c].item():g} is invalid: counts must be >= {min_value:g}"
        )
    if integer:
        frac = t != torch.round(t)
        if bool(frac.any()):
            c = int(torch.nonzero(frac)[0, 0])
            raise UsageError(f"{name}[{c}]={t[c].item():g} is not a whole number: counts are integers")
    return t


def _normalise_to_c(w: torch.Tensor) -> torch.Tensor:
    """``w / sum(w) * C`` in the tensor's own dtype."""
    return w / w.sum() * w.numel()


# --------------------------------------------------------------------------- RBL


def rbl_class_weights(
    train_counts: Counts,
    adv_pred_counts: Counts,
    *,
    device: DeviceLike = None,
) -> torch.Tensor:
    """RBL class weights (SPEC section 4, Eq. 1) with the released code's arithmetic.

    ``beta_c = (N_c - 1) / N_c``, ``E_c = (1 - beta_c ** n_c) / (1 - beta_c)``,
    ``w = 1 / (E + 1e-5)``, ``w = w / sum(w) * C``, every step in float32.

    Args:
        train_counts: N_c, the number of training images per class (integers >= 1).
        adv_pred_counts: n_c, the number of last epoch's adversarial examples the
            model predicted as class c (integers >= 0). Before the first epoch pass
            ``train_counts`` (the SPEC's n_c = N_c).
        device: where the returned tensor lives (CPU by default).

    Returns:
        A float32 tensor of length C that sums to C (up to float32 rounding).

    Edge cases:
        * ``n_c = 0`` gives ``E_c = 0`` and the raw weight ``1 / 1e-5 = 1e5``: huge but
          finite. After normalisation such classes take almost all of the mass C
          (shared equally between the classes with n_c = 0), exactly as in the
          released code.
        * ``N_c = 1`` gives ``beta_c = 0``, ``1 - beta_c = 1`` and ``E_c = 1 - 0 ** n_c``,
          i.e. 1 if n_c > 0 and 0 if n_c = 0 (``0 ** 0 = 1`` in torch), so no NaN.
    """
    n_train = _as_counts(train_counts, "train_counts", min_value=1, integer=True)
    n_adv = _as_counts(
        adv_pred_counts, "adv_pred_counts", min_value=0, integer=True, length=n_train.numel()
    )
    big_n = n_train.to(torch.float32)
    small_n = n_adv.to(torch.float32)
    beta = (big_n - 1.0) / big_n
    effective = (1.0 - torch.pow(beta, small_n)) / (1.0 - beta)
    w = 1.0 / (effective + RBL_EPS)
    w = _normalise_to_c(w)
    return w.to(device) if device is not None else w


def attack_class_weights(
    scheme: str,
    train_counts: Counts,
    adv_pred_counts: Optional[Counts] = None,
    *,
    device: DeviceLike = None,
) -> torch.Tensor:
    """True-label class weights for the attack loss (SPEC section 4, Table 2).

    Schemes (all normalised to sum C, returned as float32):

    * ``"none"``: all ones.
    * ``"rw"``: ``1 / N_c``.
    * ``"rws"``: ``sqrt(1 / N_c)`` (the "smoothed" re-weighting).
    * ``"enr"``: Cui et al.'s class-balanced weights over the TRAINING counts with one
      global ``beta = (sum N - 1) / sum N``: ``(1 - beta) / (1 - beta ** N_c)``.
    * ``"rbl"`` / ``"reference"``: :func:`rbl_class_weights` with ``adv_pred_counts``
      (``train_counts`` when it is None, i.e. the first epoch).

    ``rw``, ``rws`` and ``enr`` are computed in float64 and rounded to float32 once;
    ``rbl`` follows the released code's float32 arithmetic. ``adv_pred_counts`` is
    only used by ``rbl``.
    """
    if not isinstance(scheme, str) or scheme.lower() not in ATTACK_WEIGHT_SCHEMES:
        raise UsageError(
            f"unknown attack weighting scheme {scheme!r}: choose one of "
            f"{', '.join(ATTACK_WEIGHT_SCHEMES)}"
        )
    scheme = scheme.lower()
    if scheme in ("rbl", "reference"):
        adv = train_counts if adv_pred_counts is None else adv_pred_counts
        return rbl_class_weights(train_counts, adv, device=device)

    n = _as_counts(train_counts, "train_counts", min_value=1, integer=True)
    if scheme == "none":
        w = torch.ones_like(n)
    elif scheme == "rw":
        w = 1.0 / n
    elif scheme == "rws":
        w = torch.sqrt(1.0 / n)
    else:  # "enr"
        total = n.sum()
        beta = (total - 1.0) / total
        w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    w = _normalise_to_c(w).to(torch.float32)
    return w.to(device) if device is not None else w


def brw_logit_shift(train_counts: Counts, *, device: DeviceLike = None) -> torch.Tensor:
    """The BRW / balanced-softmax logit shift ``log N_c`` as a float32 tensor of length C.

    Add it to the logits (``CE(z + log N_c, y)``). Counts must be > 0; they need not be
    integers (only ratios matter for a softmax).
    """
    n = _as_counts(train_counts, "train_counts", min_value=0, integer=False)
    if bool((n == 0).any()):
        c = int(torch.nonzero(n == 0)[0, 0])
        raise UsageError(f"train_counts[{c}]=0 is invalid: log N_c needs counts > 0")
    shift = torch.log(n).to(torch.float32)
    return shift.to(device) if device is not None else shift


# --------------------------------------------------------------------------- TAIL


def _tail_mask(
    tail_classes: Optional[Iterable[int]], num_classes: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask over the classes marking the tail ones."""
    if tail_classes is None:
        from art_reat.data.longtail import class_groups  # lazy: written alongside this module

        tail_classes = class_groups(num_classes, "reference")["tail"]
    if isinstance(tail_classes, torch.Tensor):
        tail_classes = tail_classes.detach().cpu().reshape(-1).tolist()
    try:
        tail_list = list(tail_classes)
    except TypeError:
        raise UsageError(
            f"tail_classes={tail_classes!r} is not a list of class indices"
        ) from None
    mask = torch.zeros(num_classes, dtype=torch.bool)
    for c in tail_list:
        try:
            if isinstance(c, bool):
                raise TypeError
            c = operator.index(c)
        except TypeError:
            raise UsageError(
                f"tail_classes contains {c!r}: expected integer class indices"
            ) from None
        if not 0 <= c < num_classes:
            raise UsageError(
                f"tail_classes contains {c}: class indices must be in 0..{num_classes - 1}"
            )
        mask[c] = True
    return mask.to(device)


def tail_regularizer(
    features: torch.Tensor,
    labels: torch.Tensor,
    train_counts: Counts,
    mode: str = "reference",
    tail_classes: Optional[Iterable[int]] = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """TAIL, the tail-sample-mining feature regulariser (SPEC section 5).

    ``p = softmax(features, dim=1)`` over the K feature dimensions,
    ``omega_c = sqrt(sum_j N_j / N_c)``, ``W_ij = omega_{y_i} + omega_{y_j}``,
    ``s_ij = -1 if y_i == y_j else +1``, S = number of tail samples in the batch.

    * ``mode="paper"`` (Eq. 3, Algorithm 1):
      ``TAIL = -(1 / (B S)) sum_{i in tail} sum_j s_ij W_ij KL(p_j || p_i)``, with the
      gradient flowing through both arguments of every KL.
    * ``mode="reference"`` (the released code, default):
      ``TAIL = (1/S) sum_{i in tail} KLbar_i c_i``, where
      ``KLbar_i = (1/(B K)) sum_j sum_k p_ik (log p_ik - log q_jk)`` is what
      ``F.kl_div(log q, p_i.expand(B, K), reduction="mean")`` returns (the anchor p_i
      is detached, q_j = softmax(f_j) carries the gradient) and
      ``c_i = (1/B) sum_j s_ij W_ij`` (a constant).

    Both forms are vectorised: no Python loop over the batch. The paper form builds
    a (S x B) matrix of label-only coefficients and one (S x B) @ (B x K) product,
    so its memory is O(S*B + B*K); the reference form is O(B*K).

    Args:
        features: (B, K) penultimate features of the adversarial batch.
        labels: (B,) integer class labels in 0..C-1.
        train_counts: N_c per class (length C, > 0); only ratios matter.
        mode: ``"reference"`` or ``"paper"``.
        tail_classes: 0-based tail class indices; None means
            ``art_reat.data.longtail.class_groups(C, "reference")["tail"]``.
        weight: multiplies the result (lambda in ``L = L_lt + lambda * TAIL``).

    Returns:
        ``weight * TAIL`` as a 0-d tensor on ``features``' device and dtype; an exact
        zero, still attached to the graph of ``features``, when the batch holds no
        tail sample.
    """
    if not isinstance(mode, str) or mode not in TAIL_MODES:
        raise UsageError(f"unknown TAIL mode {mode!r}: choose one of {', '.join(TAIL_MODES)}")
    if not isinstance(features, torch.Tensor):
        raise UsageError(f"features is a {type(features).__name__}: expected a (B, K) torch.Tensor")
    if features.dim() != 2:
        raise UsageError(
            f"features has shape {tuple(features.shape)}: expected 2-D (batch, feature_dim)"
        )
    if not features.is_floating_point():
        raise UsageError(f"features has dtype {features.dtype}: expected a floating-point tensor")
    if features.shape[1] == 0:
        raise UsageError("features has 0 feature dimensions: expected K >= 1")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UsageError(f"weight={weight!r} is invalid: expected a finite number")

    counts = _as_counts(train_counts, "train_counts", min_value=0, integer=False)
    if bool((counts == 0).any()):
        c = int(torch.nonzero(counts == 0)[0, 0])
        raise UsageError(f"train_counts[{c}]=0 is invalid: omega_c = sqrt(sum N / N_c) needs N_c > 0")
    num_classes = counts.numel()

    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(f"labels={labels!r} is not a vector of class indices") from None
    if labels.dim() != 1:
        raise UsageError(f"labels has shape {tuple(labels.shape)}: expected 1-D (batch,)")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise UsageError(f"labels has dtype {labels.dtype}: expected integer class indices")
    if labels.shape[0] != features.shape[0]:
        raise UsageError(
            f"labels has {labels.shape[0]} entries but features has {features.shape[0]} rows: "
            "expected one label per feature vector"
        )
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise UsageError(
                f"labels contain {bad}: class indices must be in 0..{num_classes - 1} "
                f"(C = len(train_counts) = {num_classes})"
            )

    device = features.device
    omega_c = torch.sqrt(counts.sum() / counts).to(device)  # (C,)
    tail_mask = _tail_mask(tail_classes, num_classes, device)  # (C,) bool
    return tail_regularizer_core(features, labels.to(device=device, dtype=torch.long), omega_c, tail_mask,
                                 mode, weight)


def tail_class_weights(train_counts: Counts) -> torch.Tensor:
    """omega_c = sqrt(sum_j N_j / N_c) (float64), TAIL's per-class weight."""
    counts = _as_counts(train_counts, "train_counts", min_value=0, integer=False)
    return torch.sqrt(counts.sum() / counts)


def tail_regularizer_core(features: torch.Tensor, labels: torch.Tensor, omega_c: torch.Tensor,
                          tail_mask: torch.Tensor, mode: str = "reference", weight: float = 1.0) -> torch.Tensor:
    """`tail_regularizer` without input checks, for the training hot path.

    `omega_c` (C,) and `tail_mask` (C,) bool are precomputed on the device of `features`. The
    tail samples are selected by a mask, not by indexing, so no value is read back to the host
    (no device synchronisation per batch). Every row is computed and the non-tail rows are masked
    out: O(B^2 K) flops, trivial next to the network.
    """
    out_dtype = features.dtype
    # Half precision: compute in float32 for stable log-softmax / products.
    work_dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    f = features.to(work_dtype)
    batch, k_dim = f.shape
    is_tail = tail_mask[labels].to(work_dtype)  # (B,)
    num_tail = is_tail.sum().clamp_min(1.0)  # S (a tensor; the result is exactly 0 when S = 0)

    omega = omega_c.to(work_dtype)[labels]  # (B,)
    # a_ij = s_ij * W_ij for all i, j: label-only constants, (B, B).
    sign = 1.0 - 2.0 * (labels[:, None] == labels[None, :]).to(work_dtype)
    coef = sign * (omega[:, None] + omega[None, :])

    log_p = F.log_softmax(f, dim=1)  # (B, K)
    p = log_p.exp()

    if mode == "paper":
        # KL(p_j || p_i) = sum_k p_jk log p_jk - sum_k p_jk log p_ik
        neg_entropy = (p * log_p).sum(dim=1)  # (B,)
        # sum_j a_ij KL_ji = sum_j a_ij negH_j - sum_k (sum_j a_ij p_jk) log p_ik
        weighted = coef @ neg_entropy - ((coef @ p) * log_p).sum(dim=1)  # (B,)
        tail_value = -(is_tail * weighted).sum() / (batch * num_tail)
    else:
        # KLbar_i = (1/(B K)) sum_j sum_k p_ik (log p_ik - log q_jk), p_i detached
        #         = (1/K) [sum_k p_ik log p_ik - sum_k p_ik * mean_j log q_jk]
        log_anchor = log_p.detach()
        anchor = p.detach()
        mean_log_q = log_p.mean(dim=0)  # (K,), carries the gradient
        kl_bar = ((anchor * log_anchor).sum(dim=1) - anchor @ mean_log_q) / k_dim  # (B,)
        c = coef.sum(dim=1) / batch  # (B,)
        tail_value = (is_tail * kl_bar * c).sum() / num_tail

    return (tail_value * weight).to(out_dtype)
