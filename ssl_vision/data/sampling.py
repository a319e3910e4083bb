"""Deterministic data order and augmentation, independent of process and worker count.

* :class:`GlobalBatchSampler` draws one permutation per epoch from ``(seed, epoch)``, cuts it into *global*
  batches of ``B = N·W`` and gives rank ``r`` the slice ``[r·N, (r+1)·N)`` of each. One process with batch B and
  W processes with batch N therefore see the same global batches in the same order.
* It yields ``(index, epoch)`` keys; :class:`SeededViews` seeds the augmentation RNG of each sample from
  ``(seed, epoch, index)``, so a sample's views do not depend on which worker or process draws them, and a
  resumed run reproduces the augmentations of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ssl_vision import distributed as dist


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """Yields this rank's ``(index, epoch)`` keys, ``per_rank_batch`` per batch; the last partial global batch is
    dropped (queues and BatchNorm need full batches). Lightning calls :meth:`set_epoch` every epoch."""

    def __init__(self, num_samples: int, per_rank_batch: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.per_rank_batch = num_samples, per_rank_batch
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batch(self) -> int:
        return self.per_rank_batch * dist.world_size()

    def __len__(self) -> int:
        return (self.num_samples // self._global_batch()) * self.per_rank_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        big_b, n, r = self._global_batch(), self.per_rank_batch, dist.rank()
        usable = (self.num_samples // big_b) * big_b
        mine = order[:usable].view(-1, big_b)[:, r * n:(r + 1) * n].reshape(-1)
        return iter([(int(i), self.epoch) for i in mine])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index): distinct for distinct triples in any realistic range."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


class SeededViews(Dataset):
    """``dataset[(index, epoch)] -> (transform(img), label, index)`` with the transform's torch RNG seeded from
    ``(seed, epoch, index)``; the global RNG is restored afterwards. Plain integer keys use epoch 0."""

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (int(key), 0)
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            views = self.transform(img)
        return views, label, index
