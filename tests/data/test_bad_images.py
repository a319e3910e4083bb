"""ImageFolder with awkward and broken files: odd modes are converted, unreadable files are an error naming the file
(``data.on_bad_image=error``) or are replaced deterministically (``skip``). Files are written with PIL here."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ssl_vision.data.datamodule import SSLDataModule
from ssl_vision.data.datasets import BadImageError, build_dataset
from tests.config_snapshot import compose_cfg

CONF = Path(__file__).resolve().parents[2] / "conf"
RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_folder(root: Path, broken: bool) -> dict[str, np.ndarray | None]:
    """``root/train/{a,b}/...``; returns {file name: the RGB array it should read as (None: unreadable)}."""
    a, b = root / "train" / "a", root / "train" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    expect: dict[str, np.ndarray | None] = {}
    for i in range(3):
        arr = _rgb()
        Image.fromarray(arr).save(a / f"good{i}.png")
        expect[f"good{i}.png"] = arr
    rgba = RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    expect["rgba.png"] = rgba[..., :3]  # alpha dropped
    wide = RNG.integers(0, 65536, (12, 10), dtype=np.uint16)
    Image.fromarray(wide).save(b / "wide16.png")  # a 16-bit grayscale PNG
    expect["wide16.png"] = np.repeat((wide.astype(np.int64) // 257).astype(np.uint8)[..., None], 3, axis=2)
    cmyk = Image.fromarray(_rgb()).convert("CMYK")
    cmyk.save(b / "cmyk.tiff")
    expect["cmyk.tiff"] = np.asarray(cmyk.convert("RGB"))
    tiny = _rgb(2, 3)  # far smaller than any crop
    Image.fromarray(tiny).save(b / "tiny.png")
    expect["tiny.png"] = tiny
    if broken:
        (b / "zero.png").write_bytes(b"")
        (b / "garbage.jpg").write_bytes(RNG.integers(0, 256, 300, dtype=np.uint8).tobytes())
        good = _jpeg_bytes(_rgb(64, 64))
        (b / "truncated.jpg").write_bytes(good[: len(good) // 2])
        expect.update({"zero.png": None, "garbage.jpg": None, "truncated.jpg": None})
    return expect


def _by_name(ds) -> dict[str, int]:
    return {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}


def test_odd_modes_and_tiny_images_are_converted(tmp_path):
    expect = make_folder(tmp_path, broken=False)
    ds = build_dataset("imagefolder", "train", str(tmp_path), num_classes=2, val_dir="train")
    for name, i in _by_name(ds).items():
        img, _ = ds[i]
        assert img.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(img), expect[name], err_msg=name)
    # PIL's own convert would clip the 16-bit image at 255: nearly white, which is why it is scaled instead
    assert np.asarray(Image.open(tmp_path / "train/b/wide16.png").convert("L")).mean() > 240
    gray = build_dataset("imagefolder", "train", str(tmp_path), in_chans=1, num_classes=2)
    for name, i in _by_name(gray).items():
        img, _ = gray[i]
        assert img.mode == "L", name
        np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.fromarray(expect[name]).convert("L")))


def test_tiny_and_odd_images_go_through_the_training_views(tmp_path):
    make_folder(tmp_path, broken=False)
    dm = SSLDataModule(
        name="imagefolder",
        root=str(tmp_path),
        image_size=32,
        in_chans=3,
        num_classes=2,
        mean=[0.5],
        std=[0.25],
        batch_size=7,
        num_workers=0,
        views=[{"count": 2}],
        val_dir="train",
    )
    dm.setup("fit")
    views, labels, indices = next(iter(dm.train_dataloader()))
    assert [tuple(v.shape) for v in views] == [(7, 3, 32, 32)] * 2 and sorted(indices.tolist()) == list(range(7))
    assert all(torch.isfinite(v).all() for v in views)


@pytest.mark.parametrize("name", ["zero.png", "garbage.jpg", "truncated.jpg"])
def test_unreadable_file_is_an_error_naming_it(tmp_path, name):
    make_folder(tmp_path, broken=True)
    ds = build_dataset("imagefolder", "train", str(tmp_path), num_classes=2)
    with pytest.raises(BadImageError, match=rf"cannot read image .*{name}.*data\.on_bad_image=skip"):
        ds[_by_name(ds)[name]]


def test_unreadable_file_in_a_worker_reaches_the_main_process_by_name(tmp_path):
    make_folder(tmp_path, broken=True)
    ds = build_dataset("imagefolder", "train", str(tmp_path), num_classes=2)
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    with pytest.raises(BadImageError, match=r"cannot read image .*(zero\.png|garbage\.jpg|truncated\.jpg)"):
        for _ in loader:
            pass


def test_skip_replaces_each_bad_file_by_the_next_readable_one_and_counts(tmp_path):
    expect = make_folder(tmp_path, broken=True)
    ds = build_dataset("imagefolder", "train", str(tmp_path), num_classes=2, on_bad_image="skip")
    names = [Path(p).name for p, _ in ds.samples]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
        items_again = [ds[i] for i in range(len(ds))]
    for i, (img, label) in enumerate(items):
        j = i
        while expect[names[j]] is None:  # reference: the next readable file in listing order (cyclic)
            j = (j + 1) % len(names)
        np.testing.assert_array_equal(np.asarray(img), expect[names[j]], err_msg=names[i])
        assert label == ds.samples[j][1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(items, items_again))
    skipped = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
    assert len(skipped) == 3, "one warning per bad file, not per read"
    assert "3 bad file(s) so far" in skipped[-1] and sorted(Path(p).name for p in ds.bad_files) == [
        "garbage.jpg",
        "truncated.jpg",
        "zero.png",
    ]


def test_no_readable_image_at_all_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "x.png").write_bytes(b"not an image")
    ds = build_dataset("imagefolder", "train", str(tmp_path), num_classes=2, on_bad_image="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadImageError, match="none of its 2 images can be read"):
            ds[0]


def test_empty_image_folder_names_folder_and_fix(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train'? holds no usable images .*one sub-folder per class"):
        build_dataset("imagefolder", "train", str(tmp_path), num_classes=1)


def test_policy_is_checked_and_every_data_config_defaults_to_error():
    with pytest.raises(ValueError, match="on_bad_image='ignore'; valid: error, skip"):
        SSLDataModule(
            name="synthetic",
            root=None,
            image_size=8,
            in_chans=3,
            num_classes=2,
            mean=[0.5],
            std=[0.25],
            batch_size=2,
            num_workers=0,
            views=[{}],
            on_bad_image="ignore",
        )
    configs = sorted((CONF / "data").glob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:  # each file over the schema (DataSpec), as a run composes it
        assert compose_cfg([f"data={path.stem}"]).data.on_bad_image == "error", path.name
