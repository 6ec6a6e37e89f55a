"""Data order that is a pure function of (seed, epoch), so a resumed run sees the very same batches.

Training uses ``DistributedSampler`` in every case (one replica outside torchrun): it shuffles with
``randperm`` seeded by ``seed + epoch`` and shards by rank, which is exactly the property resume
needs. Resuming mid-epoch skips the indices of the batches already done, without loading them, so
no augmentation randomness is spent on them either. Each loader gets its own generator, reseeded
every epoch: ``iter(DataLoader)`` otherwise draws its worker base seed from the global RNG, which
would shift every later random number between an interrupted and an uninterrupted run.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .distributed import DistContext


class SkippingSampler(Sampler[int]):
    """The wrapped sampler's indices after the first ``skip`` (set per epoch with `set_epoch`)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every validation image exactly once across ranks.

    ``DistributedSampler`` would pad with repeated images to equalise shards, skewing the metrics.
    """

    def __init__(self, dataset: Sized, ctx: DistContext) -> None:
        self.indices = list(range(ctx.rank, len(dataset), ctx.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_one_batch(n_images: int, batch_size: int, world_size: int) -> None:
    """Refuse a training set that gives no full batch per process (incomplete batches are dropped):
    called before a run writes anything, and again by `TrainBatches`."""
    if n_images == 0:
        raise ValueError("the training set is empty; check --data")
    if math.ceil(n_images / world_size) < batch_size:
        raise ValueError(f"the training set has {n_images} images, fewer than one batch of {batch_size} "
                         f"per process ({world_size} process(es)); lower --batch-size")


class TrainBatches:
    """The training loader: ``epoch(e, skip)`` iterates epoch ``e`` from batch ``skip`` on."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, ctx: DistContext,
                 pin_memory: bool = False) -> None:
        check_one_batch(len(dataset), batch_size, ctx.world_size)
        self.seed = seed
        self.rank = ctx.rank
        self.batch_size = batch_size
        inner = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
        self.sampler = SkippingSampler(inner)
        self.steps_per_epoch = len(inner) // batch_size
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=True, pin_memory=pin_memory, generator=self.generator)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator:
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)
        # The loader workers' seeds come from this generator: with the rank in it every process draws its
        # own crops and flips (as timm's seed + rank), rank 0 keeping the seeds of a single-process run.
        # The CPU generator keeps only a seed's low 32 bits, so the rank goes in through an odd multiplier.
        self.generator.manual_seed(self.seed * 1_000_003 + epoch + self.rank * 0x9E3779B1)
        return iter(self.loader)

    def order_state(self, epoch: int, step_in_epoch: int) -> dict:
        """What determines the next batch: recorded in checkpoints for inspection and checking."""
        return {"sampler": "DistributedSampler", "seed": self.seed, "epoch": epoch,
                "batches_done": step_in_epoch, "batch_size": self.batch_size}


def val_loader(dataset: Dataset, batch_size: int, workers: int, ctx: DistContext,
               pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset, ctx), num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
