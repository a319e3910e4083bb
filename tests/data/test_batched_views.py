"""Batched augmentation backend (``augment.backend=batched``) against torchvision's own samplers and ops.

Statistical tests are two-sample Kolmogorov-Smirnov tests at level ALPHA = 1e-4 each on a few thousand draws per
side, with fixed seeds (so each run is deterministic). For a correct implementation the probability that a given
seed choice fails one comparison is at most ALPHA (KS is conservative for the discrete distributions of integer
crop boxes); this file makes 15 such comparisons, plus one comparison of fallback shares at 3.6 standard errors
(two-sided p ~ 3e-4), so its false-fail probability is at most about 15e-4 + 3e-4 ~ 0.2%.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl_vision.data.batched import (
    BatchedViews,
    RawImages,
    collate_raw,
    gaussian_blur,
    is_raw_batch,
    resized_crop,
    sample_crop_boxes,
)
from ssl_vision.data.tensor_ops import (
    _ROW_LOOP_FLOATS,
    _brightness_,
    _contrast_,
    _gray,
    _hue_,
    _normalise,
    _put,
    _saturation_,
    _take,
)
from ssl_vision.data.views import ViewSpec, build_multiview
from ssl_vision.launch import run_pretraining
from tests.conftest import FAST

AUGMENT_DIR = Path(__file__).resolve().parents[2] / "conf" / "augment"
RGB_STATS = ([0.5, 0.4, 0.3], [0.25, 0.2, 0.3])
ALPHA = 1e-4
N = 4000


@pytest.fixture
def one_thread():
    """Thousands of tiny tensor ops: one intra-op thread is ~10x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    both = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, both, "right") / a.size - np.searchsorted(b, both, "right") / b.size).max())


def assert_same_distribution(a, b, what: str) -> None:
    # rounded alike on both sides, so that float noise cannot split an atom (e.g. the un-jittered images)
    a, b = np.asarray(a, dtype=np.float64).round(4), np.asarray(b, dtype=np.float64).round(4)
    crit = math.sqrt(-0.5 * math.log(ALPHA / 2)) * math.sqrt((a.size + b.size) / (a.size * b.size))
    d = ks_statistic(a, b)
    assert d < crit, f"{what}: KS statistic {d:.4f} >= critical value {crit:.4f} at alpha={ALPHA}"


def load_preset(name: str) -> list[dict]:
    """conf/augment/<name>.yaml as Hydra composes it (on the ViewSpec schema), its views in order."""
    from tests.data.test_views import preset

    return preset(name)


def pil_images(n: int, size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            Image.fromarray(
                torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            ).convert(mode),
            i % 10,
        )
        for i in range(n)
    ]


def raw_batch(data, in_chans: int = 3, keys=None, max_short: int = 1000) -> dict:
    ds = RawImages(data, in_chans, max_short)
    return collate_raw([ds[k] for k in (keys or [(i, 0) for i in range(len(data))])])


# ---------------------------------------------------------------------------------------------- crop sampling
# (H, W, scale, ratio): square CIFAR-like, a wide image on which many tries fail, and a narrow one with a
# ratio range that often forces the fallback
CROP_CASES = [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
    (24, 80, (0.3, 1.0), (3 / 4, 4 / 3)),
    (60, 20, (0.5, 1.0), (0.5, 2.0)),
]


