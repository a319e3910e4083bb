"""Pure tensor ops of the batched backend: crop-box sampling and resized crops, colour jitter, grayscale, blur.

Every function works on a whole batch with per-row parameters and no random numbers of its own (the pipeline in
:mod:`.batched` draws them); each says which torchvision / kornia computation it reproduces. On the CPU the kernels
are chosen by measurement (``benchmarks/aug_ab.py --kernels``): no boolean masks or ``where`` in per-pixel formulas
(~7-10x slower per element than float arithmetic there), no ``addcmul`` with broadcast operands, large rows copied
one by one rather than by ``index_copy_``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TRIES", "sample_crop_boxes", "resized_crop", "crop_coords", "gaussian_blur"]

TRIES = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes before its centre-crop fallback
# Columns of the uniforms :func:`sample_crop_boxes` reads: [0, 10) areas, [10, 20) log aspect ratios, 20 top, 21 left
_AREA, _LOGR, _TOP, _LEFT = 0, TRIES, 2 * TRIES, 2 * TRIES + 1
_ROW_LOOP_FLOATS = 1 << 14  # CPU rows this large are scattered / read one by one (see _row_by_row)


# ------------------------------------------------------------------------------------------------------ crops
def sample_crop_boxes(
    u: Tensor, heights: Tensor, widths: Tensor, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision ``RandomResizedCrop.get_params`` for a batch, from uniforms instead of torch's global RNG.

    ``u``: (B, 22) uniforms in [0, 1) (10 areas, 10 log ratios, top, left); ``heights``, ``widths``: (B,) image
    sizes. Returns ``(top, left, h, w)``, each (B,) int64: the first of 10 tries with ``0 < w <= W`` and
    ``0 < h <= H``, else the centre crop of the whole image clipped to the ratio range.
    """
    u = u.double()
    big_h, big_w = heights.double(), widths.double()
    area = (big_h * big_w)[:, None] * (scale[0] + u[:, _AREA : _AREA + TRIES] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[:, _LOGR : _LOGR + TRIES] * (hi - lo))
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
    top = torch.where(
        found,
        torch.minimum(torch.floor(u[:, _TOP] * (big_h - h + 1)), big_h - h),
        torch.div(big_h - h, 2, rounding_mode="floor"),
    )
    left = torch.where(
        found,
        torch.minimum(torch.floor(u[:, _LEFT] * (big_w - w + 1)), big_w - w),
        torch.div(big_w - w, 2, rounding_mode="floor"),
    )
    return top.long(), left.long(), h.long(), w.long()


def resized_crop(
    images: Tensor,
    top: Tensor,
    left: Tensor,
    h: Tensor,
    w: Tensor,
    size: int,
    interpolation: str = "bilinear",
    flip: Tensor | None = None,
) -> Tensor:
    """(B, C, H, W) float, per-sample boxes (B,) -> (B, C, size, size): each box resized, optionally flipped.

    The sampling points are those of ``F.interpolate(crop, align_corners=False)`` -- pixel centres, clamped to the
    box -- so bilinear output equals torchvision's ``resized_crop(..., antialias=False)`` of the float image.
    Bicubic output is clamped to [0, 1] (PIL's uint8 result is); nearest uses ``grid_sample``'s rounding. Box
    tensors may live on the CPU.
    """
    big_h, big_w = images.shape[-2:]
    xs, ys = crop_coords(top, left, h, w, size, big_h, big_w, flip)
    return _sample_crops(images, (top, left, h, w, flip, xs, ys), size, interpolation)


def crop_coords(
    top: Tensor, left: Tensor, h: Tensor, w: Tensor, size: int, big_h: int, big_w: int, flip: Tensor | None = None
) -> tuple[Tensor, Tensor]:
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
