"""``data.decode=device``: the loader ships JPEG bytes, batches are decoded with ``torchvision.io.decode_jpeg`` on the
model's device (the CPU here) and made into views by the batched backend. References: the host paths (PIL in the
workers, per-sample and batched) on the same folder, and PIL's reading of the files the test writes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ssl_vision.data.batched import RAW_KEY
from ssl_vision.data.datamodule import SSLDataModule
from ssl_vision.data.datasets import BadImageError
from ssl_vision.data.encoded import ENCODED_KEY, EncodedImages, collate_encoded, jpeg_header
from ssl_vision.launch import run_pretraining

NO_COLOUR = {"count": 2, "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like RGB image: low-frequency colour blobs (noise upsampled), so resizes are well behaved."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def make_jpeg_folder(
    root: Path,
    per_class: int = 6,
    classes: str = "abc",
    seed: int = 0,
    coords: bool = False,
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> list[Path]:
    """``root/train/<class>/<i>.jpg``, sizes 40-80 px; the first file is a grayscale JPEG and the second a CMYK one
    (unless ``coords``: then every image encodes its pixel coordinates, R = x, G = y, for measuring crop boxes).
    ``tint`` scales the channels (distinct channel means make a channel mix-up visible)."""
    rng = np.random.default_rng(seed)
    files = []
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(40, 81, 2))
            if coords:
                x = (np.arange(w) + 0.5) / w * 255
                y = (np.arange(h) + 0.5) / h * 255
                arr = (
                    np.stack(
                        [np.broadcast_to(x, (h, w)), np.broadcast_to(y[:, None], (h, w)), np.full((h, w), 128.0)], -1
                    )
                    .round()
                    .astype(np.uint8)
                )
                img = Image.fromarray(arr)
            else:
                img = Image.fromarray((_smooth(rng, h, w) * np.array(tint)).astype(np.uint8))
                if c == classes[0] and i == 0:
                    img = img.convert("L")
                elif c == classes[0] and i == 1:
                    img = img.convert("CMYK")
            path = root / "train" / c / f"{i}.jpg"
            path.write_bytes(_jpeg(img))
            files.append(path)
    return files


def make_dm(
    root: Path,
    decode: str,
    backend: str = "batched",
    views=None,
    image_size: int = 48,
    batch_size: int = 6,
    num_classes: int = 3,
    **kw,
) -> SSLDataModule:
    dm = SSLDataModule(
        name="imagefolder",
        root=str(root),
        image_size=image_size,
        in_chans=kw.pop("in_chans", 3),
        num_classes=num_classes,
        mean=[0.5],
        std=[0.25],
        batch_size=batch_size,
        num_workers=kw.pop("num_workers", 0),
        views=views or [{"count": 2}],
        val_dir="train",
        decode=decode,
        **kw,
    ).with_backend(backend)
    dm.setup("fit")
    return dm


def epoch_views(dm: SSLDataModule, epochs: int = 1):
    """Every train batch of ``epochs`` epochs as ``(views, labels, indices)``, views made as the module would."""
    loader = dm.train_dataloader()
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            out.append(dm.batch_views(batch) if dm.batch_views is not None else batch)
    return out


# -------------------------------------------------------------------------------------------------------- the header
def test_jpeg_header_reads_size_and_components(tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(_smooth(rng, 37, 53))
    for img, kw, comps in (
        (rgb, {}, 3),
        (rgb.convert("L"), {}, 1),
        (rgb.convert("CMYK"), {}, 4),
        (rgb, {"progressive": True}, 3),
    ):
        assert jpeg_header(_jpeg(img, **kw)) == (37, 53, comps)
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert jpeg_header(png.getvalue()) is None
    assert jpeg_header(_jpeg(rgb)[:20]) is None  # cut before the frame header
    assert jpeg_header(b"") is None


# ------------------------------------------------------------------------------------------------- same as the host
def test_workers_ship_the_file_bytes_with_label_and_index(tmp_path):
    files = make_jpeg_folder(tmp_path, per_class=2)
    dm = make_dm(tmp_path, "device", batch_size=3)
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    enc = batch[ENCODED_KEY]
    samples = dm.train_dataset.samples
    for data, index, label in zip(enc.data, batch["indices"].tolist(), batch["labels"].tolist()):
        assert data.dtype == torch.uint8 and data.ndim == 1
        assert bytes(data.numpy()) == Path(samples[index][0]).read_bytes()
        assert label == samples[index][1]
    assert len(files) == len(samples)


def test_device_decode_matches_the_host_batched_path(tmp_path):
    """Same batches, labels, indices and image sizes (so the same crop boxes, from the same keys), and the same
    pixels up to decoder / resize rounding; a grayscale and a CMYK JPEG are among the files. Image size 48 (load
    side 55): the 40-80 px images are partly downscaled, partly not."""
    make_jpeg_folder(tmp_path)
    host, device = make_dm(tmp_path, "host"), make_dm(tmp_path, "device")
    raw_host, raw_dev = [], []
    host_views = device.batch_views.views  # the BatchedViews inside: record the raw batches it is given

    def recorder(store, inner):
        def call(batch):
            store.append((batch[RAW_KEY].clone(), list(batch["sizes"])))
            return inner(batch)

        return call

    host.batch_views = recorder(raw_host, host.batch_views)
    device.batch_views.views = recorder(raw_dev, host_views)
    a, b = epoch_views(host, epochs=2), epoch_views(device, epochs=2)
    assert len(a) == len(b) == 6
    for (va, la, ia), (vb, lb, ib), (ra, sa), (rb, sb) in zip(a, b, raw_host, raw_dev):
        assert torch.equal(la, lb) and torch.equal(ia, ib)
        assert sa == sb and ra.shape == rb.shape
        diff = (ra.int() - rb.int()).abs()
        assert diff.float().mean() < 0.6 and diff.max() <= 8, (diff.float().mean(), diff.max())
        for x, y in zip(va, vb):
            assert x.shape == y.shape == (6, 3, 48, 48)
            assert (x - y).abs().mean() < 0.02  # normalised units (std 0.25): ~1/800 of the range


def test_grayscale_model_input(tmp_path):
    make_jpeg_folder(tmp_path, per_class=2)
    host = epoch_views(make_dm(tmp_path, "host", in_chans=1, batch_size=3))
    dev = epoch_views(make_dm(tmp_path, "device", in_chans=1, batch_size=3))
    for (va, la, _), (vb, lb, _) in zip(host, dev):
        assert torch.equal(la, lb) and vb[0].shape == (3, 1, 48, 48)
        assert (va[0] - vb[0]).abs().mean() < 0.05


def _box_stats(views: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Crop area fraction and aspect ratio (w / h) of each view of coordinate images (R = x, G = y): the extent of R
    and G across the view, normalised by 255 (mean, std 0.5, 0.25 undone)."""
    x = torch.cat(views) * 0.25 + 0.5
    r, g = x[:, 0], x[:, 1]
    w = (r.amax((1, 2)) - r.amin((1, 2))).clamp_min(1e-3)
    h = (g.amax((1, 2)) - g.amin((1, 2))).clamp_min(1e-3)
    return (w * h).numpy(), (w / h).numpy()