@pytest.mark.parametrize("height,width,scale,ratio", CROP_CASES)
def test_crop_boxes_match_torchvision_get_params(height, width, scale, ratio, one_thread):
    """Area fraction, aspect ratio and box centre: same distributions as RandomResizedCrop.get_params."""
    torch.manual_seed(1234)
    img = torch.empty(1, height, width)
    ref = np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(N)], dtype=np.float64)
    u = torch.rand(N, 22, generator=torch.Generator().manual_seed(4321))
    top, left, h, w = (
        t.numpy().astype(np.float64)
        for t in sample_crop_boxes(u, torch.full((N,), height), torch.full((N,), width), scale, ratio)
    )
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all()
    rt, rl, rh, rw = ref.T
    assert_same_distribution(h * w / (height * width), rh * rw / (height * width), "area fraction")
    assert_same_distribution(np.log(w / h), np.log(rw / rh), "log aspect ratio")
    assert_same_distribution(
        (left + w / 2) / width + (top + h / 2) / height, (rl + rw / 2) / width + (rt + rh / 2) / height, "box centre"
    )
    if (height, width) == (60, 20):  # the 10-try fallback is common here: same share of centre crops
        fallback = (top == (height - h) // 2) & (left == (width - w) // 2) & (w == width)
        ref_fallback = (rt == (height - rh) // 2) & (rl == (width - rw) // 2) & (rw == width)
        assert abs(fallback.mean() - ref_fallback.mean()) < 0.04


@pytest.mark.parametrize(
    "height,width,ratio",
    [(10, 10, (4.0, 4.0)), (10, 10, (0.2, 0.25)), (7, 30, (0.3, 0.5)), (30, 7, (2.0, 3.0)), (9, 12, (1.0, 1.0))],
)
def test_fallback_box_equals_torchvision(height, width, ratio):
    """When no try can fit, both fall back to the same deterministic centre crop."""
    scale = (1.0, 1.0)
    img = torch.empty(1, height, width)
    torch.manual_seed(0)
    expected = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
    u = torch.rand(3, 22, generator=torch.Generator().manual_seed(0))
    boxes = sample_crop_boxes(u, torch.full((3,), height), torch.full((3,), width), scale, ratio)
    for row in range(3):
        assert tuple(int(b[row]) for b in boxes) == tuple(expected)


# ---------------------------------------------------------------------------------------------- pixel ops
def test_resized_crop_equals_torchvision_bilinear_on_padded_batch():
    """Images of different sizes, padded into one batch: each crop equals torchvision's resized_crop (+ flip)."""
    g = torch.Generator().manual_seed(0)
    sizes = [(20, 31), (32, 32), (17, 40), (32, 9)]
    data = [
        (Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()), 0) for h, w in sizes
    ]
    batch = raw_batch(data)
    assert batch["raw_images"].shape == (4, 3, 32, 40) and batch["sizes"] == sizes
    x = batch["raw_images"].float() / 255
    u = torch.rand(4, 22, generator=g)
    hs, ws = torch.tensor([s[0] for s in sizes]), torch.tensor([s[1] for s in sizes])
    top, left, h, w = sample_crop_boxes(u, hs, ws, (0.08, 1.0), (3 / 4, 4 / 3))
    flip = torch.tensor([True, False, True, False])
    for side in (12, 24, 48):  # down- and up-sampling
        out = resized_crop(x, top, left, h, w, side, "bilinear", flip)
        for i, (img, _) in enumerate(data):
            ref = TF.resized_crop(
                TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True),
                int(top[i]),
                int(left[i]),
                int(h[i]),
                int(w[i]),
                [side, side],
                InterpolationMode.BILINEAR,
                antialias=False,
            )
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=0)


def test_bicubic_crop_is_close_to_torchvision():
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    top, left, h, w = (
        torch.tensor([0, 5, 10]),
        torch.tensor([3, 0, 12]),
        torch.tensor([40, 20, 25]),
        torch.tensor([30, 33, 25]),
    )
    out = resized_crop(x, top, left, h, w, 32, "bicubic")
    for i in range(3):
        ref = TF.resized_crop(
            x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], InterpolationMode.BICUBIC, antialias=False
        ).clamp(0, 1)
        # identical away from the crop border; at the border bicubic reads the real neighbours, not the crop edge
        torch.testing.assert_close(out[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-4, rtol=0)
        assert (out[i] - ref).abs().mean() < 0.02


def test_colour_ops_equal_torchvision_tensor_ops():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 9, 11, generator=g)
    x[0, :, :3] = 0.5  # gray pixels and channel ties for the hue formula
    x[1, 0] = x[1, 1]
    f = torch.rand(6, generator=g) * 1.6 + 0.2
    hue = torch.rand(6, generator=g) - 0.5
    cases = [
        (_brightness_, TF.adjust_brightness, f),
        (_contrast_, TF.adjust_contrast, f),
        (_saturation_, TF.adjust_saturation, f),
        (_hue_, TF.adjust_hue, hue),
    ]
    for ours, theirs, factors in cases:
        out = ours(x.clone(), factors)
        ref = torch.stack([theirs(x[i], float(factors[i])) for i in range(6)])
        # torchvision's grayscale uses 0.2989 for red where PIL (and kornia, used here) use 0.299
        torch.testing.assert_close(out, ref, atol=3e-4, rtol=0, msg=theirs.__name__)
    gray1 = torch.rand(4, 1, 8, 8, generator=g)  # one-channel contrast
    torch.testing.assert_close(
        _contrast_(gray1.clone(), f[:4]),
        torch.stack([TF.adjust_contrast(gray1[i], float(f[i])) for i in range(4)]),
        atol=1e-5,
        rtol=0,
    )


