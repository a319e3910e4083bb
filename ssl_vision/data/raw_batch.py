"""Loader side of the batched backend (``augment.backend=batched``): un-augmented uint8 images and their collate.

The train loader returns *un-augmented* uint8 images (:class:`RawImages` + :func:`collate_raw`: images padded to the
batch's largest height and width, with each image's own size kept); :class:`~.batched.BatchedViews` makes the views
from such a batch once it is on the model's device (``SSLDataModule.on_after_batch_transfer``).

The loader keeps images small: an image whose shorter side exceeds ``round(8/7 * image_size)`` (256 for 224 px)
or whose longer side exceeds twice that is downscaled (PIL, antialiased) before batching. Data sets stored at the
training resolution (CIFAR, STL-10, Fashion-MNIST, synthetic) are passed through untouched. For large photos
the crops are thus taken from a 256-px version of the image rather than from the original file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from ssl_vision.data.views import _mode

__all__ = ["RAW_KEY", "ENCODED_KEY", "load_side", "RawImages", "collate_raw", "is_raw_batch"]

RAW_KEY = "raw_images"  # marks a train batch of the batched backend
ENCODED_KEY = "encoded_images"  # marks a train batch of undecoded JPEG files (data.decode=device, .encoded)


def load_side(image_size: int) -> int:
    """Shorter side above which the loader downscales: ``round(8/7 * image_size)`` (ImageNet's 256 for 224)."""
    return max(image_size, round(image_size * 8 / 7))


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
    return {
        RAW_KEY: torch.stack(images),
        "sizes": sizes,
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "keys": [(it["index"], it["epoch"]) for it in items],
    }


def is_raw_batch(batch: Any) -> bool:
    """A train batch whose views are still to be made (``batch_views``): raw images, or encoded JPEG files."""
    return isinstance(batch, Mapping) and (RAW_KEY in batch or ENCODED_KEY in batch)