def test_crop_scale_and_aspect_distributions_match_the_per_sample_pipeline(tmp_path):
    """RandomResizedCrop statistics over 384 draws: the device path against torchvision's per-sample pipeline on
    PIL images (another random stream, same distribution). Coordinate images make the box measurable: its relative
    width and height are the spread of R and G over the view (box extents normalised by the image's, so the
    image's own size and the pre-downscale cancel)."""
    make_jpeg_folder(tmp_path, per_class=8, coords=True)
    per_sample = epoch_views(
        make_dm(tmp_path, "host", backend="per_sample", views=[NO_COLOUR], image_size=32, batch_size=8), epochs=8
    )
    device = epoch_views(make_dm(tmp_path, "device", views=[NO_COLOUR], image_size=32, batch_size=8), epochs=8)
    area_p, aspect_p = _box_stats([v for views, _, _ in per_sample for v in views])
    area_d, aspect_d = _box_stats([v for views, _, _ in device for v in views])
    assert len(area_p) == len(area_d) == 384
    # area uniform in scale (0.08, 1) of the image: mean ~0.54 (less the edge pixels the extent misses)
    assert abs(area_p.mean() - area_d.mean()) < 0.04, (area_p.mean(), area_d.mean())
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area_p, q) - np.quantile(area_d, q)) < 0.06, q
    # log aspect uniform in log(3/4, 4/3) times the image's w/h normalised away: centred on 0
    la_p, la_d = np.log(aspect_p), np.log(aspect_d)
    assert abs(la_p.mean() - la_d.mean()) < 0.04 and abs(la_p.std() - la_d.std()) < 0.04, (
        la_p.mean(),
        la_d.mean(),
        la_p.std(),
        la_d.std(),
    )
    assert 0.4 < area_d.mean() < 0.65 and abs(la_d.mean()) < 0.05