def test_hue_formula_equals_torchvision_on_ties_gray_and_extreme_shifts():
    """The mask-free hue formula against torchvision's six-case HSV round trip: random colours, exact ties between
    every pair of channels (torchvision's red > green > blue precedence), gray pixels (any hue), near-black
    pixels with a tiny chroma, quarter-step values, and shifts of exactly -0.5, 0, 1/6, 0.5."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(32, 3, 12, 12, generator=g)
    x[0:4, 0] = x[0:4, 1]  # red == green
    x[4:8, 1] = x[4:8, 2]  # green == blue
    x[8:12, 2] = x[8:12, 0]  # blue == red
    x[12:14, :, :6] = x[12:14, :1, :6]  # gray pixels
    x[14:16] *= 1e-6  # near black: chroma ~1e-6
    x[16:20] = (x[16:20] * 4).round() / 4  # quarter steps: many exact maxima ties and hue-sector edges
    x[20, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # primaries and secondaries
    x[20, :, 0, 1] = torch.tensor([1.0, 1.0, 0.0])
    x[20, :, 0, 2] = torch.tensor([0.0, 1.0, 1.0])
    f = torch.rand(32, generator=g) - 0.5
    f[:4] = torch.tensor([-0.5, 0.5, 0.0, 1 / 6])
    f[20:24] = torch.tensor([-0.5, 0.5, 1 / 3, -1 / 6])
    ref = torch.stack([TF.adjust_hue(x[i], float(f[i])) for i in range(32)])
    out = _hue_(x.clone(), f)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - x).abs().max() > 0.5  # the shifts change colours (the comparison is not of two no-ops)


def test_gray_and_gaussian_blur_equal_the_reference_formulas(one_thread):
    g = torch.Generator().manual_seed(12)
    x = torch.rand(5, 3, 40, 34, generator=g)
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # ITU-R 601, PIL's weights
    torch.testing.assert_close(_gray(x)[:, 0], gray, atol=1e-6, rtol=0)
    assert torch.equal(_gray(x[:, :1]), x[:, :1])  # one channel passes through
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    for kernel in (3, 9):
        ours = gaussian_blur(x, kernel, sigma)
        for i in range(5):  # torchvision's GaussianBlur, one sigma per call, reflect padding
            ref = TF.gaussian_blur(x[i], [kernel, kernel], [float(sigma[i])] * 2)
            torch.testing.assert_close(ours[i], ref, atol=2e-6, rtol=0, msg=f"kernel {kernel}, row {i}")
    assert (gaussian_blur(x, 9, sigma) - x).abs().max() > 0.1
    kornia = pytest.importorskip("kornia")  # the library this replaces (a dev dependency): the same floats
    torch.testing.assert_close(
        gaussian_blur(x, 9, sigma),
        kornia.filters.gaussian_blur2d(x, 9, sigma[:, None].expand(-1, 2).contiguous(), border_type="reflect"),
        atol=1e-7,
        rtol=0,
    )
    torch.testing.assert_close(_gray(x), kornia.color.rgb_to_grayscale(x), atol=0, rtol=0)


def test_blur_and_solarize_match_torchvision(one_thread):
    """A blur-only / solarize-only spec on a whole-image crop: per sample, torchvision's op with some sigma."""
    data = pil_images(6, (24, 24), seed=3)
    batch = raw_batch(data)
    spec = ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0, blur_p=1.0)
    views = BatchedViews([spec], 24, 3, [0.0], [1.0])(batch)[0][0]
    for i, (img, _) in enumerate(data):
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)

        # the sigma used is unknown here: find the one in [0.1, 2] that reproduces the output (if any does)
        def err(s: float) -> float:
            return (TF.gaussian_blur(x, [3, 3], [s, s]) - views[i]).abs().max().item()

        coarse = float(min(np.arange(0.1, 2.001, 0.05), key=err))
        lo, hi = max(0.1, coarse - 0.05), min(2.0, coarse + 0.05)
        for _ in range(40):  # ternary search of the (locally unimodal) error around the best grid point
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            lo, hi = (lo, m2) if err(m1) < err(m2) else (m1, hi)
        best = err((lo + hi) / 2)
        assert best < 1e-5, f"sample {i}: no sigma in [0.1, 2] reproduces the blur ({best:.2e})"
    spec = ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0, solarize_p=1.0)
    views = BatchedViews([spec], 24, 3, [0.0], [1.0])(batch)[0][0]
    for i, (img, _) in enumerate(data):
        x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        torch.testing.assert_close(views[i], TF.solarize(x, 0.5), atol=1e-5, rtol=0)
        assert torch.equal(TF.pil_to_tensor(TF.solarize(img, 128)), (views[i] * 255).round().to(torch.uint8))


