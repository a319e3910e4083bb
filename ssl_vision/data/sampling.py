"""Deterministic data order and augmentation, independent of process and worker count.

* :class:`GlobalBatchSampler` draws one permutation per epoch from ``(seed, epoch)``, cuts it into *global*
  batches of ``B = N·W`` and gives rank ``r`` the slice ``[r·N, (r+1)·N)`` of each. One process with batch B and
  W processes with batch N therefore see the same global batches in the same order.
* It yields ``(index, epoch)`` keys; :class:`SeededViews` seeds the augmentation RNG of each sample from
  ``(seed, epoch, index)``, so a sample's views do not depend on which worker or process draws them, and a
  resumed run reproduces the augmentations of an uninterrupted one.
* Its position is resumable mid-epoch: :meth:`GlobalBatchSampler.skip_batches` makes the next pass start with the
  first unseen global batch of the epoch; the data module's train loader (``ResumableLoader``) calls it with the
  trainer's count of batches already run when an epoch starts, so a run resumed from a mid-epoch checkpoint sees
  exactly the batches an uninterrupted one would. ``state_dict`` / ``load_state_dict`` carry the same position.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ssl_vision import distributed as dist


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """Yields this rank's ``(index, epoch)`` keys, ``per_rank_batch`` per batch; the last partial global batch is
    dropped (queues and BatchNorm need full batches). Lightning calls :meth:`set_epoch` every epoch."""

    def __init__(self, num_samples: int, per_rank_batch: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.per_rank_batch = num_samples, per_rank_batch
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self._skip = 0  # global batches of ``epoch`` the next pass leaves out (set by load_state_dict, used once)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # a skip belongs to the epoch it was loaded for
        self.epoch = epoch

    def _global_batch(self) -> int:
        return self.per_rank_batch * dist.world_size()

    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the same count on every rank)."""
        return self.num_samples // self._global_batch()

    def __len__(self) -> int:
        # The full epoch even after a mid-epoch resume: Lightning counts the batches it already ran itself.
        return self.batches_per_epoch() * self.per_rank_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        big_b, n, r = self._global_batch(), self.per_rank_batch, dist.rank()
        usable = (self.num_samples // big_b) * big_b
        skip, self._skip = self._skip, 0
        mine = order[:usable].view(-1, big_b)[skip:, r * n:(r + 1) * n].reshape(-1)
        return iter([(int(i), self.epoch) for i in mine])

    def skip_batches(self, batches_done: int) -> None:
        """The next pass leaves out the first ``batches_done`` global batches of the current epoch (a resume)."""
        if not 0 <= batches_done <= self.batches_per_epoch():
            raise ValueError(f"cannot skip {batches_done} batches of an epoch of {self.batches_per_epoch()}")
        self._skip = int(batches_done)

    def state_dict(self, batches_done: int) -> dict[str, Any]:
        """The position to resume from: ``batches_done`` global batches of epoch ``epoch`` were trained on."""
        return {"epoch": int(self.epoch), "batches_done": int(batches_done), "global_batch": self._global_batch(),
                "num_samples": int(self.num_samples), "seed": int(self.seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off: the next pass yields epoch ``state["epoch"]`` from its first unseen
        global batch, or the next epoch from the start when that one was complete.

        Data order depends on (seed, epoch, global batch, data-set size); if any of these changed the old position
        cannot be mapped exactly, so the position is kept by samples seen (a warning says so).
        """
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        same = (state.get("global_batch") == self._global_batch() and state.get("num_samples") == self.num_samples
                and state.get("seed") == self.seed)
        if not same:
            warnings.warn(f"resuming a data position saved with global batch {state.get('global_batch')}, "
                          f"{state.get('num_samples')} samples, seed {state.get('seed')} under global batch "
                          f"{self._global_batch()}, {self.num_samples} samples, seed {self.seed}: the epoch's order "
                          f"differs from the interrupted run's, so the resumed run is not an exact continuation",
                          stacklevel=2)
            done = (done * int(state.get("global_batch") or self._global_batch())) // self._global_batch()
        if done >= self.batches_per_epoch():
            epoch, done = epoch + 1, 0
        self.epoch, self._skip = epoch, done


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
