"""Batched augmentation pipeline (``augment.backend=batched``): views made on whole batches, on the model's device.

:class:`BatchedViews` turns a batch of un-augmented uint8 images (loader side: :mod:`.raw_batch`) into the same
list of views as the per-sample PIL pipeline of :mod:`.views` (one ``ViewSpec`` per crop family, ``count`` views
each, ordered large -> small), from the per-sample random numbers it draws and the tensor ops of
:mod:`.tensor_ops`. ``SSLDataModule.on_after_batch_transfer`` calls it once the batch is on the device, so on a GPU
the augmentation runs there as a handful of batched kernels instead of in loader workers.

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

Images larger than the training size needs are downscaled by the loader first (:mod:`.raw_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# loader-side and op names re-exported: ``from ssl_vision.data.batched import RawImages, collate_raw, ...`` keeps
# working
from ssl_vision.data.raw_batch import (
    ENCODED_KEY,
    RAW_KEY,
    RawImages,
    collate_raw,  # noqa: F401
    is_raw_batch,
    load_side,
)
from ssl_vision.data.sampling import sample_seed
from ssl_vision.data.tensor_ops import (
    _JITTER_OPS,
    _gray,
    _normalise,
    _put,
    _rows,
    _runs,
    _sample_crops,
    _take,
    crop_coords,
    gaussian_blur,
    resized_crop,
    sample_crop_boxes,
)
from ssl_vision.data.views import BLUR_SIGMA, ViewSpec, _mode, _stats, blur_kernel_size, crop_size, view_specs

__all__ = [
    "BatchedViews",
    "RAW_KEY",
    "ENCODED_KEY",
    "RawImages",
    "collate_raw",
    "is_raw_batch",
    "load_side",
    "sample_crop_boxes",
    "resized_crop",
    "gaussian_blur",
]

# Uniforms per view: [0, 10) areas, [10, 20) log aspect ratios, 20 top, 21 left (the columns sample_crop_boxes
# reads), 22 flip, 23 jitter on/off, [24, 28) jitter factors (b, c, s, h), [28, 32) keys whose argsort is the jitter
# order, 32 gray, 33 blur on/off, 34 blur sigma, 35 solarize.
_FLIP, _JIT, _FAC, _ORD, _GRAY, _BLUR, _SIGMA, _SOL = 22, 23, 24, 28, 32, 33, 34, 35
U_PER_VIEW = 36
# ``strategy=auto`` on the CPU: crops at least this large use the grouped path, smaller ones the subsets path, whose
# fewer and larger kernel calls win on small images (measured, one thread: 32 px, batch 256: 0.31 vs 0.41 ms per
# image; 96 px: about even; 224 px: grouped faster; benchmarks/RESULTS.md)
GROUPED_MIN_SIDE = 128
_SLICE_FLOATS = 1 << 18  # grouped path on the CPU: jitter ops on at most this many floats (1 MB) per call
_BLUR_KEY, _GRAY_KEY = 1_000_000, 2_000_000  # the grouped path's sort-key digits (jitter-order codes stay below)


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
        self.ranges = [
            (max(0.0, 1 - b), 1 + b) if b else None,
            (max(0.0, 1 - c), 1 + c) if c else None,
            (max(0.0, 1 - s), 1 + s) if s else None,
            (-h, h) if h else None,
        ]
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

    def __call__(
        self,
        images: Tensor,
        boxes: list[tuple[Tensor, ...]],
        u: Tensor,
        scale: Tensor,
        shift: Tensor,
        out: list[Tensor],
    ) -> None:
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
        return self.strategy == "grouped" or (
            self.strategy == "auto" and device.type == "cpu" and self.side >= GROUPED_MIN_SIDE
        )

    def _jitter_factors(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 4) factors (ColorJitter's ranges; 0 where an op is disabled) and (N, 4) op orders, on the CPU."""
        factors = torch.zeros(u.shape[0], 4)
        for k, r in enumerate(self.ranges):
            if r is not None:
                factors[:, k] = r[0] + u[:, _FAC + k] * (r[1] - r[0])
        return factors, u[:, _ORD : _ORD + 4].argsort(dim=1)  # argsort of iid uniforms: a uniform random permutation

    def _grouped(self, images: Tensor, boxes: list, u: Tensor, scale: Tensor, shift: Tensor, out: list[Tensor]) -> None:
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
        code = (
            (perm * (4 ** torch.arange(perm.shape[1] - 1, -1, -1))).sum(1)
            if enabled
            else torch.zeros(n, dtype=torch.long)
        )
        # sort key: gray rows last, then blur rows, then jitter off (0) before each op order (1 + code < _BLUR_KEY)
        key = gray.long() * _GRAY_KEY + blur.long() * _BLUR_KEY + jit.long() * (1 + code)
        rows = torch.argsort(key, stable=True)  # sorted position -> row (view-major: row = view * batch + sample)
        where = torch.empty_like(rows).scatter_(0, rows, torch.arange(n))  # row -> sorted position
        x = torch.empty((n, images.shape[1], side, side), dtype=images.dtype, device=dev)
        for v, box in enumerate(boxes):  # each view's crops straight into their sorted rows
            _put(
                x,
                where[v * batch : (v + 1) * batch].to(dev, non_blocking=True),
                _sample_crops(images, box, side, spec.interpolation),
            )
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
                        _JITTER_OPS[op](x[c : min(b, c + step)], f[c - a : c - a + step, op])

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
            _normalise(o, x, where[v * batch : (v + 1) * batch].to(dev, non_blocking=True), scale, shift)

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

    def __init__(
        self,
        specs: Sequence[ViewSpec | Mapping[str, Any]],
        image_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        strategy: str = "auto",
        chunk: int | None = None,
    ) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be a positive number of samples or None (automatic), got {chunk}")
        if not specs:
            raise ValueError("at least one view spec is required (see conf/augment/*.yaml)")
        parsed = view_specs(specs)  # augment.views: a mapping name -> spec (in order) or a sequence of specs
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
            raise ValueError(
                f"BatchedViews expects uint8 (B, {self.in_chans}, H, W) images, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        sizes = torch.tensor(batch["sizes"], dtype=torch.long).reshape(-1, 2)
        u = self.uniforms(batch["keys"])
        dev, n = images.device, images.shape[0]
        # (v - mean) / std = v*scale+shift; non_blocking: a blocking copy would wait for all the queued device work
        scale = (1.0 / self.std).to(dev, non_blocking=True)
        shift = (-self.mean / self.std).to(dev, non_blocking=True)
        step = self.chunk_size(images) if dev.type == "cpu" else n
        views = [
            torch.empty((n, self.in_chans, f.side, f.side), device=dev)
            for f, c in zip(self.families, self.counts)
            for _ in range(c)
        ]
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        boxes = [
            f.boxes(u[a : a + c], sizes, *images.shape[-2:]) for f, c, a in zip(self.families, self.counts, starts)
        ]
        for a in range(0, n, step):
            x = images[a : a + step].float().div_(255.0)
            for family, count, start, fam_boxes in zip(self.families, self.counts, starts, boxes):
                family(
                    x,
                    [tuple(t[a : a + step] for t in box) for box in fam_boxes],
                    u[start : start + count, a : a + step],
                    scale,
                    shift,
                    [v[a : a + step] for v in views[start : start + count]],
                )
        return views, batch["labels"], batch["indices"]

    def chunk_size(self, images: Tensor) -> int:
        """Samples per chunk on the CPU: ``chunk`` if set, else as many as keep one chunk's views under ~16 MB
        (about 8 images for 2 x 224 + 6 x 96 px; a whole batch of small images). Chunks give the same views
        (every number is per sample); they only keep the working set in cache and the temporaries small enough to
        be reused, which at batch 64 of multi-crop is ~25 % faster than one pass over the batch."""
        if self.chunk is not None:
            return self.chunk
        floats = sum(c * self.in_chans * f.side**2 for f, c in zip(self.families, self.counts))
        return max(1, (1 << 22) // floats)

    def __repr__(self) -> str:
        inner = "\n".join(f"  {n} x {f.side}px {f.spec}" for f, n in zip(self.families, self.counts))
        return f"{type(self).__name__}(seed={self.seed}, [\n{inner}\n])"
