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
  exactly the batches an uninterrupted one would. ``state_dict`` / ``load_state_dict`` carry the same position,
  counted in samples as well as batches: a run resumed with another global batch continues the epoch's order at the
  first sample not yet seen (:meth:`GlobalBatchSampler.resume_position`), so no sample of that epoch is trained twice.
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
        self._skip = 0  # samples of ``epoch``'s order the next pass leaves out (a resume; used once)
        self._loaded: tuple[int, int] | None = None  # (epoch, samples seen) from load_state_dict, until the pass
        self._pass = (0, 0, 0)  # (epoch, first sample, batches before it) of the current pass: state_dict's origin

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip, self._loaded = 0, None  # a skip belongs to the epoch it was loaded for
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
        skip, self._skip = self._skip, 0
        full = (self.num_samples - skip) // big_b  # whole global batches left from ``skip`` (the rest is dropped)
        self._pass = (self.epoch, skip, self.batches_before(skip))
        mine = order[skip : skip + full * big_b].view(-1, big_b)[:, r * n : (r + 1) * n].reshape(-1)
        return iter([(int(i), self.epoch) for i in mine])

    def batches_before(self, samples_done: int) -> int:
        """How many batches of the epoch count as run when the pass starts at sample ``samples_done`` of the order:
        the epoch's batches less those still to come, so that the trainer's count reaches ``batches_per_epoch``
        exactly when the pass ends (``samples_done / B`` when it is a multiple of the global batch B)."""
        return self.batches_per_epoch() - (self.num_samples - samples_done) // self._global_batch()

    def skip_batches(self, batches_done: int) -> None:
        """The next pass leaves out the first ``batches_done`` global batches of the current epoch (a resume).

        After :meth:`load_state_dict` of a position saved under another global batch, the trainer's count of
        ``batches_done`` stands for the samples seen then (:meth:`resume_position`), and the pass starts at exactly
        that sample of the epoch's order even when it is not a multiple of the new global batch."""
        if not 0 <= batches_done <= self.batches_per_epoch():
            raise ValueError(f"cannot skip {batches_done} batches of an epoch of {self.batches_per_epoch()}")
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded[0] == self.epoch and self.batches_before(loaded[1]) == batches_done:
            self._skip = loaded[1]
        else:
            self._skip = int(batches_done) * self._global_batch()

    def samples_done(self, batches_done: int) -> int:
        """Samples of the current epoch's order trained on after ``batches_done`` batches (as the trainer counts
        them) of this pass's epoch."""
        epoch, first, before = self._pass
        if epoch == self.epoch and batches_done >= before:
            return first + (batches_done - before) * self._global_batch()
        return batches_done * self._global_batch()

    def state_dict(self, batches_done: int) -> dict[str, Any]:
        """The position to resume from: ``batches_done`` global batches of epoch ``epoch`` were trained on, that is
        the first ``samples_done`` samples of the epoch's order."""
        return {
            "epoch": int(self.epoch),
            "batches_done": int(batches_done),
            "samples_done": int(self.samples_done(batches_done)),
            "global_batch": self._global_batch(),
            "num_samples": int(self.num_samples),
            "seed": int(self.seed),
        }

    def resume_position(self, state: dict[str, Any]) -> dict[str, Any]:
        """Where a position saved as ``state`` lands under this sampler (no side effects).

        Returns ``epoch``, ``samples_done`` (the first unseen sample of that epoch's order), ``batches_done`` (the
        trainer's batch count that stands for it, :meth:`batches_before`), ``changed`` (global batch, data size or
        seed differ from the saved ones) and ``message`` (what changed and what it means, for the warning; None when
        nothing did). The position is kept by samples seen: with only the global batch changed the epoch's order is
        the same, so the resumed run trains each remaining sample of the epoch once; with another data size or seed
        the order differs and the position is only approximate. When fewer than one global batch of the epoch is
        left, the next epoch starts from its beginning.
        """
        epoch, batches = int(state["epoch"]), int(state["batches_done"])
        old_batch = int(state.get("global_batch") or self._global_batch())
        old_n = int(state.get("num_samples") or self.num_samples)
        old_seed = int(state.get("seed", self.seed))
        samples = min(int(state.get("samples_done", batches * old_batch)), self.num_samples)
        big_b = self._global_batch()
        changed = (old_batch, old_n, old_seed) != (big_b, self.num_samples, self.seed)
        message = None
        if changed:
            head = (
                f"resuming a data position saved with global batch {old_batch}, {old_n} samples, seed {old_seed} "
                f"under global batch {big_b}, {self.num_samples} samples, seed {self.seed}: "
            )
            if (old_n, old_seed) == (self.num_samples, self.seed):
                left = (self.num_samples - samples) % big_b
                message = head + (
                    f"not an exact continuation (the batches differ), but epoch {epoch} continues at "
                    f"sample {samples} of the same order, so each remaining sample of the epoch is "
                    f"trained once"
                    + (
                        f" (its last {left} samples, less than one global batch, are dropped as at every epoch's end)"
                        if left and self.num_samples - samples >= big_b
                        else ""
                    )
                )
            else:
                message = head + (
                    f"the epoch's order differs from the interrupted run's, so the resumed run is not "
                    f"an exact continuation (epoch {epoch} continues after {samples} samples; some of "
                    f"its samples may be seen twice or not at all)"
                )
        if self.num_samples - samples < big_b:
            epoch, samples = epoch + 1, 0
        return {
            "epoch": epoch,
            "samples_done": samples,
            "batches_done": self.batches_before(samples),
            "changed": changed,
            "message": message,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off: the next pass yields epoch ``state["epoch"]`` from its first unseen
        sample, or the next epoch from the start when that one was complete (see :meth:`resume_position`; a warning
        says what changed when the global batch, data size or seed differ)."""
        pos = self.resume_position(state)
        if pos["message"]:
            warnings.warn(pos["message"], stacklevel=2)
        self.resume_at(pos["epoch"], pos["samples_done"])

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """The next pass yields epoch ``epoch`` from sample ``samples_done`` of its order (the trainer's count of
        batches then stands at :meth:`batches_before` of it, see :meth:`skip_batches`)."""
        self.epoch, self._skip = int(epoch), int(samples_done)
        self._loaded = (int(epoch), int(samples_done))


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
