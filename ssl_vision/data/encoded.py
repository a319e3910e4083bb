"""JPEG decoding on the model's device (``data.decode=device``, with ``augment.backend=batched``).

With ``data.decode=host`` (default) the loader workers open every image with PIL. With ``data.decode=device`` they
only read each file's bytes (:class:`EncodedImages`: a variable-length uint8 tensor, plus label and index);
:func:`collate_encoded` keeps them as a list, out of Lightning's reach (the bytes stay in host memory, where
``torchvision.io.decode_jpeg`` wants them); and :class:`DeviceDecodedViews` -- the datamodule's ``batch_views``,
called by ``SSLDataModule.on_after_batch_transfer`` -- decodes the whole batch with one batched ``decode_jpeg(list,
device=...)`` call (nvjpeg on CUDA; libjpeg-turbo on the CPU, which is what tests use), brings each image to the
size the host path would give it and hands the padded uint8 batch to :class:`~.batched.BatchedViews`.

What a sample becomes is the host batched path's (:class:`~.batched.RawImages` + :func:`~.batched.collate_raw`):

* the same mode (``ImageReadMode.RGB`` or ``GRAY`` for ``in_chans`` 1; grayscale and CMYK JPEGs are converted by
  the decoder as PIL converts them);
* the same size: an image whose shorter side exceeds ``load_side(image_size)`` (or whose longer side exceeds twice
  that) is downscaled to the same ``round(side * factor)`` size, with an antialiased bilinear resize (what PIL's
  ``BILINEAR`` resize computes, up to rounding); smaller images are left as decoded;
* hence the same crop boxes, flips and colour parameters, all drawn from ``(seed, epoch, index)`` by
  ``BatchedViews`` on each image's own size (images are padded to the batch's largest by repeating their last
  row / column, and the boxes never reach the padding). Pixels match the host path up to the decoders' and
  resizers' rounding (libjpeg-turbo in both PIL and torchvision's CPU decoder gives the same bytes).

Bad files follow ``data.on_bad_image`` as with PIL. A worker rejects a file that is not a JPEG (its first bytes
are not a JPEG start-of-image marker, or no frame header comes before the image data: a PNG, an empty or truncated
file); a file that passes that check but fails to decode is found when the batch is decoded. ``error`` raises
:class:`~.datasets.BadImageError` naming the file; ``skip`` warns once per file and uses the next readable one
(index + 1, + 2, ... cyclically: a worker for a non-JPEG, the training process for one that fails to decode),
keeping the sample's own index and augmentation key: the same rule as the host path, so a run is as reproducible.
Readable here means decodable as a JPEG: PNG and other formats need ``data.decode=host``.

On CUDA the batch is decoded by nvjpeg in one call; if that call fails the images are decoded one by one, and
four-channel (CMYK / YCCK) JPEGs and any image nvjpeg refuses are decoded on the CPU and moved to the device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_vision.data.batched import ENCODED_KEY, RAW_KEY, BatchedViews
from ssl_vision.data.datasets import BAD_IMAGE_POLICIES, BadImageError

__all__ = [
    "DECODE_MODES",
    "EncodedImages",
    "EncodedFiles",
    "collate_encoded",
    "DeviceDecodedViews",
    "jpeg_header",
    "image_files",
    "decode_jpegs",
    "fit_and_pad",
]

#: ``data.decode``: ``host`` (PIL in the loader workers) or ``device`` (this module)
DECODE_MODES = ("host", "device")
_SOI = b"\xff\xd8"
# start-of-frame markers: 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field
_SOS, _EOI = 0xDA, 0xD9


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """``(height, width, components)`` of a JPEG file's frame header, or None when ``data`` is not a JPEG file
    (no start-of-image marker) or reaches the image data / its end without a frame header."""
    data = memoryview(data)
    if bytes(data[:2]) != _SOI:
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (_SOS, _EOI):
            return None
        if marker in _SOF:
            if i + 10 > n:
                return None
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return height, width, int(data[i + 9])
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def image_files(ds: Dataset) -> list[tuple[str, int]]:
    """``(path, label)`` of every item of an ImageFolder data set, or of a ``Subset`` (of a ``Subset`` ...) of one."""
    if isinstance(ds, Subset):
        inner = image_files(ds.dataset)
        return [inner[int(i)] for i in ds.indices]
    if isinstance(ds, ImageFolder):
        return [(str(p), int(c)) for p, c in ds.samples]
    raise ValueError(
        f"data.decode=device reads image files and needs an ImageFolder data set (data=imagefolder or "
        f"data=imagenet), got {type(ds).__name__}; use data.decode=host for this data set"
    )


def _not_jpeg(data: bytes) -> str | None:
    """Why ``data`` cannot be decoded as a JPEG (None if its header is fine)."""
    if not data:
        return "empty file"
    if data[:2] != _SOI:
        return f"not a JPEG file (starts with {data[:4].hex(' ')}; data.decode=device decodes JPEG only)"
    if jpeg_header(data) is None:
        return "no JPEG frame header before the image data (truncated or corrupt file)"
    return None


def _bad_image(path: str, reason: str) -> BadImageError:
    size = os.path.getsize(path) if os.path.exists(path) else None
    return BadImageError(
        f"cannot read image {path!r} ({size} bytes) with data.decode=device: {reason}. Fix or remove the file, set "
        f"data.decode=host (PIL reads any image format), or set data.on_bad_image=skip to replace unreadable images "
        f"by the next readable one (with a warning)"
    )


class EncodedImages(Dataset):
    """``dataset[(index, epoch)] -> {"data": uint8 (n_bytes,), "label", "index", "epoch", "source", "components"}``.

    The bytes of the file at ``index`` of ``base`` (an ImageFolder or a subset of one), not decoded. ``source`` is
    the position of the file actually read (``index`` unless ``on_bad_image=skip`` replaced a non-JPEG file by the
    next one), ``components`` the JPEG's channel count (1 gray, 3 YCbCr / RGB, 4 CMYK / YCCK). The training process
    also uses it to find the replacement of a file that fails to decode (:meth:`replacement`).
    """

    def __init__(self, base: Dataset, on_bad_image: str = "error") -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image={on_bad_image!r}; valid: {', '.join(BAD_IMAGE_POLICIES)}")
        self.files = image_files(base)
        self.on_bad_image = on_bad_image
        self.bad_files: dict[str, str] = {}  # path -> reason, in this process

    def __len__(self) -> int:
        return len(self.files)

    def read(self, pos: int) -> tuple[bytes, str | None]:
        """The file's bytes and why they cannot be decoded as a JPEG (None when the header is fine)."""
        try:
            with open(self.files[pos][0], "rb") as f:
                data = f.read()
        except OSError as err:  # vanished, unreadable: a bad image, as PIL's open failing is on the host path
            return b"", f"cannot open the file: {type(err).__name__}: {err}"
        return data, _not_jpeg(data)

    def __getitem__(self, key) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (int(key), 0)
        index, n = int(index), len(self.files)
        for step in range(n):
            pos = (index + step) % n
            data, reason = self.read(pos)
            if reason is None:
                break
            self.reject(pos, reason)
        else:
            raise BadImageError(
                f"imagefolder: none of its {n} images can be read as JPEG (data.decode=device); "
                f"use data.decode=host for other formats"
            )
        comps = jpeg_header(data)[2]  # type: ignore[index]
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return {
            "data": tensor,
            "label": self.files[pos][1],
            "index": index,
            "epoch": int(epoch),
            "source": pos,
            "components": comps,
        }

    def reject(self, pos: int, reason: str) -> None:
        """A file that cannot be read: :class:`BadImageError` (``error``) or a warning, once per file (``skip``)."""
        path = self.files[pos][0]
        if self.on_bad_image == "error":
            raise _bad_image(path, reason)
        if path not in self.bad_files:
            self.bad_files[path] = reason
            warnings.warn(
                f"data.on_bad_image=skip: skipped unreadable image {path!r} (sample {pos}), using the next "
                f"readable one; {len(self.bad_files)} bad file(s) so far in this process. {reason}",
                stacklevel=2,
            )

    def replacement(self, pos: int, mode: ImageReadMode) -> tuple[Tensor, int, int]:
        """The next file after ``pos`` (cyclically) that decodes: ``(image on the CPU, label, its position)``."""
        n = len(self.files)
        for step in range(1, n):
            j = (pos + step) % n
            data, reason = self.read(j)
            if reason is None:
                try:
                    return (
                        decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], mode, "cpu")[0],
                        self.files[j][1],
                        j,
                    )
                except RuntimeError as err:
                    reason = f"JPEG decoding failed: {err}"
            self.reject(j, reason)
        raise BadImageError(
            f"imagefolder: none of its {n} images can be decoded as JPEG (data.decode=device); use "
            f"data.decode=host for other formats"
        )


