"""Data sets: IDX parsing, local Fashion-MNIST, errors that name the fix, synthetic data, subsets, indexing."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vision.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_ROOT,
    IndexedDataset,
    build_dataset,
    read_idx,
    take_subset,
)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    """Write an IDX file by hand (magic 0 0 0x08 ndim, big-endian dims, raw bytes) so the parser is tested
    against the format, not against itself."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    path = str(tmp_path / ("x.idx" + (".gz" if compress else "")))
    _write_idx(path, images, compress)
    out = read_idx(path)
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    assert out.flags.writeable  # torch.from_numpy must not warn about read-only memory


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([1, 256, -2], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.tobytes())
    np.testing.assert_array_equal(read_idx(str(path)), [1, 256, -2])


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(bytes([1, 0, 0x08, 1]) + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(bad))
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"\x00\x00")
    with pytest.raises(ValueError, match="5"):
        read_idx(str(short))


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_tiny_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        suffix = ".gz" if compress else ""
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}"), images, compress)
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}"), np.arange(n) % 10, compress)
    train = build_dataset("fashion_mnist", "train", str(tmp_path))
    test = build_dataset("fashion_mnist", "test", str(tmp_path))
    assert (len(train), len(test)) == (6, 4)
    img, label = train[3]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    assert label == 3 and isinstance(label, int)
    np.testing.assert_array_equal(np.asarray(test[1][0]), images[1])  # last written images are the t10k ones


@pytest.fixture(scope="module")
def real_fashion_mnist():
    if not os.path.isdir(FASHION_MNIST_ROOT):
        pytest.skip(f"{FASHION_MNIST_ROOT} absent (apt-get install dataset-fashion-mnist)")
    return build_dataset("fashion_mnist", "train", None), build_dataset("fashion_mnist", "test", None)


def test_real_fashion_mnist(real_fashion_mnist):
    train, test = real_fashion_mnist
    assert (len(train), len(test)) == (60000, 10000)
    for ds in (train, test):
        img, _ = ds[0]
        assert img.mode == "L" and img.size == (28, 28)
        labels = ds.targets
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).tolist() == [len(ds) // 10] * 10  # Fashion-MNIST is exactly balanced
    # not all-black: the pixels were really read
    assert np.asarray(train[0][0]).max() > 0


def test_missing_fashion_mnist_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("fashion_mnist", "train", str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg and "data.root" in msg


def test_missing_cifar_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("cifar10", "train", str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and "data.root" in msg and "data.download=true" in msg


def test_missing_imagefolder_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_dataset("imagefolder", "train", str(tmp_path))


def test_imagefolder_converts_mode_and_maps_test_to_val(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / split / cls / "x.png")
    rgb = build_dataset("imagefolder", "test", str(tmp_path), num_classes=2)
    gray = build_dataset("imagefolder", "train", str(tmp_path), in_chans=1, num_classes=2)
    assert rgb[0][0].mode == "RGB" and gray[0][0].mode == "L"
    assert [rgb[i][1] for i in range(len(rgb))] == [0, 1]
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset("imagefolder", "train", str(tmp_path), num_classes=5)


def test_unknown_name_and_split_list_valid_choices():
    with pytest.raises(ValueError) as info:
        build_dataset("cifar11", "train", None)
    assert all(name in str(info.value) for name in DATASET_NAMES)
    with pytest.raises(ValueError, match="train, test"):
        build_dataset("synthetic", "val", None)


def test_synthetic_is_deterministic_and_sized():
    train = build_dataset("synthetic", "train", None, image_size=16, in_chans=3, num_classes=10, synthetic_size=40)
    again = build_dataset("synthetic", "train", None, image_size=16, in_chans=3, num_classes=10, synthetic_size=40)
    test = build_dataset("synthetic", "test", None, image_size=16, in_chans=3, num_classes=10, synthetic_size=40)
    assert len(train) == 40 and len(test) == 10  # max(40 // 4, 10)
    assert sorted(set(test.targets)) == list(range(10))  # every class in the test split
    img, label = train[5]
    assert img.mode == "RGB" and img.size == (16, 16)
    assert np.array_equal(np.asarray(img), np.asarray(again[5][0])) and label == again[5][1]
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(test[0][0]))  # other seed for the test split
    gray = build_dataset("synthetic", "train", None, image_size=16, in_chans=1, synthetic_size=8)
    assert gray[0][0].mode == "L"


def test_synthetic_knn_on_raw_pixels_beats_chance():
    kw = dict(image_size=32, in_chans=3, num_classes=10, synthetic_size=300)
    train, test = build_dataset("synthetic", "train", None, **kw), build_dataset("synthetic", "test", None, **kw)

    def stack(ds):
        x = torch.stack([torch.from_numpy(np.array(ds[i][0])).float().flatten() for i in range(len(ds))])
        return torch.nn.functional.normalize(x - x.mean(), dim=1), torch.tensor(ds.targets)

    (xtr, ytr), (xte, yte) = stack(train), stack(test)
    pred = ytr[(xte @ xtr.T).argmax(dim=1)]
    accuracy = (pred == yte).float().mean().item()
    assert accuracy > 0.3, accuracy  # chance is 0.1


def test_take_subset_is_deterministic_and_bounded():
    ds = build_dataset("synthetic", "train", None, image_size=8, synthetic_size=50)
    a, b, c = take_subset(ds, 10, seed=0), take_subset(ds, 10, seed=0), take_subset(ds, 10, seed=1)
    assert len(a) == 10 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 10
    assert take_subset(ds, 500, seed=0) is ds and take_subset(ds, None, seed=0) is ds
    with pytest.raises(ValueError):
        take_subset(ds, 0, seed=0)


def test_indexed_dataset_returns_transformed_item_label_and_index():
    ds = build_dataset("synthetic", "train", None, image_size=8, synthetic_size=20)
    indexed = IndexedDataset(ds, transform=lambda img: img.size)
    out, label, index = indexed[7]
    assert out == (8, 8) and label == ds[7][1] and index == 7
    assert len(indexed) == 20
