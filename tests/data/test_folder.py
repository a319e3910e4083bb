"""``data=folder``: pretraining on a plain folder of unlabeled images (flat or nested, no split, no classes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vision.data.datasets import UNLABELED, UnlabeledImageFolder, build_dataset, list_image_files
from tests.conftest import FAST

#: a 2-step SimCLR run on 16-px images: seconds on the CPU
RUN = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *[o for o in FAST if not o.startswith("data")],
    "data=folder",
    "data.image_size=16",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.persistent_workers=false",
    "trainer.max_steps=2",
]


def _image(path: Path, seed: int, size: int = 20, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _flat(root: Path, n: int = 8) -> list[Path]:
    files = [root / f"img{i}.{'png' if i % 2 else 'jpg'}" for i in range(n)]
    for i, f in enumerate(files):
        _image(f, i)
    return files


def _nested(root: Path) -> list[Path]:
    """Images at three depths, upper-case extensions, plus files that must be left out."""
    files = [
        root / "a.PNG",
        root / "x" / "b.jpeg",
        root / "x" / "y" / "c.JPG",
        root / "x" / "y" / "z" / "d.webp",
        root / "w" / "e.bmp",
        root / "w" / "f.tif",
        root / "g.png",
        root / "x" / "h.png",
    ]
    for i, f in enumerate(files):
        _image(f, i, mode="L" if i == 5 else "RGB")
    (root / "notes.txt").write_text("not an image")
    _image(root / ".hidden" / "skip.png", 99)  # hidden folder
    _image(root / "x" / "._skip.jpg", 98)  # macOS resource-fork file
    return files


def _labelled(root: Path, classes: int = 2, per_class: int = 3) -> None:
    for split in ("train", "val"):
        for c in range(classes):
            for i in range(per_class):
                _image(root / split / f"class{c}" / f"{i}.png", 1000 * c + i + (50 if split == "val" else 0))


# ---------------------------------------------------------------------------------------------------- data set
def test_flat_and_nested_folders_list_every_image_unlabeled(tmp_path):
    flat = _flat(tmp_path / "flat")
    nested = _nested(tmp_path / "nested")
    for root, expected in ((tmp_path / "flat", flat), (tmp_path / "nested", nested)):
        ds = build_dataset("folder", "train", str(root), in_chans=3)
        assert isinstance(ds, UnlabeledImageFolder)
        assert [Path(p) for p, _ in ds.samples] == sorted(expected)
        assert len(ds) == len(expected)
        for i in range(len(ds)):
            img, label = ds[i]
            assert label == UNLABELED and img.mode == "RGB" and img.size == (20, 20)
    gray = build_dataset("folder", "train", str(tmp_path / "nested"), in_chans=1)
    assert {gray[i][0].mode for i in range(len(gray))} == {"L"}


def test_folder_reads_pixels_of_the_listed_file(tmp_path):
    _flat(tmp_path)
    ds = build_dataset("folder", "train", str(tmp_path), in_chans=3)
    path = tmp_path / "img1.png"  # PNG: lossless, so the pixels must be exactly the file's
    i = [Path(p) for p, _ in ds.samples].index(path)
    assert np.array_equal(np.asarray(ds[i][0]), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("case", ["empty", "only_other_files", "missing", "file"])
def test_folder_without_images_names_folder_and_extensions(tmp_path, case):
    root = tmp_path / "imgs"
    if case != "missing":
        root.mkdir()
    if case == "only_other_files":
        (root / "sub").mkdir()
        (root / "sub" / "readme.txt").write_text("x")
        (root / "data.csv").write_text("x")
    if case == "file":
        root.rmdir()
        root.write_text("x")
    with pytest.raises((FileNotFoundError, NotADirectoryError)) as err:
        build_dataset("folder", "train", str(root))
    msg = str(err.value)
    assert str(root) in msg and "data.root" in msg
    if case in ("empty", "only_other_files"):
        assert ".jpg" in msg and ".png" in msg and ".webp" in msg  # the accepted extensions are listed
    if case == "only_other_files":
        assert "2 other file(s)" in msg


def test_folder_has_no_test_split_and_says_how_to_evaluate(tmp_path):
    _flat(tmp_path)
    with pytest.raises(ValueError, match="data.eval_root=.*data=imagefolder"):
        build_dataset("folder", "test", str(tmp_path))
    assert list_image_files(str(tmp_path))  # the folder itself is fine


# ---------------------------------------------------------------------------------------------------- pretraining
def _pretrain(make_cfg, tmp_path, overrides):
    from ssl_vision.launch import run_pretraining

    return run_pretraining(make_cfg([*RUN, *overrides], tmp_path / "run"))


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_pretrain_on_unlabeled_folder_two_steps(make_cfg, tmp_path, layout):
    root = tmp_path / layout
    _flat(root) if layout == "flat" else _nested(root)
    res = _pretrain(make_cfg, tmp_path, [f"data.root={root}", "eval.knn_at_init=true"])
    assert res["steps"] == 2 and res["images_seen"] == 8
    assert np.isfinite(res["train_loss"])
    assert res["knn_top1"] is None and res["probe_top1"] is None and res["knn_top1_init"] is None
    assert "data.eval_root" in res["eval_skipped"] and "unlabeled" in res["eval_skipped"]
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["knn_top1"] is None and written["eval_skipped"] == res["eval_skipped"]
    assert Path(written["checkpoint"]).is_file()


def test_pretrain_on_folder_batched_views_and_device_decode(make_cfg, tmp_path):
    """The batched backend, and JPEG bytes decoded where the views are made (data.decode=device), read the folder."""
    for i in range(8):
        _image(tmp_path / "imgs" / f"d{i % 2}" / f"{i}.jpg", i)
    res = _pretrain(
        make_cfg, tmp_path, [f"data.root={tmp_path / 'imgs'}", "augment.backend=batched", "data.decode=device"]
    )
    assert res["steps"] == 2 and np.isfinite(res["train_loss"]) and res["knn_top1"] is None


def test_pretrain_on_folder_evaluates_on_eval_root(make_cfg, tmp_path):
    _nested(tmp_path / "imgs")
    _labelled(tmp_path / "labelled")
    res = _pretrain(
        make_cfg,
        tmp_path,
        [
            f"data.root={tmp_path / 'imgs'}",
            f"data.eval_root={tmp_path / 'labelled'}",
            "data.num_classes=2",
            "eval.final_eval=true",
        ],
    )
    assert res["eval_skipped"] is None
    assert res["knn_top1"] is not None and 0.0 <= res["knn_top1"] <= 100.0
    # 6 val images in 2 classes: a top-1 is a multiple of 100/6
    assert res["knn_top1"] * 6 / 100 == pytest.approx(round(res["knn_top1"] * 6 / 100), abs=1e-6)


def test_eval_root_class_count_must_match(make_cfg, tmp_path):
    _flat(tmp_path / "imgs")
    _labelled(tmp_path / "labelled", classes=3)
    with pytest.raises(ValueError, match="3 class folders but data.num_classes=1"):
        _pretrain(make_cfg, tmp_path, [f"data.root={tmp_path / 'imgs'}", f"data.eval_root={tmp_path / 'labelled'}"])


def test_pretrain_on_empty_folder_is_refused_before_training(make_cfg, tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no image files under .*imgs.*Accepted extensions: \.jpg"):
        _pretrain(make_cfg, tmp_path, [f"data.root={tmp_path / 'imgs'}"])
    assert not (tmp_path / "run" / "results.json").exists()


# ---------------------------------------------------------------------------------------------------- evaluation tools
def test_eval_tools_use_the_runs_eval_root(tmp_path):
    """A checkpoint pretrained on data=folder with data.eval_root is evaluated on that labelled set by the tools
    (``data:`` from the checkpoint); without eval_root the tools say how to give one."""
    from ssl_vision.eval.features import build_eval_splits, resolve_eval_data

    _flat(tmp_path / "imgs")
    _labelled(tmp_path / "labelled", classes=2, per_class=3)
    stored = {
        "name": "folder",
        "root": str(tmp_path / "imgs"),
        "eval_root": str(tmp_path / "labelled"),
        "image_size": 16,
        "in_chans": 3,
        "num_classes": 2,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    data = resolve_eval_data(stored, None, 3, 16)
    assert data.name == "imagefolder" and data.root == str(tmp_path / "labelled")
    train, test = build_eval_splits(data)
    assert sorted(int(y) for _, y in train) == [0, 0, 0, 1, 1, 1] and len(test) == 6
    with pytest.raises(ValueError, match="data=imagefolder data.root="):
        build_eval_splits(resolve_eval_data({**stored, "eval_root": None}, None, 3, 16))


def test_eval_root_only_with_folder(tmp_path):
    from ssl_vision.data import SSLDataModule

    with pytest.raises(ValueError, match="data.eval_root is the labelled evaluation set of data=folder"):
        SSLDataModule(
            name="synthetic",
            root=None,
            image_size=16,
            in_chans=3,
            num_classes=2,
            mean=[0.5] * 3,
            std=[0.25] * 3,
            batch_size=4,
            num_workers=0,
            views=[],
            eval_root=str(tmp_path),
        )
