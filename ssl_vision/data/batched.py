"""Batched augmentation backend (``augment.backend=batched``): views made on whole batches, on the model's device.

The train loader returns *un-augmented* uint8 images (:class:`RawImages` + :func:`collate_raw`: images padded to the
batch's largest height and width, with each image's own size kept), and :class:`BatchedViews` turns a batch into the
same list of views as the per-sample PIL pipeline of :mod:`.views` (one ``ViewSpec`` per crop family, ``count``
views each, ordered large -> small). ``SSLModule.on_after_batch_transfer`` calls it once the batch is on the
device, so on a GPU the augmentation runs there as a handful of batched kernels instead of in loader workers.

Split of the work:

* **Parameters on the CPU, per sample.** Every random number of a sample comes from a ``torch.Generator`` seeded
  with :func:`~ssl_vision.data.sampling.sample_seed` ``(seed, epoch, index)`` -- the same key as the per-sample
  path. The views are therefore reproducible from ``(seed, step)`` (the sampler fixes which ``(epoch, index)``
  keys make up step ``step``) and do not depend on batch size, number of processes or workers, device, or on what
  else is in the batch. Drawing on the CPU also means no device synchronisation to pick the samples that get an op.
* **Pixels on the device, per batch.** The sampling follows torchvision exactly; the pixel operations are tensor
  ops (``F.grid_sample`` for the crops, a separable Gaussian blur with per-sample sigma -- kornia's
  ``gaussian_blur2d`` computation, written out: :func:`gaussian_blur` --, torchvision's jitter formulas written
  out with per-sample factors).

Two implementations of the same pipeline (``strategy``, chosen by device with ``auto``): on accelerators each op
runs on the gathered subset of rows that gets it (a few dozen batched kernels); on the CPU (``grouped``) the batch
is processed in chunks of ~8 multi-crop samples, the rows of a chunk are sorted so that rows sharing (grayscale,
blur, jitter order) are contiguous and every op runs in place on slices of <= 1 MB -- fewer passes over memory,
in cache. Same random numbers, same formulas, same views (tested); on this
project's 2-core machine the CPU strategy makes multi-crop ~2x faster than the subsets one (benchmarks/RESULTS.md).
On the CPU the kernels are chosen by measurement (``benchmarks/aug_ab.py --kernels``): no boolean masks or
``where`` in per-pixel formulas (~7-10x slower per element than float arithmetic there), no ``addcmul`` with
broadcast operands, large rows copied one by one rather than by ``index_copy_``.

Semantics, op by op, against the per-sample pipeline (torchvision on PIL images):

* ``RandomResizedCrop``: box sampling is torchvision's ``get_params`` -- area uniform in ``scale`` times the image's
  area, log aspect ratio uniform, ``round`` (half to even, as Python's), up to 10 tries, first fitting box, else
  the centre-crop fallback -- on the image's own (un-padded) size. Resampling is the crop resized like
  ``torchvision.transforms.v2.functional.resized_crop`` on a float tensor with ``antialias=False``: bilinear is the
  same computation (``grid_sample`` at pixel centres, coordinates clamped to the box); bicubic reads the real
  neighbouring pixels where torchvision, having cut the crop out first, repeats the crop's edge. PIL (per-sample
  path) low-pass filters when it shrinks a crop; this backend does not, so downscaled crops alias a little more.
  Flip is folded into the sampling grid (same result as flipping the resized crop).
* Colour jitter: per sample an independent random order of brightness / contrast / saturation / hue, factors
  drawn as ``ColorJitter.get_params``, the formulas of torchvision's tensor ops with per-sample factors (hue as one
  fused, mask-free HSV-shift formula, same values as torchvision's). kornia's ``ColorJitter``
  module draws one order per *batch* (not per sample, as torchvision does), so it is not used; its
  ``RandomResizedCrop`` samples like torchvision but takes one image size per batch, and its other modules draw
  from the global RNG, which would not give per-sample seeding.
  PIL (per-sample path) rounds to uint8 after each op, uses the rounded mean for contrast and shifts hue in 8-bit
  HSV; here everything stays float32, so values differ by those roundings.
* Grayscale (ITU-R 601 weights, as PIL and torchvision), Gaussian blur (kernel as :func:`.views.blur_kernel_size`,
  sigma uniform in [0.1, 2] per sample, reflect padding, kornia's ``gaussian_blur2d`` computation), solarize
  (``x >= 0.5 -> 1 - x``, computed as ``min(x, 1 - x)``; on floats PIL's ``>= 128`` on the rounded value),
  normalisation.
* One-channel data: brightness and contrast only, no grayscale (as :func:`.views.build_view_transform`).

The loader keeps images small: an image whose shorter side exceeds ``round(8/7 * image_size)`` (256 for 224 px)
or whose longer side exceeds twice that is downscaled (PIL, antialiased) before batching. Data sets stored at the
training resolution (CIFAR, STL-10, Fashion-MNIST, synthetic) are passed through untouched. For large photos
the crops are thus taken from a 256-px version of the image rather than from the original file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from ssl_vision.data.sampling import sample_seed
from ssl_vision.data.views import BLUR_SIGMA, ViewSpec, _mode, _stats, blur_kernel_size, crop_size

__all__ = ["RawImages", "collate_raw", "is_raw_batch", "BatchedViews", "sample_crop_boxes", "resized_crop",
           "load_side"]

TRIES = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes before its centre-crop fallback
# Uniforms per view: [0, 10) areas, [10, 20) log aspect ratios, 20 top, 21 left, 22 flip, 23 jitter on/off,
# [24, 28) jitter factors (b, c, s, h), [28, 32) keys whose argsort is the jitter order, 32 gray, 33 blur on/off,
# 34 blur sigma, 35 solarize.
_AREA, _LOGR, _TOP, _LEFT, _FLIP, _JIT, _FAC, _ORD, _GRAY, _BLUR, _SIGMA, _SOL = (
    0, 10, 20, 21, 22, 23, 24, 28, 32, 33, 34, 35)
U_PER_VIEW = 36
# ``strategy=auto`` on the CPU: crops at least this large use the grouped path, smaller ones the subsets path, whose
# fewer and larger kernel calls win on small images (measured, one thread: 32 px, batch 256: 0.31 vs 0.41 ms per
# image; 96 px: about even; 224 px: grouped faster; benchmarks/RESULTS.md)
GROUPED_MIN_SIDE = 128
_ROW_LOOP_FLOATS = 1 << 14  # CPU rows this large are scattered / read one by one (see _row_by_row)
_SLICE_FLOATS = 1 << 18  # grouped path on the CPU: jitter ops on at most this many floats (1 MB) per call
_BLUR_KEY, _GRAY_KEY = 1_000_000, 2_000_000  # the grouped path's sort-key digits (jitter-order codes stay below)
RAW_KEY = "raw_images"  # marks a train batch of the batched backend
ENCODED_KEY = "encoded_images"  # marks a train batch of undecoded JPEG files (data.decode=device, .encoded)


def load_side(image_size: int) -> int:
    """Shorter side above which the loader downscales: ``round(8/7 * image_size)`` (ImageNet's 256 for 224)."""
    return max(image_size, round(image_size * 8 / 7))


# ------------------------------------------------------------------------------------------------------ loader side
class RawImages(Dataset):
    """``dataset[(index, epoch)] -> {"image": uint8 (C, h, w), "label": int, "index": int, "epoch": int}``.

    No augmentation: the mode conversion to ``in_chans`` channels and, for images larger than the training size
    needs, an antialiased downscale (shorter side to ``max_short``, longer side at most ``2 * max_short``).
    """

    def __init__(self, base: Dataset, in_chans: int, max_short: int) -> None:
        self.base, self.mode, self.max_short = base, _mode(in_chans), max_short

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (int(key), 0)
        img, label = self.base[index]
        if img.mode != self.mode:
            img = img.convert(self.mode)
        w, h = img.size
        factor = min(1.0, self.max_short / min(w, h), 2 * self.max_short / max(w, h))
        if factor < 1.0:
            img = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
        return {"image": pil_to_tensor(img), "label": int(label), "index": int(index), "epoch": int(epoch)}


def collate_raw(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad the images to the batch's largest (h, w) by repeating their last row / column; keep each size.

    Returns ``{RAW_KEY: uint8 (B, C, H, W), "labels": (B,), "indices": (B,), "sizes": [(h, w), ...],
    "keys": [(index, epoch), ...]}``; ``sizes`` and ``keys`` are plain lists so that they stay on the CPU when
    Lightning moves the batch (the crop parameters are drawn there). Edge padding (not zeros) keeps the padding out
    of bicubic taps at a crop's border.
    """
    sizes = [(int(it["image"].shape[-2]), int(it["image"].shape[-1])) for it in items]
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = []
    for it in items:
        img = it["image"]
        ph, pw = height - img.shape[-2], width - img.shape[-1]
        if ph or pw:
            img = F.pad(img[None].float(), (0, pw, 0, ph), mode="replicate")[0].to(torch.uint8)
        images.append(img)
    return {RAW_KEY: torch.stack(images), "sizes": sizes,
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "keys": [(it["index"], it["epoch"]) for it in items]}


def is_raw_batch(batch: Any) -> bool:
    """A train batch whose views are still to be made (``batch_views``): raw images, or encoded JPEG files."""
    return isinstance(batch, Mapping) and (RAW_KEY in batch or ENCODED_KEY in batch)


# ------------------------------------------------------------------------------------------------------ sampling
def sample_crop_boxes(u: Tensor, heights: Tensor, widths: Tensor, scale: Sequence[float],
                      ratio: Sequence[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision ``RandomResizedCrop.get_params`` for a batch, from uniforms instead of torch's global RNG.

    ``u``: (B, 22) uniforms in [0, 1) (10 areas, 10 log ratios, top, left); ``heights``, ``widths``: (B,) image
    sizes. Returns ``(top, left, h, w)``, each (B,) int64: the first of 10 tries with ``0 < w <= W`` and
    ``0 < h <= H``, else the centre crop of the whole image clipped to the ratio range.
    """
    u = u.double()
    big_h, big_w = heights.double(), widths.double()
    area = (big_h * big_w)[:, None] * (scale[0] + u[:, _AREA:_AREA + TRIES] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[:, _LOGR:_LOGR + TRIES] * (hi - lo))
    w = torch.round(torch.sqrt(area * aspect))  # torch.round is half-to-even, like Python's round
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= big_w[:, None]) & (h > 0) & (h <= big_h[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(1)
    in_ratio = big_w / big_h
    lo_r, hi_r = min(ratio), max(ratio)
    fb_w = torch.where(in_ratio > hi_r, torch.round(big_h * hi_r), big_w)
    fb_h = torch.where(in_ratio < lo_r, torch.round(big_w / lo_r), big_h)
    w = torch.where(found, w.gather(1, first)[:, 0], fb_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fb_h)
    # randint(0, n) as floor(u * n), clipped for the float rounding of u close to 1
    top = torch.where(found, torch.minimum(torch.floor(u[:, _TOP] * (big_h - h + 1)), big_h - h),
                      torch.div(big_h - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.minimum(torch.floor(u[:, _LEFT] * (big_w - w + 1)), big_w - w),
                       torch.div(big_w - w, 2, rounding_mode="floor"))
    return top.long(), left.long(), h.long(), w.long()


def resized_crop(images: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, size: int,
                 interpolation: str = "bilinear", flip: Tensor | None = None) -> Tensor:
    """(B, C, H, W) float, per-sample boxes (B,) -> (B, C, size, size): each box resized, optionally flipped.

    The sampling points are those of ``F.interpolate(crop, align_corners=False)`` -- pixel centres, clamped to the
    box -- so bilinear output equals torchvision's ``resized_crop(..., antialias=False)`` of the float image.
    Bicubic output is clamped to [0, 1] (PIL's uint8 result is); nearest uses ``grid_sample``'s rounding. Box
    tensors may live on the CPU.
    """
    big_h, big_w = images.shape[-2:]
    xs, ys = crop_coords(top, left, h, w, size, big_h, big_w, flip)
    return _sample_crops(images, (top, left, h, w, flip, xs, ys), size, interpolation)


def crop_coords(top: Tensor, left: Tensor, h: Tensor, w: Tensor, size: int, big_h: int, big_w: int,
                flip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (B, size) x and y sampling coordinates of :func:`resized_crop` (``grid_sample``'s normalised ones,
    ``align_corners=False``; the flip folded into x), float32 on the CPU."""
    steps = torch.arange(size, dtype=torch.float64) + 0.5

    def coords(start: Tensor, extent: Tensor, n: int) -> Tensor:
        start, extent = start.double()[:, None], extent.double()[:, None]
        c = start + steps[None] * (extent / size) - 0.5
        c = torch.minimum(torch.maximum(c, start), start + extent - 1)
        return ((2 * c + 1) / n - 1).float()

    xs, ys = coords(left, w, big_w), coords(top, h, big_h)
    if flip is not None:
        xs = torch.where(flip.cpu()[:, None], xs.flip(1), xs)
    return xs, ys


def _sample_crops(images: Tensor, box: tuple, size: int, interpolation: str) -> Tensor:
    """:func:`resized_crop` from a box ``(top, left, h, w, flip, xs, ys)`` whose coordinates are already made."""
    top, left, h, w, flip, xs, ys = box
    dev = images.device
    big_h, big_w = images.shape[-2:]
    if size == big_h == big_w and bool(((top == 0) & (left == 0) & (h == big_h) & (w == big_w)).all()):
        out = images.clone()  # every box is the whole image at the output size (e.g. augment=none): exact copy
        if flip is not None and (rows := _rows(flip.cpu(), dev)) is not None:
            _put(out, rows, _take(out, rows).flip(-1))
        return out
    xs, ys = xs.to(dev, non_blocking=True), ys.to(dev, non_blocking=True)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    mode = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}[interpolation]
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


# ------------------------------------------------------------------------------------------------------ colour ops
def _take(x: Tensor, rows: Tensor) -> Tensor:
    """``x.index_select(0, rows)`` through a 2-D view, where PyTorch's CPU kernel is never slower than on
    (N, C, H, W) and was up to several times faster here (``benchmarks/aug_ab.py --kernels``); same result."""
    return x.reshape(x.shape[0], -1).index_select(0, rows).view(rows.numel(), *x.shape[1:])


def _row_by_row(x: Tensor) -> bool:
    """Whether rows of ``x`` are scattered / read one at a time: on the CPU, rows of >= ``_ROW_LOOP_FLOATS``
    (``index_copy_`` was 1.8-3x slower than a loop of row copies there for 96- and 224-px crops,
    ``benchmarks/aug_ab.py --kernels``)."""
    return x.device.type == "cpu" and x[0].numel() >= _ROW_LOOP_FLOATS


def _put(x: Tensor, rows: Tensor, src: Tensor) -> Tensor:
    """``x.index_copy_(0, rows, src)``; returns ``x``. Row by row where :func:`_row_by_row`, else through 2-D
    views."""
    if _row_by_row(x):
        for i, r in enumerate(rows.tolist()):
            x[r].copy_(src[i])
        return x
    if not x.is_contiguous():
        return x.index_copy_(0, rows, src)
    x.view(x.shape[0], -1).index_copy_(0, rows, src.reshape(rows.numel(), -1))
    return x


def gaussian_blur(x: Tensor, kernel: int, sigma: Tensor) -> Tensor:
    """(N, C, H, W), odd ``kernel`` size, per-row ``sigma`` (N,) -> each row blurred with its own sigma.

    kornia's ``gaussian_blur2d(x, kernel, sigma, border_type="reflect")`` computation -- weights
    ``exp(-t^2 / (2 sigma^2))`` for ``t = -(k // 2) .. k // 2``, normalised; reflect padding; separable, as two
    depthwise convolutions -- giving the same floats (the test compares), written out here because kornia's
    wrapper took ~1.2x as long on this CPU for 224-px crops (``benchmarks/aug_ab.py --kernels``). torchvision's
    ``GaussianBlur`` is the same filter with one sigma per call.
    """
    n, c, h, w = x.shape
    t = torch.arange(kernel, dtype=x.dtype, device=x.device) - kernel // 2
    sigma = sigma.to(device=x.device, dtype=x.dtype, non_blocking=True)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * C, kernel): one filter per channel of a row
    p = kernel // 2
    y = F.pad(x, (p, p, 0, 0), mode="reflect").view(1, n * c, h, w + 2 * p)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.pad(y, (0, 0, p, p), mode="reflect")
    return F.conv2d(y, k[:, None, :, None], groups=n * c).view(n, c, h, w)


def _normalise(out: Tensor, x: Tensor, rows: Tensor | None, scale: Tensor, shift: Tensor) -> None:
    """``out = x[rows] * scale + shift`` (``rows=None``: all of ``x``), with per-channel (C, 1, 1) ``scale`` and
    ``shift``. A multiply and an add: ``torch.addcmul`` with those broadcast operands took 2-3x as long on the CPU.
    Where :func:`_row_by_row`, rows are read in place one by one instead of gathered first."""
    if rows is None:
        torch.mul(x, scale, out=out)
    elif _row_by_row(x):
        for i, r in enumerate(rows.tolist()):
            torch.mul(x[r], scale, out=out[i])
    else:
        torch.mul(_take(x, rows), scale, out=out)
    out.add_(shift)


def _rows(mask: Tensor, device: torch.device) -> Tensor | None:
    """Indices of the True entries of a CPU mask, on ``device``; None when there are none."""
    idx = mask.nonzero()[:, 0]
    return idx.to(device, non_blocking=True) if idx.numel() else None


def _runs(flags: list[bool], spans: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive flagged spans, as (start, end) row ranges."""
    out: list[tuple[int, int]] = []
    for flag, (a, b, _) in zip(flags, spans):
        if flag:
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
    return out


# The jitter ops, in place on ``x`` (a gathered subset of rows, or a contiguous slice of the batch), with per-row
# factors ``f``: torchvision's tensor formulas.
def _brightness_(x: Tensor, f: Tensor) -> Tensor:
    return x.mul_(f[:, None, None, None]).clamp_(0.0, 1.0)


def _gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) ITU-R 601 luma (PIL's and kornia's weights, kornia's order of operations, so
    the same floats as ``kornia.color.rgb_to_grayscale``, whose 0-dim weight tensors take ~2x longer on the CPU);
    one channel passes through."""
    if x.shape[1] != 3:
        return x
    r, g, b = x.unbind(1)
    return (r * 0.299).add_(g, alpha=0.587).add_(b, alpha=0.114)[:, None]


def _contrast_(x: Tensor, f: Tensor) -> Tensor:
    f = f[:, None, None, None]
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return x.mul_(f).add_((1 - f) * mean).clamp_(0.0, 1.0)


def _saturation_(x: Tensor, f: Tensor) -> Tensor:
    # torchvision's blend f * x + (1 - f) * gray as one lerp (x + (1 - f) * (gray - x)): 2 passes instead of 5
    return x.lerp_(_gray(x), (1 - f)[:, None, None, None]).clamp_(0.0, 1.0)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (RGB -> HSV, ``h = (h + f) mod 1``, HSV -> RGB) in one fused formula.

    Value ``M = max(r, g, b)`` and chroma ``C = M - min(r, g, b)`` are unchanged by a hue shift, so the output is
    ``M - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h') mod 6``, ``n = 5, 3, 1`` for R, G, B -- the
    same function as torchvision's six-case ``_hsv2rgb``. Written without boolean masks, ``where`` or
    ``remainder``, which this CPU runs ~7-10x slower per element than float arithmetic (``where`` on a random mask
    ~5 ns vs ~0.5 ns for a ``minimum``; ``benchmarks/aug_ab.py --kernels``):

    * the max channel from ``ceil(M - c)`` (0 exactly where ``c == M``, 1 elsewhere, as ``M - c`` is in [0, 1]),
      with torchvision's tie order red, green, blue;
    * ``6h' mod 6`` as ``v - 6 floor(v / 6)`` once per pixel, then for each channel
      ``clamp(min(k, 4 - k), 0, 1) = 2 - clamp(||6h' - s| - 3|, 1, 2)`` with ``s = 5 - n``: ``||k - 5| - 3|`` is
      k's distance to the nearer of 2 and 8, i.e. to 2 modulo 6, over the range ``k = 6h' + n`` takes.

    The test compares it with torchvision (ties, gray pixels, shifts of +-0.5).
    """
    r, g, b = x.unbind(1)
    top = x.amax(1)
    chroma = top - x.amin(1)
    not_r = torch.ceil(top - r)  # 1 where red is not the max
    not_rg = torch.ceil(top - g).mul_(not_r)  # 1 where neither red nor green is
    # C * hue in sixths: g - b (red max), b - r + 2C (green max), r - g + 4C (blue max)
    c2 = chroma * 2.0
    num = g - b
    green = (b - r).add_(c2)
    num.addcmul_(not_r, green - num)
    num.addcmul_(not_rg, (r - g).add_(c2).sub_(b - r))  # blue minus green case
    # a gray pixel (C = 0) has num = 0 and any hue; the clamp only avoids 0 / 0
    v = num.div_(chroma.clamp_min(1e-30)).add_((6.0 * f + 6.0)[:, None, None])
    v.sub_(torch.floor(v / 6.0).mul_(6.0))  # 6h' in [0, 6)
    shifts = torch.arange(0.0, 6.0, 2.0, dtype=x.dtype, device=x.device)[:, None, None]  # R, G, B: s = 5 - n
    d = (v[:, None] - shifts).abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    return d.mul_(chroma[:, None]).add_(top.sub_(c2)[:, None]).clamp_(0.0, 1.0)  # M - C (2 - d)


def _hue_(x: Tensor, f: Tensor) -> Tensor:
    return x.copy_(_hue(x, f))


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, _hue_)


class _ViewFamily:
    """The batched pipeline of one ``ViewSpec`` (all ``count`` views of it)."""

    def __init__(self, spec: ViewSpec, image_size: int, in_chans: int, strategy: str = "auto") -> None:
        if strategy not in ("auto", "grouped", "subsets"):
            raise ValueError(f"strategy must be 'auto', 'grouped' or 'subsets', got {strategy!r}")
        self.spec, self.in_chans, self.strategy = spec, in_chans, strategy
        self.side = crop_size(spec, image_size)
        self.kernel = blur_kernel_size(self.side)
        b, c, s, h = spec.jitter
        if h > 0.5:
            raise ValueError(f"jitter hue must be in [0, 0.5] (as torchvision's ColorJitter), got {h}")
        if in_chans == 1:
            s, h = 0.0, 0.0
        # ColorJitter's ranges; an op of strength 0 is None there (never applied)
        self.ranges = [(max(0.0, 1 - b), 1 + b) if b else None, (max(0.0, 1 - c), 1 + c) if c else None,
                       (max(0.0, 1 - s), 1 + s) if s else None, (-h, h) if h else None]
        self.jitter_on = any(r is not None for r in self.ranges) and spec.jitter_p > 0
        self.gray_on = spec.gray_p > 0 and in_chans == 3

    def boxes(self, u: Tensor, sizes: Tensor, big_h: int, big_w: int) -> list[tuple[Tensor, ...]]:
        """Per view, ``(top, left, h, w, flip, xs, ys)`` of every sample (CPU): u (count, B, 36), sizes (B, 2) the
        images' own (h, w), ``big_h, big_w`` the padded batch's. Made once per batch, sliced per chunk."""
        spec, out = self.spec, []
        for v in range(u.shape[0]):
            top, left, h, w = sample_crop_boxes(u[v], sizes[:, 0], sizes[:, 1], spec.scale, spec.ratio)
            flip = u[v, :, _FLIP] < spec.flip_p
            out.append((top, left, h, w, flip, *crop_coords(top, left, h, w, self.side, big_h, big_w, flip)))
        return out

    def __call__(self, images: Tensor, boxes: list[tuple[Tensor, ...]], u: Tensor, scale: Tensor, shift: Tensor,
                 out: list[Tensor]) -> None:
        """images (B, C, H, W) floats in [0, 1], their ``boxes`` (see :meth:`boxes`) and u (count, B, 36) on the CPU
        -> the ``count`` views (B, C, S, S), normalised as ``view * scale + shift``, written into ``out``."""
        spec, count, batch = self.spec, u.shape[0], images.shape[0]
        u = u.reshape(count * batch, U_PER_VIEW)
        if self.grouped(images.device):
            return self._grouped(images, boxes, u, scale, shift, out)
        crops = [_sample_crops(images, box, self.side, spec.interpolation) for box in boxes]
        x = torch.cat(crops) if count > 1 else crops[0]  # colour ops for all views of the family at once
        if spec.gray_before_jitter:
            x = self._grayscale(x, u)
            x = self._jitter(x, u)
        else:
            x = self._jitter(x, u)
            x = self._grayscale(x, u)
        x = self._blur(x, u)
        x = self._solarize(x, u)
        for o, v in zip(out, x.chunk(count) if count > 1 else [x]):
            _normalise(o, v, None, scale, shift)

    def grouped(self, device: torch.device) -> bool:
        """Which of two equivalent implementations runs (``strategy``; ``auto``: grouped on the CPU, subsets
        elsewhere).

        * **subsets** (for accelerators: a few dozen batched kernels per family): ``grid_sample`` crops for the
          whole batch, then each op on the gathered subset of rows that gets it (``index_select`` / ``index_copy_``
          per op and jitter slot).
        * **grouped** (for the CPU, where every pass over memory counts and a kernel call is cheap): the rows are
          sorted so that those sharing (grayscale on/off, blur on/off, jitter on/off and op order) are
          contiguous; the crops are written straight into their sorted rows, every colour op runs in place on a
          slice, and one gather per view un-sorts. Same random numbers, crops and formulas: the two give the same
          views (the test compares them).
        """
        return self.strategy == "grouped" or (self.strategy == "auto" and device.type == "cpu"
                                              and self.side >= GROUPED_MIN_SIDE)

    def _jitter_factors(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 4) factors (ColorJitter's ranges; 0 where an op is disabled) and (N, 4) op orders, on the CPU."""
        factors = torch.zeros(u.shape[0], 4)
        for k, r in enumerate(self.ranges):
            if r is not None:
                factors[:, k] = r[0] + u[:, _FAC + k] * (r[1] - r[0])
        return factors, u[:, _ORD:_ORD + 4].argsort(dim=1)  # argsort of iid uniforms: a uniform random permutation

    def _grouped(self, images: Tensor, boxes: list, u: Tensor, scale: Tensor, shift: Tensor,
                 out: list[Tensor]) -> None:
        spec, count, n = self.spec, len(boxes), u.shape[0]
        batch, dev, side = n // count, images.device, self.side
        enabled = [k for k, r in enumerate(self.ranges) if r is not None]
        jit = (u[:, _JIT] < spec.jitter_p) if self.jitter_on else torch.zeros(n, dtype=torch.bool)
        gray = (u[:, _GRAY] < spec.gray_p) if self.gray_on else torch.zeros(n, dtype=torch.bool)
        blur = (u[:, _BLUR] < spec.blur_p) if spec.blur_p > 0 else torch.zeros(n, dtype=torch.bool)
        factors, order = self._jitter_factors(u)
        # the order of the enabled ops only (a disabled op is skipped wherever it falls), as one base-4 number
        rank = torch.full((n, 4), 4, dtype=torch.long).scatter_(1, order, torch.arange(4).expand(n, 4))
        perm = rank[:, enabled].argsort(dim=1)
        code = ((perm * (4 ** torch.arange(perm.shape[1] - 1, -1, -1))).sum(1) if enabled
                else torch.zeros(n, dtype=torch.long))
        # sort key: gray rows last, then blur rows, then jitter off (0) before each op order (1 + code < _BLUR_KEY)
        key = gray.long() * _GRAY_KEY + blur.long() * _BLUR_KEY + jit.long() * (1 + code)
        rows = torch.argsort(key, stable=True)  # sorted position -> row (view-major: row = view * batch + sample)
        where = torch.empty_like(rows).scatter_(0, rows, torch.arange(n))  # row -> sorted position
        x = torch.empty((n, images.shape[1], side, side), dtype=images.dtype, device=dev)
        for v, box in enumerate(boxes):  # each view's crops straight into their sorted rows
            _put(x, where[v * batch:(v + 1) * batch].to(dev, non_blocking=True),
                 _sample_crops(images, box, side, spec.interpolation))
        key, u, factors, perm = key[rows], u[rows], factors[rows], perm[rows]
        bounds = torch.cat([torch.tensor([0]), (key[1:] != key[:-1]).nonzero()[:, 0] + 1, torch.tensor([n])]).tolist()
        spans = [(a, b, int(key[a])) for a, b in zip(bounds[:-1], bounds[1:])]

        # rows per call: on the CPU the four ops (~30 passes) run on <= 1 MB at a time, which stays in cache; one
        # call per span on accelerators
        step = max(1, _SLICE_FLOATS // x[0].numel()) if dev.type == "cpu" else n

        def jitter() -> None:
            for a, b, k in spans:
                if k % _BLUR_KEY == 0:  # jitter off
                    continue
                ops = [enabled[int(j)] for j in perm[a]]
                f = factors[a:b].to(dev, non_blocking=True)
                for c in range(a, b, step):
                    for op in ops:
                        _JITTER_OPS[op](x[c:min(b, c + step)], f[c - a:c - a + step, op])

        def grayscale() -> None:
            if (a := next((a for a, _, k in spans if k >= _GRAY_KEY), n)) < n:  # gray rows: one slice at the end
                x[a:].copy_(_gray(x[a:]).expand(-1, 3, -1, -1))

        if spec.gray_before_jitter:
            grayscale()
            jitter()
        else:
            jitter()
            grayscale()
        for a, b in _runs([(k // _BLUR_KEY) % 2 == 1 for _, _, k in spans], spans):  # blur rows: <= 2 slices
            sigma = BLUR_SIGMA[0] + u[a:b, _SIGMA] * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
            x[a:b].copy_(gaussian_blur(x[a:b], self.kernel, sigma))
        x = self._solarize(x, u)
        for v, o in enumerate(out):  # un-sorted, normalised
            _normalise(o, x, where[v * batch:(v + 1) * batch].to(dev, non_blocking=True), scale, shift)

    def _solarize(self, x: Tensor, u: Tensor) -> Tensor:
        if self.spec.solarize_p > 0 and (rows := _rows(u[:, _SOL] < self.spec.solarize_p, x.device)) is not None:
            sub = _take(x, rows)
            _put(x, rows, torch.minimum(sub, 1.0 - sub))  # == where(sub >= 0.5, 1 - sub, sub) on [0, 1]
        return x

    def _jitter(self, x: Tensor, u: Tensor) -> Tensor:
        """Per sample: with prob ``jitter_p``, the enabled ops in that sample's own random order (torchvision)."""
        if not self.jitter_on:
            return x
        on = (u[:, _JIT] < self.spec.jitter_p).nonzero()[:, 0]
        if on.numel() == 0:
            return x
        factors, order = self._jitter_factors(u[on])
        dev = x.device
        for slot in range(4):  # slot by slot, each jittered sample gets the op its own order puts there
            for k, op in enumerate(_JITTER_OPS):
                if self.ranges[k] is None:
                    continue
                pick = order[:, slot] == k
                if pick.any():
                    rows = on[pick].to(dev, non_blocking=True)
                    f = factors[pick, k].to(dev, non_blocking=True)
                    _put(x, rows, op(_take(x, rows), f))  # in place on the gathered copy
        return x

    def _grayscale(self, x: Tensor, u: Tensor) -> Tensor:
        if not self.gray_on or (rows := _rows(u[:, _GRAY] < self.spec.gray_p, x.device)) is None:
            return x
        return _put(x, rows, _gray(_take(x, rows)).expand(-1, 3, -1, -1))

    def _blur(self, x: Tensor, u: Tensor) -> Tensor:
        if self.spec.blur_p <= 0:
            return x
        on = u[:, _BLUR] < self.spec.blur_p
        if (rows := _rows(on, x.device)) is None:
            return x
        sigma = BLUR_SIGMA[0] + u[on, _SIGMA] * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
        if rows.numel() == x.shape[0]:  # every row (blur_p = 1): no gather / scatter
            return gaussian_blur(x, self.kernel, sigma)
        blurred = gaussian_blur(_take(x, rows), self.kernel, sigma)
        return _put(x, rows, blurred)


class BatchedViews:
    """Raw uint8 batch -> ``(views, labels, indices)`` like the per-sample pipeline (see the module docstring).

    ``specs`` as :func:`.views.build_multiview` (ordered large -> small crops); ``seed`` is the run's seed. Call it
    on the batch of :func:`collate_raw` after it has been moved to the device; the views are float32 on that device.
    """

    def __init__(self, specs: Sequence[ViewSpec | Mapping[str, Any]], image_size: int, in_chans: int,
                 mean: Sequence[float], std: Sequence[float], seed: int = 0, strategy: str = "auto",
                 chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be a positive number of samples or None (automatic), got {chunk}")
        if not specs:
            raise ValueError("at least one view spec is required (see conf/augment/*.yaml)")
        parsed = [s if isinstance(s, ViewSpec) else ViewSpec.from_dict(s) for s in specs]
        sides = [crop_size(s, image_size) for s in parsed]
        if any(later > earlier for earlier, later in zip(sides, sides[1:])):
            raise ValueError(f"view specs must be ordered large -> small crops, got sizes {sides}")
        mean, std = _stats(mean, std, in_chans)
        _mode(in_chans)
        self.families = [_ViewFamily(s, image_size, in_chans, strategy) for s in parsed]
        self.counts = [s.count for s in parsed]
        self.num_views = sum(self.counts)
        self.in_chans, self.seed, self.chunk = in_chans, seed, chunk
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def uniforms(self, keys: Sequence[tuple[int, int]]) -> Tensor:
        """(V, B, 36) CPU uniforms; sample ``b`` draws all of its numbers from ``sample_seed(seed, epoch, index)``."""
        g = torch.Generator()
        rows = []
        for index, epoch in keys:
            g.manual_seed(sample_seed(self.seed, int(epoch), int(index)))
            rows.append(torch.rand(self.num_views, U_PER_VIEW, generator=g))
        return torch.stack(rows, dim=1)

    def __call__(self, batch: Mapping[str, Any]) -> tuple[list[Tensor], Tensor, Tensor]:
        images = batch[RAW_KEY]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"BatchedViews expects uint8 (B, {self.in_chans}, H, W) images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        sizes = torch.tensor(batch["sizes"], dtype=torch.long).reshape(-1, 2)
        u = self.uniforms(batch["keys"])
        dev, n = images.device, images.shape[0]
        # (v - mean) / std = v*scale+shift; non_blocking: a blocking copy would wait for all the queued device work
        scale = (1.0 / self.std).to(dev, non_blocking=True)
        shift = (-self.mean / self.std).to(dev, non_blocking=True)
        step = self.chunk_size(images) if dev.type == "cpu" else n
        views = [torch.empty((n, self.in_chans, f.side, f.side), device=dev) for f, c in
                 zip(self.families, self.counts) for _ in range(c)]
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        boxes = [f.boxes(u[a:a + c], sizes, *images.shape[-2:]) for f, c, a in zip(self.families, self.counts, starts)]
        for a in range(0, n, step):
            x = images[a:a + step].float().div_(255.0)
            for family, count, start, fam_boxes in zip(self.families, self.counts, starts, boxes):
                family(x, [tuple(t[a:a + step] for t in box) for box in fam_boxes],
                       u[start:start + count, a:a + step], scale, shift,
                       [v[a:a + step] for v in views[start:start + count]])
        return views, batch["labels"], batch["indices"]

    def chunk_size(self, images: Tensor) -> int:
        """Samples per chunk on the CPU: ``chunk`` if set, else as many as keep one chunk's views under ~16 MB
        (about 8 images for 2 x 224 + 6 x 96 px; a whole batch of small images). Chunks give the same views
        (every number is per sample); they only keep the working set in cache and the temporaries small enough to
        be reused, which at batch 64 of multi-crop is ~25 % faster than one pass over the batch."""
        if self.chunk is not None:
            return self.chunk
        floats = sum(c * self.in_chans * f.side ** 2 for f, c in zip(self.families, self.counts))
        return max(1, (1 << 22) // floats)

    def __repr__(self) -> str:
        inner = "\n".join(f"  {n} x {f.side}px {f.spec}" for f, n in zip(self.families, self.counts))
        return f"{type(self).__name__}(seed={self.seed}, [\n{inner}\n])"
