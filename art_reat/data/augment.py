"""Batched, per-sample AutoAugment / RandAugment (torchvision.transforms.v2) on the device.

``--augment`` chooses an extra augmentation policy that `DeviceLoader` applies to each uint8
training batch ``[B, C, H, W]`` on the device, BEFORE the random crop and flip:

* ``none`` (default): nothing.
* ``autoaugment``: ``v2.AutoAugment(AutoAugmentPolicy.CIFAR10)``.
* ``randaugment``: ``v2.RandAugment()`` (2 ops, magnitude 9 of 31 bins), as in AT-BSL-style runs.

Called on a batch, the torchvision transforms draw ONE set of operations for the whole batch.
Here every image gets its own draw, as with a per-image data loader: the random choices of the
torchvision transform (sub-policy or operation, whether it is applied, sign of the magnitude) are
drawn per sample from the loader's seeded generator, the batch is grouped by identical
(operation, magnitude) and each group goes through the transform's own operation
(``_apply_image_or_video_transform``, the code the torchvision transform calls) in one batched call.
Every operation acts on each image independently, so this equals applying the transform image by
image with those draws (``tests/test_baselines.py`` checks it), and it is deterministic under the
loader's seed without touching torch's global random state.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from art_reat.errors import UsageError

AUGMENT_POLICIES = ("none", "autoaugment", "randaugment")

# one step of a draw: per sample, (transform id, magnitude) or None (not applied)
Step = List[Optional[Tuple[str, float]]]


class BatchAutoAugment:
    """Per-sample ``autoaugment`` or ``randaugment`` of a uint8 batch ``[B, C, H, W]`` (any device).

    ``policy(x, generator)`` returns a new uint8 tensor of the same shape; the random choices come
    from ``generator`` (a CPU ``torch.Generator``; None: torch's global generator).
    """

    def __init__(self, name: str) -> None:
        from torchvision.transforms import v2

        if name == "autoaugment":
            self.transform = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
        elif name == "randaugment":
            self.transform = v2.RandAugment()
        else:
            raise UsageError(f"invalid augment policy {name!r}: must be one of {', '.join(AUGMENT_POLICIES)}")
        if not hasattr(self.transform, "_apply_image_or_video_transform"):  # pragma: no cover (torchvision API)
            raise UsageError("this torchvision version lacks the v2 auto-augment internals that --augment uses")
        self.name = name
        self._magnitudes: Dict[tuple, Tuple[float, bool]] = {}

    def __repr__(self) -> str:
        return f"BatchAutoAugment({self.name!r})"

    # ----------------------------------------------------------------------------- random draws
    def _magnitude(self, tid: str, index: Optional[int], num_bins: int, height: int, width: int) -> Tuple[float, bool]:
        """(unsigned magnitude, signed) of operation ``tid`` at bin ``index``, cached per image size."""
        key = (tid, index, num_bins, height, width)
        if key not in self._magnitudes:
            fn, signed = self.transform._AUGMENTATION_SPACE[tid]
            values = fn(num_bins, height, width)
            self._magnitudes[key] = (0.0, False) if values is None else (float(values[index]), bool(signed))
        return self._magnitudes[key]

    def sample(self, batch: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> List[Step]:
        """The per-sample operations, one list per sequential step (the transform's distribution)."""
        steps: List[Step] = []
        if self.name == "randaugment":
            t = self.transform
            names = list(t._AUGMENTATION_SPACE)
            for _ in range(t.num_ops):
                op = torch.randint(len(names), (batch,), generator=generator).tolist()
                negative = (torch.rand(batch, generator=generator) <= 0.5).tolist()
                step: Step = []
                for i in range(batch):
                    magnitude, signed = self._magnitude(names[op[i]], t.magnitude, t.num_magnitude_bins, height, width)
                    step.append((names[op[i]], -magnitude if signed and negative[i] else magnitude))
                steps.append(step)
            return steps
        policies = self.transform._policies
        choice = torch.randint(len(policies), (batch,), generator=generator).tolist()
        for k in range(2):
            applied = torch.rand(batch, generator=generator).tolist()
            negative = (torch.rand(batch, generator=generator) <= 0.5).tolist()
            step = []
            for i in range(batch):
                tid, probability, magnitude_idx = policies[choice[i]][k]
                if not applied[i] <= probability:
                    step.append(None)
                    continue
                magnitude, signed = self._magnitude(tid, magnitude_idx, 10, height, width)
                step.append((tid, -magnitude if signed and negative[i] else magnitude))
            steps.append(step)
        return steps

    # ----------------------------------------------------------------------------- application
    def apply_one(self, x: torch.Tensor, tid: str, magnitude: float) -> torch.Tensor:
        t = self.transform
        return t._apply_image_or_video_transform(x, tid, magnitude, interpolation=t.interpolation, fill=t._fill)

    def apply(self, x: torch.Tensor, steps: List[Step]) -> torch.Tensor:
        """Apply drawn ``steps`` to the batch, one batched call per distinct (operation, magnitude)."""
        out = x.clone()
        for step in steps:
            groups: Dict[Tuple[str, float], List[int]] = {}
            for i, op in enumerate(step):
                if op is not None and op[0] != "Identity":
                    groups.setdefault(op, []).append(i)
            for (tid, magnitude), rows in groups.items():
                idx = torch.tensor(rows, device=x.device)
                out[idx] = self.apply_one(out[idx], tid, magnitude)
        return out

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise UsageError(f"--augment needs a uint8 batch [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        return self.apply(x, self.sample(x.shape[0], x.shape[-2], x.shape[-1], generator))


def build_augment_policy(name: str) -> Optional[BatchAutoAugment]:
    """The policy object for ``--augment name``; None for ``none``."""
    if name not in AUGMENT_POLICIES:
        raise UsageError(f"invalid augment policy {name!r}: must be one of {', '.join(AUGMENT_POLICIES)}")
    return None if name == "none" else BatchAutoAugment(name)


__all__ = ["AUGMENT_POLICIES", "BatchAutoAugment", "build_augment_policy"]
