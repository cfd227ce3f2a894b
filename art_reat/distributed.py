"""Several processes (GPUs, nodes) with torchrun: PyTorch's own `torch.distributed` and DDP.

``torchrun --nproc-per-node K --no-python art-reat train ...`` starts K processes with the
environment variables RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); `setup`
reads them, initialises the default process group (NCCL with device ``cuda:LOCAL_RANK`` on CUDA,
gloo on the CPU) and returns a `DistContext`; without them (or with WORLD_SIZE 1) training is the
ordinary single process.

How a distributed run equals the single-process run (the global batch is ``--batch-size``):

- Data: every rank iterates the SAME global loader (same seed, so the same permutation and the
  same augmentation randomness for the whole global batch) and keeps its contiguous slice
  (`ShardedLoader`); the union of the ranks' slices is the single-process batch. A global batch of
  N samples is split with ``tensor_split`` (sizes differ by at most one; the first N mod K ranks
  take one more). Each rank's loss is scaled by ``K * n_rank / N`` before the backward pass, so
  that DDP's gradient average is the gradient of the global-batch mean (exact for losses that are
  means over the batch plus terms computed on the whole batch, such as TAIL). A last batch with
  fewer samples than ranks is skipped by every rank (at most K - 1 samples per epoch).
- The training attack's random start is drawn for the whole global batch and sliced
  (`BatchShard` on the attack), so each sample starts where it would in one process.
- TAIL is computed on the all-gathered global batch (``torch.distributed.nn.functional.all_gather``
  keeps the gradient), so its value is the single-process one on every rank.
- RBL prediction counts and the epoch's metric sums are all-reduced (sums and counts).
- MLflow logging, validation, checkpoints and the final evaluation happen on rank 0 only.
- BatchNorm: on CUDA the model's BatchNorm layers become SyncBatchNorm (statistics of the global
  batch). On the CPU (gloo) they stay plain BatchNorm: each rank normalises its shard with its own
  batch statistics and DDP broadcasts rank 0's running statistics at every training forward, so a
  model with BatchNorm is not bitwise the single-process one there.

Ranks agree once per batch (one tiny all-reduce) on a stop request (SIGINT / SIGTERM reach the
ranks at different times) and on a non-finite loss, so that every rank stops at the same batch
and none waits forever in a collective. At the end, and after such an agreed stop, all ranks meet at a
barrier before the process group is destroyed (`end`); after an error on one rank only the group is
destroyed without a barrier (torchrun stops the other ranks).
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from art_reat.errors import UsageError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistContext:
    """The process group this process belongs to (`setup` creates it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owned: bool = True  # this package initialised the process group (and destroys it)
    #: set when the ranks agreed to stop at the same point (a stop request, a non-finite loss on any
    #: rank): every rank is alive and raising, so they can still meet at a barrier before tearing down
    stopped_together: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


@dataclass(frozen=True)
class BatchShard:
    """This rank's slice ``[start, stop)`` of a global batch of ``total`` samples; ``sizes`` are the
    slice sizes of all ranks (empty when unknown, e.g. a slice that is not a rank's)."""

    start: int
    stop: int
    total: int
    sizes: Tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.stop == self.total


def torchrun_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun's environment; None outside torchrun or with
    one process. Inconsistent values are a `UsageError`."""
    environ = os.environ if environ is None else environ
    if not all(name in environ for name in TORCHRUN_VARIABLES):
        return None
    try:
        rank, world, local = (int(environ[name]) for name in TORCHRUN_VARIABLES)
    except ValueError:
        shown = ", ".join(f"{n}={environ[n]!r}" for n in TORCHRUN_VARIABLES)
        raise UsageError(f"invalid torchrun environment ({shown}): RANK, WORLD_SIZE and LOCAL_RANK must be integers")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return None if world == 1 else (rank, world, local)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(requested: str, local_rank: int, cuda_available: bool) -> torch.device:
    """The device of a rank: ``cuda:LOCAL_RANK`` when CUDA is used (``auto`` with CUDA, or
    ``cuda``), else the CPU. ``cuda:N`` is refused: under torchrun the local rank picks the GPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda:"):
        raise UsageError(f"invalid device {requested!r} under torchrun: each process uses cuda:LOCAL_RANK; "
                         f"give --device auto or cuda (or set CUDA_VISIBLE_DEVICES)")
    if requested == "cuda" and not cuda_available:
        raise UsageError("invalid device 'cuda': CUDA is not available on this machine (use auto or cpu)")
    if requested in ("auto", "cuda") and cuda_available:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str = "auto", environ: Optional[Mapping[str, str]] = None,
          timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> Optional[DistContext]:
    """Initialise the default process group when running under torchrun with several processes;
    None otherwise. A process group that already exists is used as it is (and not destroyed)."""
    found = torchrun_env(environ)
    if found is None:
        return None
    import torch.distributed as dist

    rank, world, local = found
    device = rank_device(requested_device, local, torch.cuda.is_available())
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise UsageError(f"the existing process group (rank {dist.get_rank()} of {dist.get_world_size()}) does "
                             f"not match torchrun's environment (rank {rank} of {world})")
        return DistContext(rank, world, local, device, dist.get_backend(), owned=False)
    kwargs = {}
    if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = device  # eager NCCL initialisation on this rank's GPU (torch >= 2.3)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout,
                            **kwargs)
    return DistContext(rank, world, local, device, backend, owned=True)