@pytest.mark.parametrize(
    "spec",
    [
        ViewSpec(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2),
        ViewSpec(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, gray_before_jitter=True),
    ],
)
def test_colour_distribution_matches_torchvision(spec, one_thread):
    """End to end (jitter probability, factors, per-sample random order, grayscale): per-image channel means and
    std follow the distribution of torchvision's ColorJitter / RandomGrayscale on the same image."""
    spec = dataclasses.replace(spec, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    n = 2000
    ((img, _),) = pil_images(1, (6, 6), seed=5)
    x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
    jitter = T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p)
    ops = (
        [T.RandomGrayscale(spec.gray_p), jitter]
        if spec.gray_before_jitter
        else [jitter, T.RandomGrayscale(spec.gray_p)]
    )
    reference = T.Compose(ops)
    torch.manual_seed(77)
    ref = torch.stack([reference(x) for _ in range(n)])
    batch = raw_batch([(img, 0)] * n, keys=[(i, 0) for i in range(n)])
    ours = BatchedViews([spec], 6, 3, [0.0], [1.0], seed=9)(batch)[0][0]
    for stat, name in (
        (lambda t: t[:, 0].mean((1, 2)), "red mean"),
        (lambda t: t[:, 2].mean((1, 2)), "blue mean"),
        (lambda t: t.std((1, 2, 3)), "std"),
    ):
        assert_same_distribution(stat(ours).numpy(), stat(ref).numpy(), name)


# ---------------------------------------------------------------------------------------------- CPU strategies
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("side", [5, 80])  # 80 px: rows above _ROW_LOOP_FLOATS, copied one by one
def test_take_put_and_normalise_equal_index_select_and_index_copy(layout, side):
    x = torch.rand(6, 3, side, side + 2).contiguous(memory_format=layout)
    assert (x[0].numel() >= _ROW_LOOP_FLOATS) == (side == 80)
    rows, src = torch.tensor([4, 0, 3]), torch.rand(3, 3, side, side + 2)
    assert torch.equal(_take(x, rows), x.index_select(0, rows))
    assert torch.equal(_put(x.clone(), rows, src), x.clone().index_copy_(0, rows, src))
    scale, shift = torch.tensor([2.0, 0.5, 4.0])[:, None, None], torch.tensor([-1.0, 0.25, 3.0])[:, None, None]
    out = torch.empty(3, 3, side, side + 2)
    _normalise(out, x, rows, scale, shift)
    torch.testing.assert_close(out, x.index_select(0, rows) * scale + shift, atol=1e-6, rtol=0)
    _normalise(out, x[:3], None, scale, shift)
    torch.testing.assert_close(out, x[:3] * scale + shift, atol=1e-6, rtol=0)


