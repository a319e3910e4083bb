"""Augmented views: one ``ViewSpec`` per crop family, PIL transforms in the order of the papers' code.

The presets themselves live in ``conf/augment/*.yaml`` (values from docs/reference.md §0.4), each a mapping of view
name -> ``ViewSpec`` (:mod:`ssl_vision.config_schema`, the defaults every preset starts from); this module only turns
a spec into a transform. Crop sizes are written as a ratio of the data's image size so that a recipe written for 224 px
(a 96-px local crop is ``size_ratio = 96/224``) scales to 32-px CIFAR or 96-px STL-10.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl_vision.config_schema import (
    INTERPOLATION_NAMES,
    ViewSpec,  # the schema of augment.views.<name>
    view_specs,
)

INTERPOLATIONS = {name: InterpolationMode(name) for name in INTERPOLATION_NAMES}  # nearest, bilinear, bicubic
BLUR_SIGMA = (0.1, 2.0)  # SimCLR / MoCo v2 / BYOL / DINO all draw sigma uniformly from [0.1, 2.0]


def crop_size(spec: ViewSpec, image_size: int) -> int:
    """Side of the square crop: ``round(image_size * size_ratio)``, at least 1 px."""
    return max(1, round(image_size * spec.size_ratio))


def blur_kernel_size(side: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the crop side, at least 3 (SimCLR: 224 px -> 23)."""
    return max(3, (int(0.1 * side) // 2) * 2 + 1)


class ConvertMode:
    """Convert a PIL image to 'L' or 'RGB' so the output has exactly ``in_chans`` channels (no-op if it already has)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class ResizeIfNeeded:
    """Resize the shorter side to ``size`` and centre-crop to ``size x size``, skipping both when already that size.

    Small data sets are stored at the training resolution, so the resize would only cost time.
    """

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        self.size = size
        self.resize = T.Resize(size, interpolation=interpolation)
        self.crop = T.CenterCrop(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return self.crop(self.resize(img))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size})"


def _stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[list[float], list[float]]:
    """Check normalisation statistics; a single value is broadcast (e.g. grayscale stats for RGB-converted data)."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) == 1:
        mean = mean * in_chans
    if len(std) == 1:
        std = std * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need 1 or in_chans={in_chans} values, got mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def _mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 for image transforms, got {in_chans}")
    return "L" if in_chans == 1 else "RGB"


def _maybe(transform: Callable, p: float) -> Callable | None:
    """``RandomApply`` with probability ``p``; the bare transform at p=1 and nothing at p=0."""
    if p <= 0:
        return None
    return transform if p >= 1 else T.RandomApply([transform], p=p)


def _colour_ops(spec: ViewSpec, in_chans: int) -> list[Callable]:
    """Jitter and grayscale in the papers' order; on 1-channel data only brightness and contrast remain."""
    brightness, contrast, saturation, hue = spec.jitter
    if in_chans == 1:
        saturation, hue = 0.0, 0.0  # meaningless without colour
    jitter = None
    if brightness or contrast or saturation or hue:
        jitter = _maybe(T.ColorJitter(brightness, contrast, saturation, hue), spec.jitter_p)
    gray = T.RandomGrayscale(spec.gray_p) if spec.gray_p > 0 and in_chans == 3 else None
    ordered = [gray, jitter] if spec.gray_before_jitter else [jitter, gray]
    return [op for op in ordered if op is not None]


def build_view_transform(
    spec: ViewSpec, image_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    """PIL image -> augmented ``(in_chans, S, S)`` float tensor, ``S = round(image_size * spec.size_ratio)``.

    Order (PIL, as in the papers' code): convert mode -> RandomResizedCrop -> flip -> colour jitter (RandomApply) ->
    grayscale (or grayscale -> jitter when ``gray_before_jitter``) -> Gaussian blur (RandomApply, kernel ~10% of
    ``S``, odd, sigma in [0.1, 2]) -> solarize (threshold 128) -> ToTensor -> Normalize.

    One-channel data (``in_chans == 1``): images are converted to 'L', the jitter keeps only brightness and contrast
    (saturation and hue are dropped) and there is no grayscale op. Ops with probability or strength 0 are omitted,
    and a crop with ``scale == ratio == (1, 1)`` becomes a deterministic resize + centre crop.
    """
    mean, std = _stats(mean, std, in_chans)
    side = crop_size(spec, image_size)
    interpolation = INTERPOLATIONS[spec.interpolation]
    ops: list[Callable] = [ConvertMode(_mode(in_chans))]
    if tuple(spec.scale) == (1.0, 1.0) and tuple(spec.ratio) == (1.0, 1.0):
        ops.append(ResizeIfNeeded(side, interpolation))
    else:
        ops.append(T.RandomResizedCrop(side, scale=spec.scale, ratio=spec.ratio, interpolation=interpolation))
    if spec.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(spec.flip_p))
    ops.extend(_colour_ops(spec, in_chans))
    blur = _maybe(T.GaussianBlur(blur_kernel_size(side), sigma=BLUR_SIGMA), spec.blur_p)
    if blur is not None:
        ops.append(blur)
    if spec.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=spec.solarize_p))  # PIL uint8 here, so 128 (0.5 on floats)
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class MultiView:
    """Apply each transform to the same image; returns a list of tensors in the order given (large -> small)."""

    def __init__(self, transforms: list[Callable[[Image.Image], torch.Tensor]]) -> None:
        if not transforms:
            raise ValueError("MultiView needs at least one transform")
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        groups: list[list] = []  # consecutive repeats of one transform (a spec's ``count``) are printed once
        for t in self.transforms:
            if groups and groups[-1][0] is t:
                groups[-1][1] += 1
            else:
                groups.append([t, 1])
        inner = "\n".join(f"  {n} x {t}" for t, n in groups)
        return f"{type(self).__name__}([\n{inner}\n])"