def finish(ctx: Optional[DistContext]) -> None:
    """Normal end: every rank meets at a barrier, then the process group is destroyed."""
    if ctx is None:
        return
    ctx.barrier()
    abort(ctx)


def end(ctx: Optional[DistContext]) -> None:
    """End after training stopped, normally or not: a barrier first when every rank is known to be
    alive and ending (`DistContext.stopped_together`), else straight to `abort`.

    Without the barrier a rank that stopped early closes its connections while the others are still
    writing the checkpoint and marking the run; gloo then sees the peer vanish under a live process
    group and aborts the process (SIGABRT). After an error on one rank only there is no barrier: the
    others may never reach it (torchrun stops them)."""
    if ctx is None:
        return
    if ctx.stopped_together:
        try:
            ctx.barrier()
        except Exception:  # a peer died after all: nothing left to wait for
            pass
    abort(ctx)


def abort(ctx: Optional[DistContext]) -> None:
    """End after an error (or after `finish`'s barrier): destroy the process group, no barrier."""
    if ctx is None or not ctx.owned:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()  # unreachable DDP wrappers and their reducers go before the group they hold
        try:
            dist.destroy_process_group()
        except Exception:  # a peer that died already: nothing left to tear down cleanly
            pass


def is_active(ctx: Optional[DistContext]) -> bool:
    """True when ``ctx`` has a live process group (collectives are possible)."""
    if ctx is None:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum_(tensor: torch.Tensor, ctx: Optional[DistContext]) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a no-op with one process); returns it."""
    if is_active(ctx):
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_max(values: Sequence, ctx: Optional[DistContext], device: torch.device) -> List[int]:
    """Element-wise maximum of small integer flags (ints or 0-d tensors on ``device``) over the ranks:
    one all-reduce and one host sync (no host-to-device copy)."""
    flags = torch.stack([v.reshape(()).to(torch.int64) if isinstance(v, torch.Tensor)
                         else torch.full((), int(v), dtype=torch.int64, device=device) for v in values])
    if is_active(ctx):
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [int(v) for v in flags.tolist()]


def gather_batch(tensor: torch.Tensor, shard: Optional[BatchShard], ctx: Optional[DistContext]) -> torch.Tensor:
    """The global batch from every rank's slice (in rank order), differentiable for float tensors:
    the gradient of each rank's slice is the sum of the gradients that all ranks send back.
    Uneven slices (``shard.sizes``) are padded to the largest for the collective and trimmed."""
    if not is_active(ctx) or shard is None:
        return tensor
    import torch.distributed as dist

    sizes = shard.sizes or (tensor.shape[0],) * ctx.world_size
    if tensor.shape[0] != sizes[ctx.rank]:
        raise RuntimeError(f"rank {ctx.rank} holds {tensor.shape[0]} samples, its shard says {sizes[ctx.rank]}")
    largest = max(sizes)
    padded = tensor
    if tensor.shape[0] < largest:
        pad = tensor.new_zeros((largest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    if tensor.is_floating_point() and tensor.requires_grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # newer torch points to a private replacement; this one is public
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


# ----------------------------------------------------------------------------- data


def shard_sizes(total: int, world_size: int) -> Tuple[int, ...]:
    """Sizes of ``tensor_split`` of ``total`` samples over ``world_size`` ranks."""
    base, extra = divmod(int(total), int(world_size))
    return tuple(base + (1 if r < extra else 0) for r in range(world_size))


def shard_of(total: int, world_size: int, rank: int) -> BatchShard:
    sizes = shard_sizes(total, world_size)
    start = sum(sizes[:rank])
    return BatchShard(start, start + sizes[rank], int(total), sizes)


class ShardedLoader:
    """Yields this rank's contiguous slice of every global batch of ``loader`` (see the module doc).

    ``current_shard`` is the `BatchShard` of the batch last yielded. A global batch smaller than
    the number of ranks (only possible for the last one) is skipped on every rank.
    """

    def __init__(self, loader, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise UsageError(f"invalid rank {rank} for {world_size} processes")
        self.loader = loader
        self.rank, self.world_size = int(rank), int(world_size)
        self.current_shard: Optional[BatchShard] = None

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def _last_batch_skipped(self) -> bool:
        n = getattr(self.loader, "num_samples", None)
        b = getattr(self.loader, "batch_size", None)
        if n is None or b is None or getattr(self.loader, "drop_last", False) or len(self.loader) == 0:
            return False
        last = n - (len(self.loader) - 1) * b
        return last < self.world_size

    def __len__(self) -> int:
        return len(self.loader) - (1 if self._last_batch_skipped() else 0)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, y in self.loader:
                total = int(y.shape[0])
                if total < self.world_size:
                    continue
                shard = shard_of(total, self.world_size, self.rank)
                self.current_shard = shard
                yield x[shard.start:shard.stop], y[shard.start:shard.stop]
        finally:
            self.current_shard = None

    def __getattr__(self, name: str):  # num_samples, batch_size, ... of the global loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


__all__ = ["BatchShard", "DistContext", "ShardedLoader", "abort", "agree_max", "all_reduce_sum_", "backend_for",
           "end", "finish", "gather_batch", "is_active", "rank_device", "setup", "shard_of", "shard_sizes", "torchrun_env"]
