"""PGD as an ART evasion attack, with a pluggable attack loss and a tensor-native loop.

ART's `ProjectedGradientDescentPyTorch` takes its gradient from `estimator.loss_gradient`, which
calls `backward()` and so also fills every parameter's `.grad`; it also round-trips each batch
through numpy. Here the attack loss is a method of the attack (`attack_loss`), its gradient is
taken with respect to the input only (`torch.autograd.grad`), and `perturb` runs the whole attack
on device tensors so that a trainer can call it per batch. `generate(x, y)` keeps ART's numpy
interface for everyone else.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from art.attacks.evasion import ProjectedGradientDescentPyTorch

from art_reat.accel import to_device
from art_reat.errors import UsageError

RANDOM_STARTS = ("uniform", "one-sided", "none")

#: rows per input-gradient pass on the CPU when `gradient_chunk` is left to "auto" (None). Measured
#: (benchmarks/results/throughput.md): a ResNet-18 PGD step on 128 images costs about 1.45x more as
#: one pass than as four passes of 32 on a 2-core CPU (activations of 32 images stay in cache);
#: on CUDA one large pass is fastest, so "auto" keeps the whole batch there.
CPU_GRADIENT_CHUNK = 32


def auto_gradient_chunk(device) -> int:
    """The "auto" `gradient_chunk` for a device: `CPU_GRADIENT_CHUNK` on the CPU, 0 (whole batch) elsewhere."""
    return CPU_GRADIENT_CHUNK if torch.device(device).type == "cpu" else 0


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the attack: autograd then keeps no activations for
    weight gradients, which makes input-only gradients about 20% cheaper (ResNet-18, CPU)."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class TensorPGD(ProjectedGradientDescentPyTorch):
    """PGD on `attack_loss(logits, y)` (cross-entropy here; subclasses change the loss).

    :param random_start: "uniform" (x + U(-eps, eps), not clipped before the first step, as in the
        REAT code), "one-sided" (x + eps * U[0, 1), RoBal's training attack) or "none".
    :param model_mode: "eval" (BatchNorm statistics frozen during the attack, as in the REAT code)
        or "train".
    :param gradient_chunk: rows per forward/backward pass of the input gradient (0: the whole batch;
        None: "auto", `auto_gradient_chunk` of the estimator's device). Only used while the model is
        in eval mode, where every sample's logits, and so its gradient of the summed attack loss, do
        not depend on the other samples: the adversarial examples are the same (up to float rounding)
        whatever the chunk. In train mode (BatchNorm batch statistics) the whole batch is one pass.
    """

    attack_params = ProjectedGradientDescentPyTorch.attack_params + ["random_start", "model_mode", "gradient_chunk"]
    #: the random starts this class draws (`_random_delta`); subclasses that add one extend it
    random_starts = RANDOM_STARTS
    #: when set (an `art_reat.distributed.BatchShard`), the batch given to `perturb` is the slice
    #: ``[start, stop)`` of a batch of ``total`` samples: the random start is drawn for the whole batch
    #: and sliced, so every sample starts where it would in the whole batch (several processes, or an
    #: evaluation chunk split after an out-of-memory error)
    shard = None

    def __init__(
        self,
        estimator,
        norm: float | str = np.inf,
        eps: float = 8 / 255,
        eps_step: float = 2 / 255,
        max_iter: int = 10,
        targeted: bool = False,
        random_start: str = "uniform",
        model_mode: str = "eval",
        batch_size: int = 128,
        verbose: bool = False,
        gradient_chunk: Optional[int] = None,
    ) -> None:
        self.random_start = random_start
        self.model_mode = model_mode
        self.gradient_chunk = gradient_chunk
        #: the rows of the current batch that `attack_loss` sees (a slice while the gradient is chunked):
        #: attacks with per-sample state (e.g. TRADES's natural distribution) index it with this
        self.rows = slice(None)
        self.norm, self.eps, self.eps_step, self.max_iter = norm, eps, eps_step, max_iter
        # one-line UsageErrors before ART's own checks (which raise bare ValueErrors)
        self._check_own_params()
        super().__init__(
            estimator,
            norm=norm,
            eps=eps,
            eps_step=eps_step,
            max_iter=max_iter,
            targeted=targeted,
            num_random_init=0 if random_start == "none" else 1,
            batch_size=batch_size,
            verbose=verbose,
        )

    # ----------------------------------------------------------------------------- ART conventions
    def _check_params(self) -> None:
        """ART's hook (run by `set_params`): ours, then ART's."""
        self._check_own_params()
        super()._check_params()

    def _check_own_params(self) -> None:
        """Checks of this class's parameters; subclasses extend it (ART's constructor calls
        its own `_check_params` non-virtually, so `__init__` calls this one first)."""
        norm = self.norm
        if norm not in (np.inf, "inf", 2, 2.0, "2"):
            raise UsageError(f"invalid norm {norm!r}: must be inf or 2")
        if not np.isscalar(self.eps) or not float(self.eps) > 0 or (self.linf and float(self.eps) > 1):
            raise UsageError(f"invalid eps {self.eps!r}: must be a number in (0, 1] for linf, > 0 for l2")
        if not np.isscalar(self.eps_step) or not float(self.eps_step) > 0:
            raise UsageError(f"invalid step size {self.eps_step!r}: must be a number > 0")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise UsageError(f"invalid number of attack steps {self.max_iter!r}: must be an integer >= 1")
        if self.random_start not in self.random_starts:
            raise UsageError(f"invalid random start {self.random_start!r}: must be one of "
                             f"{', '.join(self.random_starts)}")
        if self.model_mode not in ("eval", "train"):
            raise UsageError(f"invalid model mode {self.model_mode!r}: must be eval or train")
        chunk = self.gradient_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0):
            raise UsageError(f"invalid gradient chunk {chunk!r}: must be an integer >= 0 (0: the whole batch) "
                             f"or None (auto)")

    @property
    def linf(self) -> bool:
        return self.norm in (np.inf, "inf")

    # --------------------------------------------------------------------------- the attack loss
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits the attack differentiates (subclasses may rescale or shift them)."""
        return self.estimator.model(x)

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar loss that PGD ascends. Summed over the batch: each sample's gradient is its own."""
        return F.cross_entropy(logits, y, reduction="sum")

    @property
    def chunk_rows(self) -> int:
        """Rows per gradient pass now: 0 (the whole batch) in train mode, else `gradient_chunk`."""
        if self.estimator.model.training:
            return 0
        chunk = self.gradient_chunk
        return auto_gradient_chunk(self.estimator.device) if chunk is None else int(chunk)

    def input_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the attack loss with respect to the input only (no parameter gradients),
        in passes of `chunk_rows` rows."""
        chunk = self.chunk_rows
        if not chunk or x.shape[0] <= chunk:
            return self._input_gradient(x, y, slice(None))
        return torch.cat([self._input_gradient(x[i:i + chunk], y[i:i + chunk], slice(i, i + chunk))
                          for i in range(0, x.shape[0], chunk)])

    def _input_gradient(self, x: torch.Tensor, y: torch.Tensor, rows: slice) -> torch.Tensor:
        self.rows = rows
        try:
            with torch.enable_grad():  # callers may evaluate under torch.no_grad()
                x = x.detach().requires_grad_(True)
                loss = self.attack_loss(self.logits(x), y)
                (grad,) = torch.autograd.grad(loss, x)
        finally:
            self.rows = slice(None)
        return -grad if self.targeted else grad

    # ART hook, so that ART's own `_generate_batch` machinery also uses the input-only gradient.
    def _compute_perturbation_pytorch(self, x, y, mask, momentum):  # noqa: D401
        if y.dim() == 2:  # ART hands one-hot targets to this hook
            y = y.argmax(dim=1)
        grad = torch.nan_to_num(self.input_gradient(x, y.long()))
        if mask is not None:
            grad = grad * (mask != 0)
        return self._step_direction(grad)

    def _step_direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.linf:
            return grad.sign()
        flat = grad.flatten(1)
        norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (flat / norms).view_as(grad)

    def _project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        eps = float(self.eps)
        if self.linf:
            return delta.clamp(-eps, eps)
        flat = delta.flatten(1)
        factor = (eps / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return (flat * factor).view_as(delta)

    def batch_random(self, draw, shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
        """``draw(shape, generator=, device=, dtype=)`` (torch.rand / torch.randn) for a batch of
        ``shape``; with `shard` set, drawn for the whole batch and sliced to this part of it."""
        shard = self.shard
        if shard is None or shard.is_whole:
            return draw(tuple(shape), generator=generator, device=device, dtype=dtype)
        if shard.size != shape[0]:
            raise RuntimeError(f"the attack's shard holds {shard.size} samples, the batch {shape[0]}")
        full = draw((shard.total,) + tuple(shape[1:]), generator=generator, device=device, dtype=dtype)
        return full[shard.start:shard.stop]

    def _random_delta(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        eps = float(self.eps)
        if self.random_start == "none":
            return torch.zeros_like(x)
        if self.linf:
            u = self.batch_random(torch.rand, x.shape, generator, x.device, x.dtype)
            return eps * u if self.random_start == "one-sided" else eps * (2 * u - 1)
        # L2: a uniform point of the eps-ball (direction uniform on the sphere, radius eps * U^(1/d))
        d = x[0].numel()
        direction = self.batch_random(torch.randn, x.shape, generator, x.device, x.dtype)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        radius = self.batch_random(torch.rand, x.shape[:1], generator, x.device, x.dtype) ** (1.0 / d)
        return direction * (eps * radius).view(-1, *[1] * (x.dim() - 1))

    # --------------------------------------------------------------------------- tensor-native loop
    def perturb(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Adversarial examples for a batch already on the device. Restores the model's mode."""
        model = self.estimator.model
        was_training = model.training
        model.train(self.model_mode == "train")
        try:
            with frozen_parameters(model):
                return self._pgd_loop(x.detach(), y, generator)
        finally:
            model.train(was_training)

    def _pgd_loop(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        lo, hi = self._clip_bounds()
        x_adv = x + self._random_delta(x, generator)
        step = float(self.eps_step)
        for _ in range(self.max_iter):
            grad = self.input_gradient(x_adv, y)
            x_adv = x_adv.detach() + step * self._step_direction(torch.nan_to_num(grad))
            # for L-inf, clipping to the eps-box and to [lo, hi] commute: the order of the REAT code
            x_adv = (x + self._project_delta(x_adv - x)).clamp(lo, hi)
        return x_adv.detach()

    def _clip_bounds(self) -> tuple[float, float]:
        clip = self.estimator.clip_values
        if clip is None:
            return -math.inf, math.inf
        return float(np.min(clip[0])), float(np.max(clip[1]))

    def generate(self, x: np.ndarray, y: Optional[np.ndarray] = None, **kwargs) -> np.ndarray:
        """ART's numpy interface: batches of `batch_size` through `perturb` on the estimator's device."""
        if kwargs.get("mask") is not None:
            return super().generate(x, y, **kwargs)  # masks are rare: ART's own loop handles them
        device = self.estimator.device
        if y is None:
            if self.targeted:
                raise UsageError("a targeted attack needs target labels y")
            labels = np.argmax(self.estimator.predict(x, batch_size=self.batch_size), axis=1)
        else:
            labels = np.argmax(y, axis=1) if np.ndim(y) == 2 else np.asarray(y)
        out = np.empty_like(x, dtype=np.float32)
        for start in range(0, len(x), self.batch_size):
            xb = to_device(x[start:start + self.batch_size], device, torch.float32)
            yb = to_device(labels[start:start + self.batch_size], device, torch.long)
            out[start:start + self.batch_size] = self.perturb(xb, yb).cpu().numpy()
        return out