class EncodedFiles:
    """A batch's encoded files, kept together and on the CPU: ``data`` (uint8 tensors), ``sources`` (positions of
    the files read) and ``components``. Deliberately neither a tensor, a sequence nor a dataclass, and without a
    ``to`` method, so that Lightning's transfer to the device leaves it where the decoder wants it."""

    def __init__(self, data: list[Tensor], sources: list[int], components: list[int]) -> None:
        self.data, self.sources, self.components = data, sources, components

    def __len__(self) -> int:
        return len(self.data)


def collate_encoded(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{ENCODED_KEY: EncodedFiles, "labels": (B,), "indices": (B,), "keys": [(index, epoch), ...]}``."""
    return {
        ENCODED_KEY: EncodedFiles(
            [it["data"] for it in items], [int(it["source"]) for it in items], [int(it["components"]) for it in items]
        ),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "keys": [(int(it["index"]), int(it["epoch"])) for it in items],
    }


def decode_jpegs(data: list[Tensor], mode: ImageReadMode, device: str | torch.device) -> list[Tensor]:
    """``torchvision.io.decode_jpeg(list, mode, device)``; its deprecation notice (torchvision 0.29 points to
    TorchCodec) is silenced here, where it would repeat every batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision")
        return decode_jpeg(data, mode=mode, device=device)


def fit_and_pad(images: Sequence[Tensor], max_short: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Decoded uint8 (C, h, w) images -> uint8 (B, C, H, W) and each image's own (h, w), as the host path makes
    them: an image whose shorter side exceeds ``max_short`` (or whose longer side exceeds ``2 * max_short``) is
    downscaled (antialiased bilinear) exactly to :class:`~.batched.RawImages`' size, then every image is padded to
    the batch's largest height and width by repeating its last row / column (:func:`~.batched.collate_raw`)."""
    sizes = []
    for img in images:
        h, w = int(img.shape[-2]), int(img.shape[-1])
        factor = min(1.0, max_short / min(w, h), 2 * max_short / max(w, h))  # RawImages' formula, same rounding
        sizes.append((max(1, round(h * factor)), max(1, round(w * factor))) if factor < 1.0 else (h, w))
    big_h, big_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = torch.empty((len(images), images[0].shape[0], big_h, big_w), dtype=torch.uint8, device=images[0].device)
    for i, (img, (h, w)) in enumerate(zip(images, sizes)):
        if (h, w) != tuple(img.shape[-2:]):
            img = (
                F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
                .round_()
                .clamp_(0, 255)
            )
        out[i, :, :h, :w] = img
        if w < big_w:
            out[i, :, :h, w:] = out[i, :, :h, w - 1 : w]
        if h < big_h:
            out[i, :, h:, :] = out[i, :, h - 1 : h, :]
    return out, sizes


class DeviceDecodedViews:
    """Encoded batch (:func:`collate_encoded`, moved to the device) -> ``(views, labels, indices)``.

    Decodes on the device of the batch's ``labels``, fits and pads the images (:func:`fit_and_pad`) and calls
    ``views`` (a :class:`~.batched.BatchedViews`). ``source`` is the train set's :class:`EncodedImages` (set by the
    datamodule when it makes the train loader); it names bad files and finds their replacements.
    """

    def __init__(self, views: BatchedViews, in_chans: int, max_short: int, on_bad_image: str = "error") -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image={on_bad_image!r}; valid: {', '.join(BAD_IMAGE_POLICIES)}")
        self.views, self.max_short, self.on_bad_image = views, max_short, on_bad_image
        self.mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        self.source: EncodedImages | None = None

    def decode(self, files: EncodedFiles, device: torch.device) -> tuple[list[Tensor | None], dict[int, str]]:
        """Decoded images on ``device`` (None where decoding failed) and ``{position in batch: reason}``."""
        out: list[Tensor | None] = [None] * len(files)
        failed: dict[int, str] = {}
        cuda = device.type != "cpu"
        # nvjpeg handles gray and YCbCr JPEGs; four-channel ones go to the CPU decoder, which converts them
        on_device = [i for i, c in enumerate(files.components) if not cuda or c in (1, 3)]
        on_host = [i for i in range(len(files)) if i not in set(on_device)]
        if on_device:
            try:
                for i, img in zip(on_device, decode_jpegs([files.data[i] for i in on_device], self.mode, device)):
                    out[i] = img
            except RuntimeError:  # one bad file fails the whole call: find it (them)
                for i in on_device:
                    try:
                        out[i] = decode_jpegs([files.data[i]], self.mode, device)[0]
                    except RuntimeError as err:
                        if cuda:  # nvjpeg refuses some files the CPU decoder reads
                            on_host.append(i)
                        else:
                            failed[i] = f"JPEG decoding failed: {err}"
        for i in on_host:
            try:
                out[i] = decode_jpegs([files.data[i]], self.mode, "cpu")[0].to(device, non_blocking=True)
            except RuntimeError as err:
                failed[i] = f"JPEG decoding failed: {err}"
        return out, failed

    def __call__(self, batch: Mapping[str, Any]) -> tuple[list[Tensor], Tensor, Tensor]:
        files: EncodedFiles = batch[ENCODED_KEY]
        labels = batch["labels"]
        device = labels.device
        images, failed = self.decode(files, device)
        if failed:
            if self.source is None:
                raise RuntimeError(
                    "DeviceDecodedViews.source (the train set's EncodedImages) is not set: the "
                    "SSLDataModule sets it when it makes the train loader"
                )
            labels = labels.clone()
            for i, reason in sorted(failed.items()):
                self.source.reject(files.sources[i], reason)  # raises with on_bad_image=error
                img, label, _ = self.source.replacement(files.sources[i], self.mode)
                images[i] = img.to(device)
                labels[i] = label
        raw, sizes = fit_and_pad(images, self.max_short)  # type: ignore[arg-type]
        return self.views(
            {RAW_KEY: raw, "sizes": sizes, "labels": labels, "indices": batch["indices"], "keys": batch["keys"]}
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decode=device, max_short={self.max_short}, {self.views!r})"
