"""Data-parallel training on ``torch.distributed``: what the trainer needs to run under ``torchrun``.

Launch any training command under ``torchrun`` and it runs data-parallel with
no code change::

    torchrun --nproc-per-node 4 -m stnkit.cli.main train --task rts --out runs/rts-ddp
    # two machines, 8 GPUs each (run on both, NODE_RANK 0 and 1):
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER_HOST:29500 --rdzv-id stnkit-rts \\
        -m stnkit.cli.main train --task rts --device cuda --out runs/rts-ddp

:func:`setup_distributed` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``
(set by ``torchrun``), joins the process group (``nccl`` on CUDA, ``gloo`` on
the CPU) and returns a :class:`DistributedContext`; without those variables it
returns the single-process context, whose methods do nothing.

Convention
----------
``batch_size`` is the **global** batch: every rank reads the same shuffled
epoch, takes the same global batch, and trains on its contiguous slice of it
(:meth:`DistributedContext.shard`). Each rank's loss is its summed loss over
the global batch size, times the world size, so that DDP's gradient averaging
gives exactly the gradient of the global batch's mean loss: the weights equal
those of a single-process run with the same ``batch_size`` (up to float
rounding), whatever the number of processes. Metrics are summed over ranks;
rank 0 alone writes files.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext",
    "setup_distributed",
    "environment_world_size",
    "shutdown_distributed",
    "GlooSyncBatchNorm",
    "sync_batch_norm",
]


def environment_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset).

    Examples
    --------
    >>> import os; os.environ.pop("WORLD_SIZE", None) and None
    >>> environment_world_size()
    1
    """
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    return world_size


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run.

    Attributes
    ----------
    world_size : int
        Number of processes (1: not distributed).
    rank : int
        This process's global rank; rank 0 writes the run's files.
    local_rank : int
        Its rank on this machine (picks the CUDA device).
    backend : str or None
        ``"gloo"`` or ``"nccl"``; None when not distributed.

    Examples
    --------
    >>> ctx = DistributedContext()
    >>> ctx.enabled, ctx.is_main
    (False, True)
    >>> x, y = ctx.shard(torch.arange(5), torch.arange(5))
    >>> x.tolist()
    [0, 1, 2, 3, 4]
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes metrics and checkpoints)."""
        return self.rank == 0

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice of each tensor along dim 0.

        Convention: slices as :func:`torch.tensor_split` cuts them (the first
        ``len % world_size`` ranks get one more row); a rank may get none.

        Examples
        --------
        >>> DistributedContext(world_size=2, rank=1).shard(torch.arange(5))[0].tolist()
        [3, 4]
        """
        if not self.enabled:
            return tensors
        return tuple(tensor.tensor_split(self.world_size)[self.rank] for tensor in tensors)

    def sync_batch_norm(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` with its batch norms synchronised across ranks (itself when not distributed).

        See :func:`sync_batch_norm`. Call before :meth:`wrap`.
        """
        if not self.enabled:
            return model
        return sync_batch_norm(model, device)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` (itself when not distributed).

        DDP broadcasts rank 0's weights and buffers at construction, so every
        rank starts from the same model.
        """
        if not self.enabled:
            return model
        device_ids = [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over all ranks (``tensor`` itself when not distributed)."""
        if not self.enabled:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank (no-op when not distributed)."""
        if self.enabled:
            dist.barrier()

    def device_for(self, device: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else ``device``."""
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device


def setup_distributed(device: torch.device | str = "cpu", *, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by the ``torchrun`` environment; a no-op outside one.

    Parameters
    ----------
    device : torch.device or str
        The training device type picks the backend: ``nccl`` for CUDA, ``gloo`` otherwise.
    timeout_s : float
        Collective timeout.

    Returns
    -------
    DistributedContext
        The single-process context when ``WORLD_SIZE`` is unset or 1.

    Raises
    ------
    ValueError
        If ``RANK``/``LOCAL_RANK`` are missing or inconsistent, or the
        process group already exists with another world size.

    Examples
    --------
    >>> setup_distributed("cpu").enabled  # outside torchrun
    False
    """
    world_size = environment_world_size()
    if world_size == 1:
        return DistributedContext()
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ValueError("WORLD_SIZE > 1 but RANK is missing or not an integer: launch with torchrun") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is outside [0, WORLD_SIZE={world_size})")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(
                f"a process group exists with world size {dist.get_world_size()} and rank {dist.get_rank()}, "
                f"but the environment says {world_size} and {rank}"
            )
        return DistributedContext(world_size, rank, local_rank, dist.get_backend())
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown_distributed)
    return DistributedContext(world_size, rank, local_rank, backend)


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """A :class:`~torch.nn.BatchNorm2d` whose training statistics are those of the global batch.

    :class:`torch.nn.SyncBatchNorm` runs on GPUs only; this is its CPU (gloo)
    counterpart. In training mode each rank all-reduces the per-channel count,
    sum and sum of squares of its slice (with the differentiable
    :func:`torch.distributed.nn.functional.all_reduce`, so the gradient flows
    through the shared statistics), normalises with the global mean and
    biased variance and updates the running statistics with the unbiased one,
    exactly as one process would on the whole batch. In eval mode, or outside
    a process group, it is a plain ``BatchNorm2d``; its state dict has the same keys.

    Examples
    --------
    >>> norm = GlooSyncBatchNorm(3)
    >>> norm(torch.randn(4, 3, 5, 5)).shape  # no process group: plain batch norm
    torch.Size([4, 3, 5, 5])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        if input.dim() != 4:
            raise ValueError(f"GlooSyncBatchNorm expects (N, C, H, W) input, got shape {tuple(input.shape)}")
        from torch.distributed.nn.functional import all_reduce

        x = input.float()
        count = torch.full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=torch.float64, device=x.device)
        # Sums in float64: sum-of-squares minus squared mean loses precision in float32.
        stats = torch.cat((count, x.sum(dim=(0, 2, 3)).double(), x.pow(2).sum(dim=(0, 2, 3)).double()))
        stats = all_reduce(stats, op=dist.ReduceOp.SUM)
        total, channels = stats[0], self.num_features
        mean = stats[1 : 1 + channels] / total
        var = (stats[1 + channels :] / total - mean.pow(2)).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = (1, channels, 1, 1)
        out = (x - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def sync_batch_norm(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``model`` by one that uses the global batch's statistics.

    On CUDA this is :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`; on
    the CPU (gloo), :class:`GlooSyncBatchNorm`. Weights, buffers and state-dict
    keys are kept, so checkpoints load into the plain model.

    Examples
    --------
    >>> model = sync_batch_norm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    >>> type(model[1]).__name__
    'GlooSyncBatchNorm'
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d:
            replacement = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                            module.track_running_stats)
            replacement.load_state_dict(module.state_dict())
            replacement.train(module.training)
            return replacement
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    return convert(model)


def shutdown_distributed(timeout_s: float = 60.0) -> None:
    """Leave the process group, if this process is in one, together with the other ranks.

    The ranks meet at a barrier first: a rank that tears its gloo connections down
    while another still uses them can abort it (SIGABRT at exit under torchrun).
    If a rank is gone, the barrier gives up after ``timeout_s`` seconds.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # another rank failed or left: leave anyway
    dist.destroy_process_group()
