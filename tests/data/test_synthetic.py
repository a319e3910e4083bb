"""The synthetic data set: class structure a simple classifier finds, determinism across processes and workers."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_vision.data.datasets import SyntheticDataset, build_dataset


def _features(ds: SyntheticDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the mean intensity and the energy at each stripe frequency (1..4) along x and along y, from a 2-D
    FFT of the grey image -- the cues the class is defined by, none of the per-sample nuisances (phase, tint)."""
    feats = []
    for i in range(len(ds)):
        img, _ = ds[i]
        grey = torch.from_numpy(np.asarray(img, dtype=np.float32))
        grey = grey.mean(-1) if grey.ndim == 3 else grey
        spec = torch.fft.fft2(grey - grey.mean()).abs()
        feats.append(torch.cat([grey.mean()[None] / 255, spec[0, 1:5] / spec.sum(), spec[1:5, 0] / spec.sum()]))
    x = torch.stack(feats)
    return (x - x.mean(0)) / (x.std(0) + 1e-8), torch.tensor(ds.targets)


def _nearest_centroid_accuracy(train, test) -> float:
    (xtr, ytr), (xte, yte) = _features(train), _features(test)
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in range(train.num_classes)])
    pred = torch.cdist(xte, centroids).argmin(1)
    return (pred == yte).float().mean().item()


def test_class_structure_is_learnable_but_not_trivial():
    kw = dict(image_size=32, in_chans=3, num_classes=10, synthetic_size=400)
    train, test = build_dataset("synthetic", "train", None, **kw), build_dataset("synthetic", "test", None, **kw)
    acc = _nearest_centroid_accuracy(train, test)
    assert acc > 0.5, acc  # chance is 0.1

    # raw-pixel 1-NN (cosine): well above chance, below saturation (so pretraining has something to learn)
    def flat(ds):
        x = torch.stack([torch.from_numpy(np.array(ds[i][0])).float().flatten() for i in range(len(ds))])
        return torch.nn.functional.normalize(x - x.mean(), dim=1), torch.tensor(ds.targets)

    (xtr, ytr), (xte, yte) = flat(train), flat(test)
    knn = (ytr[(xte @ xtr.T).argmax(1)] == yte).float().mean().item()
    assert 0.4 < knn < 0.99, knn


def test_class_patterns_as_specified():
    """Class c: mean grey rises with c, stripes of frequency 1 + c % 4, vertical for (c // 4) even."""
    ds = SyntheticDataset(200, 64, 1, 10, seed=3)
    grey = {c: [] for c in range(10)}
    for i in range(len(ds)):
        img, c = ds[i]
        a = np.asarray(img, dtype=np.float64)
        grey[c].append(a.mean())
        along_x = np.abs(np.fft.rfft(a.mean(0) - a.mean()))  # vertical stripes vary along x
        along_y = np.abs(np.fft.rfft(a.mean(1) - a.mean()))
        vertical = (c // 4) % 2 == 0
        profile = along_x if vertical else along_y
        assert int(profile[1:8].argmax()) + 1 == 1 + c % 4, (i, c)
        assert profile.max() > (along_y if vertical else along_x).max(), (i, c)
    means = [np.mean(grey[c]) for c in range(10)]
    assert means[0] < means[4] < means[9]


def test_same_seed_same_images_in_any_order_process_and_worker():
    a = SyntheticDataset(64, 24, 3, 10, seed=0)
    b = SyntheticDataset(64, 24, 3, 10, seed=0)
    order = list(range(63, -1, -1))  # another reading order gives the same images
    for i in order:
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and a[i][1] == b[i][1]
    other = SyntheticDataset(64, 24, 3, 10, seed=1)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(other[0][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[1][0]))  # samples differ

    def collate(items):
        return torch.stack([torch.from_numpy(np.asarray(img).copy()) for img, _ in items])

    single = torch.cat(list(DataLoader(a, batch_size=8, num_workers=0, collate_fn=collate)))
    workers = torch.cat(list(DataLoader(a, batch_size=8, num_workers=2, collate_fn=collate)))
    assert torch.equal(single, workers)
    reference = torch.stack([torch.from_numpy(np.asarray(b[i][0]).copy()) for i in range(64)])
    assert torch.equal(single, reference)


def test_pixels_stay_in_range_without_wrapping():
    """uint8 addition must never overflow: the brightest class at the largest tint plus the largest noise stays
    <= 255, the darkest at the smallest tint minus the largest noise >= 0 (a wrap would turn white pixels black)."""
    ds = SyntheticDataset(400, 16, 3, 10, seed=0)
    r = ds.NOISE_CLIP
    assert ds._noise.min() >= 0 and ds._noise.max() <= 2 * r
    for i in range(len(ds)):
        planes = ds.image_array(i).astype(np.int64)
        label = ds.targets[i]
        expected_mean = ds._level[label] * ds._tint[i].mean()
        # a wrapped pixel would move the mean by ~256 / pixels-per-image or more; the mean tracks the class level
        assert abs(planes.mean() - expected_mean) < 40, (i, planes.mean(), expected_mean)
    gray = SyntheticDataset(8, 16, 1, 10, seed=0)
    assert gray[0][0].mode == "L" and gray[0][0].size == (16, 16)
