"""Speed paths of training (issue 6): bf16 autocast, channels-last, torch.compile, DDP.

`accelerate(classifier, amp=..., channels_last=..., compile=..., dist=...)` replaces the ART
classifier's model by an `AcceleratedModel`. Everything that calls ``classifier.model`` (the
training attack, the trainers' training loss, TAIL's ``forward_features``) then goes through it:

- ``amp``: the forward pass runs under ``torch.autocast(device.type, dtype=torch.bfloat16)`` and
  its outputs (logits, features) are cast back to float32, so every loss term is computed in
  float32. bf16 has float32's exponent range: no GradScaler is needed. Works on the CPU too.
  Validation and the final test run in float32 (`full_precision`), so reported accuracies do
  not depend on ``--amp``.
- ``channels_last``: parameters and input batches in ``torch.channels_last`` (faster convolutions
  on tensor cores). Checkpoints are unaffected (a state dict loads into either layout).
- ``compile``: ``torch.compile`` of the forward pass (training forward and attack); the original
  module is kept for ``state_dict`` / checkpoints, so checkpoint keys never carry a prefix.
- ``dist`` (a live `art_reat.distributed.DistContext`): the training forward (inside
  `synchronized`) goes through ``DistributedDataParallel``; attacks, validation and evaluation
  use the module directly (they need no gradient synchronisation, and validation runs on rank 0
  only). On CUDA, BatchNorm becomes SyncBatchNorm.

The wrapper looks like the original model: ``state_dict``, ``load_state_dict``,
``(named_)parameters``, ``(named_)buffers`` and every other attribute (``head``, ``feature_dim``,
...) are the original module's.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from art_reat.distributed import DistContext, is_active


class _Forward(nn.Module):
    """``forward(x, features=False)``: the model's logits, or ``(features, logits)``, with the
    input layout and autocast of the speed options; outputs in float32. One module, so that DDP and
    torch.compile wrap both kinds of forward pass."""

    def __init__(self, model: nn.Module, amp: bool, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.amp = bool(amp)
        self.channels_last = bool(channels_last)

    def forward(self, x: torch.Tensor, features: bool = False):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model.forward_features(x) if features else self.model(x)
        if self.amp:  # losses in float32
            out = tuple(t.float() for t in out) if features else out.float()
        return out


class AcceleratedModel(nn.Module):
    """The model as the trainers see it under the speed options (see the module doc)."""

    def __init__(self, module: nn.Module, *, amp: bool = False, channels_last: bool = False, compile: bool = False,
                 dist: Optional[DistContext] = None) -> None:
        super().__init__()
        self.module = module
        self.amp, self.channels_last, self.compiled = bool(amp), bool(channels_last), bool(compile)
        adapter = _Forward(module, amp, channels_last)
        plain = torch.compile(adapter) if compile else adapter
        synced = None
        if is_active(dist):
            from torch.nn.parallel import DistributedDataParallel

            synced = DistributedDataParallel(adapter, **ddp_options(dist.device))
            if compile:
                synced = torch.compile(synced)
        # not registered as submodules: parameters, buffers and state dict stay the original module's
        object.__setattr__(self, "_adapter", adapter)
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "_synced", synced)
        object.__setattr__(self, "_sync_depth", 0)

    # ----------------------------------------------------------------------------- forward passes
    def _route(self):
        return self._synced if (self._sync_depth and self._synced is not None) else self._plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._route()(x)

    def forward_features(self, x: torch.Tensor):
        return self._route()(x, features=True)

    @property
    def distributed(self) -> bool:
        return self._synced is not None

    @contextmanager
    def synchronized(self) -> Iterator[None]:
        """Forward passes inside go through DDP (gradients all-reduced in the next backward)."""
        object.__setattr__(self, "_sync_depth", self._sync_depth + 1)
        try:
            yield
        finally:
            object.__setattr__(self, "_sync_depth", self._sync_depth - 1)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """Forward passes inside run in float32 (no autocast), e.g. validation and the final test."""
        adapter = self._adapter
        previous = adapter.amp
        adapter.amp = False
        try:
            yield
        finally:
            adapter.amp = previous

    def train(self, mode: bool = True) -> "AcceleratedModel":
        super().train(mode)  # the original module's tree
        # the wrappers' own flags (a compiled module's flag is its original's): no second recursion
        self._adapter.training = mode
        if self._synced is not None:
            self._synced.training = mode
        return self

    # ----------------------------------------------------------------------------- the original module's
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def parameters(self, recurse: bool = True):
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def buffers(self, recurse: bool = True):
        return self.module.buffers(recurse)

    def named_buffers(self, *args, **kwargs):
        return self.module.named_buffers(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def ddp_options(device: torch.device) -> dict:
    """DistributedDataParallel's keyword arguments for a rank's device."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device_ids": [device.index], "output_device": device.index}
    return {}


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm on CUDA (NCCL); unchanged elsewhere (gloo: per-rank statistics).
    Parameters and buffers stay the same objects, so an optimiser built before keeps working."""
    if torch.device(device).type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def accelerate(classifier, *, amp: bool = False, channels_last: bool = False, compile: bool = False,
               dist: Optional[DistContext] = None) -> Optional[AcceleratedModel]:
    """Install the speed options on an ART classifier (see the module doc); None when none is on.
    Call it once the trainer is built (e.g. AWP copies the plain model for its proxy)."""
    if not (amp or channels_last or compile or is_active(dist)):
        return None
    model = classifier.model
    if isinstance(model, AcceleratedModel):
        raise RuntimeError("the classifier's model is accelerated already")
    if is_active(dist):
        converted = sync_batchnorm(model, dist.device)
        if converted is not model:
            raise RuntimeError("SyncBatchNorm conversion replaced the model itself (a bare BatchNorm model?)")
    if channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimiser keeps the same parameters
    wrapper = AcceleratedModel(model, amp=amp, channels_last=channels_last, compile=compile, dist=dist)
    classifier._model._model = wrapper  # ART's PyTorchClassifier.model is `_model._model`
    if is_active(dist) and hasattr(classifier, "dist"):
        classifier.dist = dist  # e.g. TAIL on the all-gathered batch
    return wrapper


def release_distributed(model: nn.Module) -> None:
    """Drop the DDP wrapper of ``model`` (training is over, or stopped). DDP's reducer holds the
    process group; freed here, before the group is destroyed, rather than by the garbage collector
    at interpreter exit (a traceback's reference cycle can keep it that long), where tearing down
    gloo's threads aborts the process (SIGABRT)."""
    if isinstance(model, AcceleratedModel):
        object.__setattr__(model, "_synced", None)


def synchronized(model: nn.Module):
    """Context in which ``model``'s forward passes synchronise gradients (DDP); else a no-op."""
    return model.synchronized() if isinstance(model, AcceleratedModel) else nullcontext()


def full_precision(model: nn.Module):
    """Context in which ``model`` runs without autocast; a no-op for a plain module."""
    return model.full_precision() if isinstance(model, AcceleratedModel) else nullcontext()


def to_device(data, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host -> device copy of a numpy array or tensor: from pinned memory and non-blocking when the
    target is an accelerator (the copy overlaps with work already queued); a plain ``.to`` on the CPU."""
    device = torch.device(device)
    tensor = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else torch.as_tensor(data)
    if device.type == "cpu" or tensor.device.type != "cpu":
        return tensor.to(device=device, dtype=dtype)
    if torch.cuda.is_available():
        tensor = tensor.pin_memory()
    tensor = tensor.to(device, non_blocking=True)
    return tensor if dtype is None else tensor.to(dtype)


__all__ = ["AcceleratedModel", "accelerate", "ddp_options", "full_precision", "sync_batchnorm", "synchronized",
           "to_device"]