def _rgb_photos(n: int, side: int, seed: int) -> list:
    """Smooth colour fields (so jitter, hue and blur all change something), as PIL images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return [
        (Image.fromarray((im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()), i) for i, im in enumerate(img)
    ]


@pytest.mark.parametrize("name,size,chans", [("multicrop", 144, 3), ("byol", 32, 3), ("mae", 32, 3), ("simclr", 28, 1)])
def test_grouped_strategy_and_chunks_give_the_subsets_views(name, size, chans, one_thread):
    """The CPU's default (rows sorted into groups for crops >= 128 px, colour ops in place on slices, chunks of
    samples, large rows copied one by one) and the accelerators' (gathered subsets, whole batch) are two
    implementations of one pipeline: same views, whatever the chunk size. multicrop at 144 px has 144-px global
    crops (grouped under auto) and 62-px local ones (subsets under auto); byol has solarize and two families'
    settings; mae is bicubic; one channel skips saturation, hue and grayscale."""
    stats = RGB_STATS if chans == 3 else ([0.4], [0.3])
    data = _rgb_photos(7, size + 16, seed=8)
    batch = raw_batch(data, chans, keys=[(i, 3) for i in range(7)])
    ref = BatchedViews(load_preset(name), size, chans, *stats, seed=2, strategy="subsets")(batch)[0]
    for strategy, chunk in itertools.product(("grouped", "auto"), (None, 1, 3, 7)):  # auto: subsets below 128 px
        got = BatchedViews(load_preset(name), size, chans, *stats, seed=2, strategy=strategy, chunk=chunk)(batch)[0]
        assert [v.shape for v in got] == [v.shape for v in ref]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{name}, {strategy}, chunk {chunk}")
    # not a vacuous comparison: the views have content, and two views of one image differ
    assert all(float(v.std()) > 0.05 for v in ref)
    assert len(ref) == 1 or not torch.allclose(ref[0], ref[1])


def test_bad_strategy_or_chunk_is_clear():
    with pytest.raises(ValueError, match="strategy must be 'auto', 'grouped' or 'subsets', got 'fast'"):
        BatchedViews(load_preset("simclr"), 32, 3, *RGB_STATS, strategy="fast")
    with pytest.raises(ValueError, match="chunk must be a positive number of samples or None"):
        BatchedViews(load_preset("simclr"), 32, 3, *RGB_STATS, chunk=0)


# ---------------------------------------------------------------------------------------------- presets, seeds
PRESETS = sorted(p.stem for p in AUGMENT_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_shapes_dtypes_match_per_sample_pipeline(name):
    views = load_preset(name)
    for size, chans, stats, mode in ((32, 3, RGB_STATS, "RGB"), (28, 1, ([0.3], [0.3]), "L")):
        data = pil_images(4, (size, size), mode)
        ours, labels, indices = BatchedViews(views, size, chans, *stats)(raw_batch(data, chans))
        per_sample = build_multiview(views, size, chans, *stats)(data[0][0])
        assert [tuple(v.shape[1:]) for v in ours] == [tuple(v.shape) for v in per_sample]
        assert all(v.shape[0] == 4 and v.dtype == torch.float32 for v in ours)
        assert labels.tolist() == [0, 1, 2, 3] and indices.tolist() == [0, 1, 2, 3]
        lo = (0 - torch.tensor(stats[0])) / torch.tensor(stats[1])
        hi = (1 - torch.tensor(stats[0])) / torch.tensor(stats[1])
        for v in ours:  # normalised [0, 1] pixels
            assert (v >= lo[:, None, None] - 1e-5).all() and (v <= hi[:, None, None] + 1e-5).all()


def test_none_preset_equals_per_sample_pipeline_on_rgb_and_gray_sources():
    for size, chans, stats in ((32, 3, RGB_STATS), (28, 1, ([0.3], [0.2]))):
        data = pil_images(3, (size, size), "RGB")  # RGB source converted to L for one channel, as per-sample
        ours = BatchedViews(load_preset("none"), size, chans, *stats)(raw_batch(data, chans))[0][0]
        per_sample = build_multiview(load_preset("none"), size, chans, *stats)
        ref = torch.stack([per_sample(img)[0] for img, _ in data])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_views_depend_only_on_seed_epoch_and_index():
    views = load_preset("dino")
    data = pil_images(8, (32, 32))
    bv = BatchedViews(views, 32, 3, *RGB_STATS, seed=3)
    full = bv(raw_batch(data, keys=[(i, 1) for i in range(8)]))[0]
    part = bv(raw_batch(data, keys=[(5, 1), (2, 1)]))[0]  # other batch size and order
    for a, b in zip(full, part):
        torch.testing.assert_close(a[[5, 2]], b, atol=1e-6, rtol=0)
    again = BatchedViews(views, 32, 3, *RGB_STATS, seed=3)(raw_batch(data, keys=[(i, 1) for i in range(8)]))[0]
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    other_epoch = bv(raw_batch(data, keys=[(i, 2) for i in range(8)]))[0]
    other_seed = BatchedViews(views, 32, 3, *RGB_STATS, seed=4)(raw_batch(data, keys=[(i, 1) for i in range(8)]))[0]
    assert not torch.equal(full[0], other_epoch[0]) and not torch.equal(full[0], other_seed[0])


def test_loader_downscales_large_images_only():
    big, small = pil_images(1, (600, 400))[0], pil_images(1, (30, 20))[0]
    ds = RawImages([big, small], 3, max_short=256)
    assert ds[(0, 0)]["image"].shape == (3, 256, 384) and ds[(1, 0)]["image"].shape == (3, 20, 30)
    batch = collate_raw([ds[(0, 0)], ds[(1, 0)]])
    assert is_raw_batch(batch) and batch["raw_images"].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------- pretraining
@pytest.mark.parametrize("augment", ["simclr", "multicrop"])
def test_one_step_pretraining_with_batched_backend(make_cfg, augment):
    cfg = make_cfg(
        [
            "method=simclr",
            "backbone=resnet18",
            "backbone.width=0.125",
            f"augment={augment}",
            *FAST,
            "trainer.max_steps=1",
            "augment.backend=batched",
            "eval.final_eval=false",
        ]
    )
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["images_seen"] == 16
    assert res["train_loss"] is not None and math.isfinite(res["train_loss"])