def test_colour_statistics_match_the_per_sample_pipeline(tmp_path):
    """SimCLR's colour recipe (jitter 0.8, grayscale 0.2) over 432 views of reddish images: per-channel mean and std.
    The tolerance allows the batched backend's own float-vs-uint8 differences to PIL (its views sit ~0.05 above the
    per-sample ones in these units over several seeds, the device path's equal the host batched path's to 1e-3);
    a channel mix-up (channel means about -0.1, -0.8, -1.3 here) or a missing conversion would be far outside it."""
    make_jpeg_folder(tmp_path, per_class=6, tint=(1.0, 0.6, 0.25))
    per_sample = epoch_views(make_dm(tmp_path, "host", backend="per_sample", image_size=32), epochs=12)
    device = epoch_views(make_dm(tmp_path, "device", image_size=32), epochs=12)
    xp = torch.cat([v for views, _, _ in per_sample for v in views])
    xd = torch.cat([v for views, _, _ in device for v in views])
    assert xp.shape == xd.shape == (432, 3, 32, 32)
    mean_p, mean_d = xp.mean((0, 2, 3)), xd.mean((0, 2, 3))
    std_p, std_d = xp.std((0, 2, 3)), xd.std((0, 2, 3))
    assert torch.allclose(mean_p, mean_d, atol=0.15), (mean_p, mean_d)
    assert torch.allclose(std_p, std_d, rtol=0.1), (std_p, std_d)


# --------------------------------------------------------------------------------------------------------- bad files
def make_bad_folder(root: Path, bad: str) -> None:
    """Classes a, b (2 and 3 JPEGs) with one bad file ``bad`` sorted last in class a (index 2), so that the next
    readable file is b's first (index 3)."""
    rng = np.random.default_rng(2)
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    for c, n in (("a", 2), ("b", 3)):
        for i in range(n):
            (root / "train" / c / f"{i}.jpg").write_bytes(_jpeg(Image.fromarray(_smooth(rng, 50, 60))))
    img = Image.fromarray(_smooth(rng, 50, 60))
    path = root / "train" / "a" / bad
    if bad.endswith(".png"):
        img.save(path)  # a valid PNG: readable by PIL, not a JPEG
    elif bad.startswith("truncated"):
        good = _jpeg(img)
        path.write_bytes(good[: len(good) // 2])  # header intact: found only when decoding
    else:
        path.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())


BAD = ["image.png", "truncated.jpg", "garbage.jpg"]


@pytest.mark.parametrize("bad", BAD)
def test_bad_file_is_an_error_naming_it(tmp_path, bad):
    make_bad_folder(tmp_path, bad)
    dm = make_dm(tmp_path, "device", batch_size=6, num_classes=2)
    with pytest.raises(BadImageError, match=rf"cannot read image .*{bad}.*data\.decode=host.*on_bad_image=skip"):
        epoch_views(dm)


def test_file_gone_after_the_listing_follows_the_policy(tmp_path):
    make_jpeg_folder(tmp_path, per_class=2, classes="ab")  # a/0.jpg a/1.jpg b/0.jpg b/1.jpg
    error = make_dm(tmp_path, "device", batch_size=4, num_classes=2)
    skip = make_dm(tmp_path, "device", batch_size=4, num_classes=2, on_bad_image="skip")
    (tmp_path / "train" / "a" / "1.jpg").unlink()  # listed, then gone: index 1 -> b/0.jpg (label 1)
    with pytest.raises(BadImageError, match=r"cannot read image .*a/1\.jpg.*cannot open the file: FileNotFoundError"):
        epoch_views(error)
    with pytest.warns(UserWarning, match=r"skipped unreadable image .*a/1\.jpg"):
        views, labels, indices = epoch_views(skip)[0]
    assert views[0].shape[0] == 4 and labels.tolist() == [0 if i < 1 else 1 for i in indices.tolist()]


def test_bad_file_in_a_worker_reaches_the_main_process_by_name(tmp_path):
    make_bad_folder(tmp_path, "image.png")
    ds = EncodedImages(make_dm(tmp_path, "device", num_classes=2).train_dataset)
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_encoded)
    with pytest.raises(BadImageError, match=r"cannot read image .*image\.png.*not a JPEG file \(starts with 89 50"):
        list(loader)


@pytest.mark.parametrize("bad", BAD)
def test_skip_replaces_a_bad_file_by_the_next_readable_one(tmp_path, bad):
    """The bad file (index 2, class a) becomes b's first file (index 3): its label, and its pixels -- compared with
    the host batched path on the same folder where that file is replaced by hand."""
    make_bad_folder(tmp_path, bad)
    dm = make_dm(tmp_path, "device", batch_size=6, num_classes=2, on_bad_image="skip")
    names = [Path(p).name for p, _ in dm.train_dataset.samples]
    assert names[2] == bad and dm.train_dataset.samples[3][1] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        views, labels, indices = epoch_views(dm)[0]
    skipped = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
    assert len(skipped) == 1 and bad in skipped[0]
    assert views[0].shape[0] == 6 and sorted(indices.tolist()) == list(range(6))
    assert labels.tolist() == [0 if i < 2 else 1 for i in indices.tolist()]  # index 2 now carries b's label
    # reference: the host batched path with the bad file replaced by a copy of the next one
    ref_root = tmp_path / "ref"
    (ref_root / "train").mkdir(parents=True)
    for c in "ab":
        (ref_root / "train" / c).mkdir()
        for p in sorted((tmp_path / "train" / c).iterdir()):
            src = tmp_path / "train" / "b" / "0.jpg" if p.name == bad else p
            (ref_root / "train" / c / (p.stem + ".jpg")).write_bytes(src.read_bytes())
    ref_views, ref_labels, ref_indices = epoch_views(make_dm(ref_root, "host", batch_size=6, num_classes=2))[0]
    assert torch.equal(ref_indices, indices)
    for x, y in zip(views, ref_views):
        assert (x - y).abs().mean() < 0.02


