"""A data loader that keeps a whole split on the device as one uint8 tensor and does the
standard CIFAR augmentation (random crop with zero padding + horizontal flip) in batch, optionally
preceded by a per-sample AutoAugment / RandAugment policy (`art_reat.data.augment`)."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from art_reat.accel import to_device
from art_reat.data.augment import build_augment_policy
from art_reat.errors import UsageError


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample random crop (zero padding ``pad``, offsets uniform in [0, 2*pad] like
    torchvision's RandomCrop) and horizontal flip with probability 1/2, for a batch
    [B, C, H, W] in one gather. Random numbers come from ``generator`` (on its own device)."""
    b, c, h, w = x.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    di = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(x.device)
    flip = (torch.rand(b, generator=generator, device=gen_device) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = di[:, None] + ar_h  # [B, H]
    cols = dj[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Iterates over (x float32 [B, C, H, W] in [0, 1], y int64 [B]) on ``device``.

    ``x`` is a uint8 numpy array in NHWC (the ``DatasetSplits`` layout), a uint8 torch tensor
    in NCHW, or float NCHW in [0, 1] (numpy or torch, as ART's ``fit`` receives it). Shuffling and augmentation draw from a CPU ``torch.Generator`` seeded with
    ``seed + epoch``. Each full iteration uses the current epoch and then advances it by one;
    ``set_epoch(e)`` chooses the epoch of the next iteration (e.g. when resuming).
    ``augment_policy`` ("none", "autoaugment", "randaugment") is applied per sample to the uint8
    batch before the crop and flip, with the same generator (float inputs are rounded to 8 bits
    first).
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        device="cpu",
        augment: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        pad: int = 4,
        augment_policy: str = "none",
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} is not allowed: use at least 1")
        if pad < 0:
            raise UsageError(f"pad={pad} is not allowed: use pad >= 0")
        self.device = torch.device(device)
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # ART's float NCHW in [0, 1]
        if isinstance(x, np.ndarray):
            if x.dtype != np.uint8 or x.ndim != 4:
                raise UsageError(f"x must be a uint8 NHWC array, got {x.dtype} {x.shape}")
            xt = to_device(x, self.device).permute(0, 3, 1, 2)  # one upload; pinned and non-blocking on CUDA
        elif isinstance(x, torch.Tensor):
            if x.dim() != 4 or not (x.dtype == torch.uint8 or x.is_floating_point()):
                raise UsageError(f"x must be a uint8 or float NCHW tensor, got {x.dtype} {tuple(x.shape)}")
            xt = to_device(x, self.device)
        else:
            raise UsageError(f"x must be a numpy array or a torch tensor, got {type(x).__name__}")
        # uint8 images are kept as bytes (4x less device memory) and scaled per batch
        self.is_uint8 = xt.dtype == torch.uint8
        self.x = xt.contiguous()
        self.y = to_device(np.asarray(y) if not isinstance(y, torch.Tensor) else y, self.device, torch.int64)
        if self.y.shape != (self.x.shape[0],):
            raise UsageError(f"x has {self.x.shape[0]} samples but y has shape {tuple(self.y.shape)}")
        self.batch_size = int(batch_size)
        self.augment, self.shuffle, self.drop_last = augment, shuffle, drop_last
        self.seed, self.pad, self.epoch = int(seed), int(pad), 0
        self.augment_policy = augment_policy
        self._policy = build_augment_policy(augment_policy)

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            if self._policy is not None:
                xb = self.x[idx] if self.is_uint8 else self.x[idx].float().clamp(0, 1).mul(255).round().to(torch.uint8)
                xb = self._policy(xb, gen).float().div_(255.0)
            else:
                xb = self.x[idx].float().div_(255.0) if self.is_uint8 else self.x[idx].float()
            if self.augment:
                xb = random_crop_flip(xb, self.pad, gen)
            yield xb, self.y[idx]
