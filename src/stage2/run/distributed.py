"""torchrun / DDP plumbing: process-group setup, sharded sampling, and exact gathering."""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from stage2.run.device import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None = None  # the process group's, when launched by torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (even as its only process, so that a
    one-GPU `torchrun` exercises the same NCCL path as eight); a plain single process otherwise.

    NCCL on CUDA, gloo on CPU. `device` overrides the automatic choice ("cpu", "cuda", "cuda:N"; see
    stage2.run.device.pick_device).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank if world_size > 1 else None)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if "LOCAL_RANK" in os.environ:  # set by torchrun
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
            # One process group for the whole process: `--variant both` trains two models in it.
            atexit.register(cleanup_distributed)
    return DistInfo(rank=rank, world_size=world_size, device=dev, backend=backend)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (so all ranks stop together)."""
    return broadcast_flags(flag, device=device)[0]


def broadcast_flags(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag True on every rank when any rank says True; one collective for all of them."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), which each rank updates on its own shard."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def gather_objects(items: list) -> list:
    """The concatenation of every rank's `items` (small Python lists), on every rank."""
    if not dist.is_initialized():
        return list(items)
    gathered: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def gather_by_index(indices: torch.Tensor, values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect per-sample rows from all ranks into dataset order, dropping the sampler's padding.

    `indices` [k] are dataset indices and `values` [k, ...] their rows on this rank. Returns
    (seen [n] bool, rows [n, ...]) on every rank, ordered by dataset index; a padded duplicate
    simply lands on the same slot again with the same value.
    """
    if dist.is_initialized():
        sizes = [torch.zeros(1, dtype=torch.long, device=indices.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([indices.numel()], device=indices.device))
        longest = int(max(s.item() for s in sizes))
        pad = longest - indices.numel()
        idx_p = torch.cat([indices, indices.new_full((pad,), -1)])
        val_p = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
        idx_all = [torch.empty_like(idx_p) for _ in sizes]
        val_all = [torch.empty_like(val_p) for _ in sizes]
        dist.all_gather(idx_all, idx_p)
        dist.all_gather(val_all, val_p)
        indices, values = torch.cat(idx_all), torch.cat(val_all)
        keep = indices >= 0
        indices, values = indices[keep], values[keep]
    rows = values.new_zeros((n, *values.shape[1:]))
    seen = torch.zeros(n, dtype=torch.bool, device=indices.device)
    rows[indices] = values
    seen[indices] = True
    return seen, rows


class ShardedSampler(Sampler[int]):
    """One sampler for every case: shuffled or not, class-balanced or not, one rank or many.

    Written by hand because torch's DistributedSampler cannot weight classes and its
    WeightedRandomSampler cannot shard across ranks. The order is a pure function of
    (seed, epoch), so a resumed run sees the same batches, and `start` skips the samples a
    mid-epoch checkpoint already consumed. Like DistributedSampler, the index list is padded
    (by wrapping) to a multiple of the world size; evaluation removes the duplicates by index.
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | None = None,
    ):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.weights = weights
        self.epoch, self.start = 0, 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - self.n]]) if total > self.n else order
        mine = order[self.rank : total : self.world_size]
        return iter(mine[self.start :].tolist())
