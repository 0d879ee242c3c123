"""Sweeps across processes: ``torchrun`` support for ``pflow bench`` and ``pflow sample``.

Samples are named by index (``0 .. n-1``) and their noise is keyed by index
(:mod:`pflow.noise`), so a run can be cut into contiguous shards, one per rank, and put
back together in index order: rank ``r`` of ``W`` solves samples
``[r n // W, (r + 1) n // W)``. Adaptive solvers share their step-size decisions across
ranks (:meth:`pflow.solvers.PFODE.batch_max` all-reduces the error ratio), so every rank
takes the steps one process holding the whole batch would take. Results are gathered on
rank 0, which alone computes metrics and writes files.

Under ``torchrun`` (``WORLD_SIZE`` set) :func:`init` starts the default process group with
``gloo`` on CPU or ``nccl`` on CUDA; a plain ``python`` run is a world of one and touches
nothing in :mod:`torch.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["World", "all_max", "init", "shard"]


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world_size`` solves."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def all_max(value: Tensor, group: Any) -> Tensor:
    """The largest of a 0-d ``value`` over the ranks of ``group`` (float64)."""
    import torch.distributed as dist

    device = value.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    v = value.detach().reshape(1).to(device=device, dtype=torch.float64, copy=True)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    return v[0]


@dataclass
class World:
    """This process's place in a run: ``rank`` of ``size`` ranks, and its ``device``.

    ``group`` is the process group for :func:`pflow.sample`'s ``process_group`` (``None``
    in a world of one)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    group: Any = None
    _owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's sample indices out of ``n``."""
        return shard(n, self.rank, self.size)

    def gather(self, x: Tensor, n: int) -> Tensor | None:
        """All ranks' shards of ``n`` samples, in index order, on rank 0 (on the CPU);
        ``None`` on the other ranks. Every rank must call it."""
        if self.size == 1:
            return x.cpu()
        import torch.distributed as dist

        sizes = [len(shard(n, r, self.size)) for r in range(self.size)]
        width = max(sizes)
        comm_device = self.device if dist.get_backend(self.group) == "nccl" else "cpu"
        padded = torch.zeros(width, *x.shape[1:], dtype=x.dtype, device=comm_device)
        padded[: x.shape[0]] = x.to(comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        if not self.is_main:
            return None
        return torch.cat([p[:k].cpu() for p, k in zip(parts, sizes)])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def max(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        if self.size == 1:
            return value
        return float(all_max(torch.tensor(value, device=self.device), self.group))

    def close(self) -> None:
        """Tear down the process group if :func:`init` started it."""
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False


def init(device: str = "cpu") -> World:
    """This process's :class:`World`: from ``torchrun``'s environment when ``WORLD_SIZE``
    is set (starting the default process group: ``nccl`` for CUDA, ``gloo`` for CPU),
    else a world of one.

    Args:
        device: ``"cpu"``, ``"cuda"`` (rank ``r`` takes ``cuda:LOCAL_RANK``), or an
            explicit device such as ``"cuda:1"`` for a single process.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=torch.device(device))
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        device=dev,
        group=dist.group.WORLD,
        _owns_group=owns,
    )
