"""Resumable data order: the sampler's mid-epoch position, the train loader's late start, and augmentation that does
not depend on the number of loader workers."""

from __future__ import annotations

import pytest
import torch

from ssl_vision.data.datamodule import SSLDataModule
from ssl_vision.data.sampling import GlobalBatchSampler

TWO_VIEWS = [{"count": 2}]


def _batches(sampler: GlobalBatchSampler) -> list[list[int]]:
    keys = list(sampler)
    n = sampler.per_rank_batch
    return [[i for i, _ in keys[j : j + n]] for j in range(0, len(keys), n)]


def _reference_order(num_samples: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches written out independently: randperm from (seed, epoch), cut into full batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    return [order[j : j + batch] for j in range(0, (num_samples // batch) * batch, batch)]


def test_skip_continues_the_epoch_where_it_stopped():
    s = GlobalBatchSampler(50, 8, seed=3)
    s.set_epoch(2)
    ref = _reference_order(50, 8, seed=3, epoch=2)
    assert _batches(s) == ref and len(ref) == 6
    s.skip_batches(4)
    assert _batches(s) == ref[4:]
    assert _batches(s) == ref, "a skip applies to one pass only"
    assert len(s) == 6 * 8, "len stays the full epoch (Lightning counts the batches it already ran)"
    with pytest.raises(ValueError, match="cannot skip 7 batches of an epoch of 6"):
        s.skip_batches(7)


def test_state_dict_round_trip_mid_epoch_and_at_epoch_end():
    s = GlobalBatchSampler(50, 8, seed=1)
    s.set_epoch(3)
    state = s.state_dict(batches_done=2)
    fresh = GlobalBatchSampler(50, 8, seed=1)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)  # Lightning sets the epoch again before the pass: the skip survives it
    assert _batches(fresh) == _reference_order(50, 8, 1, 3)[2:]
    done = GlobalBatchSampler(50, 8, seed=1)
    done.load_state_dict(s.state_dict(batches_done=6))  # a checkpoint at the end of epoch 3 -> epoch 4 from its start
    assert done.epoch == 4 and _batches(done) == _reference_order(50, 8, 1, 4)


def test_state_from_another_global_batch_warns():
    state = GlobalBatchSampler(64, 8, seed=0).state_dict(batches_done=4)  # 32 samples seen
    other = GlobalBatchSampler(64, 16, seed=0)
    with pytest.warns(UserWarning, match="not an exact continuation"):
        other.load_state_dict(state)
    assert _batches(other) == _reference_order(64, 16, 0, 0)[2:]  # kept by samples: 32 / 16 = 2 batches


def _datamodule(**kw) -> SSLDataModule:
    args = dict(
        name="synthetic",
        root=None,
        image_size=16,
        in_chans=3,
        num_classes=4,
        mean=[0.5],
        std=[0.25],
        batch_size=8,
        num_workers=0,
        views=TWO_VIEWS,
        synthetic_size=40,
        seed=5,
    )
    args.update(kw)
    dm = SSLDataModule(**args)
    dm.setup("fit")
    return dm


def test_loader_starts_late_so_a_later_set_epoch_counts():
    """Lightning makes the train iterator (``trainer.estimated_stepping_batches``) before it restores a checkpoint and
    sets the sampler's epoch, and does not remake it for a resumed run's first epoch. The loader must read the sampler
    only at the first batch; with workers an eager iterator replayed epoch 0 (its order and augmentations)."""
    dm = _datamodule(num_workers=2)
    loader = dm.train_dataloader()
    it = iter(loader)  # what Lightning does early
    loader.sampler.set_epoch(3)  # ... and only later
    loader.sampler.skip_batches(1)  # a resume one batch into the epoch
    got = [b[2].tolist() for b in it]
    assert got == _reference_order(40, 8, 5, 3)[1:]


def test_views_do_not_depend_on_worker_count():
    """Same sampler, 0 vs 2 workers: identical batches, bit for bit, views included."""
    runs = []
    for workers in (0, 2):
        loader = _datamodule(num_workers=workers).train_dataloader()
        loader.sampler.set_epoch(1)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 5
    for (va, ya, ia), (vb, yb, ib) in zip(*runs):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        assert len(va) == len(vb) == 2 and all(torch.equal(a, b) for a, b in zip(va, vb))
    assert not torch.equal(runs[0][0][0][0], runs[0][0][0][1]), "the two views of a sample must differ"