def test_on_an_accelerator_cmyk_and_refused_files_go_to_the_cpu_decoder(monkeypatch):
    """The routing of the CUDA path, run on the ``meta`` device with a stand-in for nvjpeg that refuses one file:
    the batch call fails, the files are retried one by one, the refused one and the CMYK one (never sent to the
    accelerator) are decoded on the CPU and moved; a file that neither decodes is reported, not dropped."""
    from ssl_vision.data import encoded

    rng = np.random.default_rng(3)
    rgb, refused, gray, cmyk = (Image.fromarray(_smooth(rng, 40 + i, 50)) for i in range(4))
    good = _jpeg(rgb)
    blobs = [good, _jpeg(refused), _jpeg(gray.convert("L")), _jpeg(cmyk.convert("CMYK")), good[: len(good) // 2]]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    comps = [jpeg_header(b)[2] for b in blobs]
    assert comps == [3, 3, 1, 4, 3]
    real, calls = encoded.decode_jpegs, []

    def fake(batch, mode, device):
        calls.append((str(device), len(batch)))
        if str(device) != "cpu":
            if any(t.data_ptr() == data[1].data_ptr() for t in batch):
                raise RuntimeError("nvjpeg refused the file")
            return [t.to(device) for t in real(batch, mode, "cpu")]
        return real(batch, mode, "cpu")

    monkeypatch.setattr(encoded, "decode_jpegs", fake)
    views = encoded.DeviceDecodedViews(None, in_chans=3, max_short=64)
    out, failed = views.decode(encoded.EncodedFiles(data, list(range(5)), comps), torch.device("meta"))
    assert calls == [("meta", 4)] + [("meta", 1)] * 4 + [("cpu", 1)] * 3  # CMYK, refused, truncated on the CPU
    assert list(failed) == [4] and "truncated" in failed[4]
    assert [o.device.type for o in out[:4]] == ["meta"] * 4 and out[4] is None
    assert [tuple(o.shape) for o in out[:4]] == [(3, 40, 50), (3, 41, 50), (3, 42, 50), (3, 43, 50)]


# ---------------------------------------------------------------------------------------------------- configuration
def test_configuration_errors_name_the_keys(tmp_path):
    make_jpeg_folder(tmp_path, per_class=1)
    with pytest.raises(ValueError, match=r"data\.decode=device needs augment\.backend=batched.*per_sample"):
        make_dm(tmp_path, "device", backend="per_sample")
    with pytest.raises(ValueError, match=r"data\.decode='gpu'; valid: host, device"):
        make_dm(tmp_path, "gpu")
    with pytest.raises(ValueError, match=r"data 'synthetic' needs data\.decode=host"):
        SSLDataModule(
            name="synthetic",
            root=None,
            image_size=32,
            in_chans=3,
            num_classes=3,
            mean=[0.5],
            std=[0.25],
            batch_size=4,
            num_workers=0,
            views=[{"count": 2}],
            decode="device",
        )


def test_pretraining_end_to_end_with_device_decode(make_cfg, tmp_path):
    root = tmp_path / "jpegs"
    make_jpeg_folder(root, per_class=6)
    cfg = make_cfg(
        [
            "method=simclr",
            "backbone=resnet18",
            "backbone.width=0.125",
            "data=imagefolder",
            f"data.root={root}",
            "data.val_dir=train",
            "data.num_classes=3",
            "data.image_size=32",
            "data.batch_size=6",
            "data.eval_batch_size=18",
            "data.num_workers=0",
            "data.pin_memory=false",
            "data.persistent_workers=false",
            "data.decode=device",
            "augment.backend=batched",
            "trainer.max_steps=3",
            "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "eval.knn_k=[5]",
            "logger=csv",
        ]
    )
    res = run_pretraining(cfg)
    assert res["steps"] == 3 and res["images_seen"] == 18 and np.isfinite(res["train_loss"])
    assert Path(res["checkpoint"]).is_file()