def build_multiview(
    specs: Mapping[str, ViewSpec | Mapping[str, Any]] | Sequence[ViewSpec | Mapping[str, Any]],
    image_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> MultiView:
    """One transform per view, each spec expanded ``count`` times, e.g. 2 global + 6 local crops -> 8 transforms.

    ``specs``: ``augment.views``, a mapping name -> spec (in mapping order) or a sequence of specs. Specs must be
    ordered by non-increasing crop size: multi-crop methods take the first views as the global crops and forward
    consecutive same-size views together.
    """
    if not specs:
        raise ValueError("at least one view spec is required (see conf/augment/*.yaml)")
    names = list(specs) if isinstance(specs, Mapping) else [str(i) for i in range(len(specs))]
    parsed = view_specs(specs)
    sizes = [crop_size(s, image_size) for s in parsed]
    if any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
        got = ", ".join(f"{n}: {s} px" for n, s in zip(names, sizes))
        raise ValueError(
            f"augment.views must be ordered large -> small crops (the leading views of the first size are "
            f"the global crops), got {got} at image size {image_size}"
        )
    transforms = []
    for spec in parsed:
        transform = build_view_transform(spec, image_size, in_chans, mean, std)
        transforms += [transform] * spec.count  # stateless: sharing one object still draws independent randomness
    return MultiView(transforms)


def build_eval_transform(
    image_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0
) -> T.Compose:
    """Deterministic PIL image -> ``(in_chans, image_size, image_size)`` tensor for kNN / linear evaluation.

    ``crop_ratio < 1``: Resize(round(image_size / crop_ratio)) -> CenterCrop(image_size); ImageNet's 256 -> 224 is
    ``crop_ratio = 0.875``. ``crop_ratio == 1``: resize + centre crop only when the stored image is not already
    ``image_size`` square.
    """
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    mean, std = _stats(mean, std, in_chans)
    ops: list[Callable] = [ConvertMode(_mode(in_chans))]
    if crop_ratio < 1:
        ops += [T.Resize(round(image_size / crop_ratio)), T.CenterCrop(image_size)]
    else:
        ops.append(ResizeIfNeeded(image_size))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)
