"""Data sets that yield ``(PIL.Image, int label)``: local Fashion-MNIST, CIFAR-10/100, STL-10, ImageFolder, a plain
folder of unlabeled images (label -1), synthetic.

Every data set returns PIL images so that one family of PIL transforms (``views.py``) serves all of them; the
transforms, not the data sets, decide the channel count the model sees.
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "folder", "synthetic")
SPLITS = ("train", "test")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs the files
DEFAULT_TORCHVISION_ROOT = "./data"

# IDX type byte -> numpy dtype (big-endian for multi-byte types), from the MNIST file-format description.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) into a native-endian numpy array.

    Layout: two zero bytes, a type byte, a byte with the number of dimensions ``n``, ``n`` big-endian uint32 sizes,
    then the data in C order. Images are ``(N, H, W)`` uint8, labels ``(N,)`` uint8.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type byte 0x{type_code:02x}; valid: {sorted(_IDX_DTYPES)}")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but {len(raw) - header} data bytes follow")
    # astype copies into a writable, native-endian array (torch.from_numpy rejects read-only / big-endian buffers).
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> str | None:
    """Return ``directory/stem.gz`` or ``directory/stem`` if either exists (gzip first: that is what Debian ships)."""
    for candidate in (os.path.join(directory, stem + ".gz"), os.path.join(directory, stem)):
        if os.path.isfile(candidate):
            return candidate
    return None


class InMemoryImageDataset(Dataset):
    """Grayscale images held as one uint8 tensor.

    Args:
        data: ``(N, H, W)`` uint8 images.
        targets: ``(N,)`` integer labels.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor) -> None:
        if data.ndim != 3 or data.dtype != torch.uint8:
            raise ValueError(f"data must be (N, H, W) uint8, got {tuple(data.shape)} {data.dtype}")
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} labels")
        self.data = data
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index].numpy()), int(self.targets[index])


def load_fashion_mnist(root: str | None, split: str, download: bool = False) -> Dataset:
    """Fashion-MNIST from local IDX files (``train-*`` / ``t10k-*``); 'L' mode 28x28 images, labels 0..9.

    Looks in ``root`` and in torchvision's layout ``root/FashionMNIST/raw``. Missing files fall back to torchvision's
    downloader only when ``download`` is true.
    """
    root = root or FASHION_MNIST_ROOT
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for directory in (root, os.path.join(root, "FashionMNIST", "raw")):
        paths = [_find_idx(directory, stem) for stem in stems]
        if all(paths):
            images = torch.from_numpy(read_idx(paths[0]))
            labels = torch.from_numpy(read_idx(paths[1]))
            return InMemoryImageDataset(images, labels)
    if download:
        import torchvision

        return torchvision.datasets.FashionMNIST(root, train=split == "train", download=True)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files not found: looked for {stems[0]}(.gz) and {stems[1]}(.gz) in {root!r} and "
        f"{os.path.join(root, 'FashionMNIST', 'raw')!r}. Fix: `apt-get install dataset-fashion-mnist` (installs them "
        f"in {FASHION_MNIST_ROOT}), or set data.download=true, or point data.root=... at a folder holding them."
    )


# --------------------------------------------------------------------------------------------- torchvision data sets
def _torchvision_dataset(name: str, root: str | None, split: str, download: bool, stl_unlabeled: bool) -> Dataset:
    """CIFAR-10/100 or STL-10 via torchvision; a missing download becomes a FileNotFoundError that says the fix."""
    import torchvision.datasets as tvd

    root = root or DEFAULT_TORCHVISION_ROOT
    try:
        if name == "cifar10":
            return tvd.CIFAR10(root, train=split == "train", download=download)
        if name == "cifar100":
            return tvd.CIFAR100(root, train=split == "train", download=download)
        # STL-10's 100k unlabeled images are for pretraining only; evaluation uses the 5k labeled train images.
        stl_split = "train+unlabeled" if split == "train" and stl_unlabeled else split
        return tvd.STL10(root, split=stl_split, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(
            f"{name} not found under root {os.path.abspath(root)!r} ({err}). Fix: set data.root=... to the folder "
            f"that holds it, or data.download=true to fetch it there."
        ) from err


# -------------------------------------------------------------------------------------------------------- ImageFolder
#: ``data.on_bad_image``: ``error`` stops at the first unreadable file, naming it; ``skip`` replaces it (see below)
BAD_IMAGE_POLICIES = ("error", "skip")
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# what PIL raises for a file it cannot decode: unknown format (UnidentifiedImageError is an OSError), truncated data,
# broken headers (some plugins raise SyntaxError / ValueError / EOFError), an absurd size (DecompressionBombError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image file that cannot be read; the message names the file and the fix."""


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert a PIL image of any mode to ``mode`` ('RGB' or 'L').

    16-bit and 32-bit integer images ('I;16*', 'I': how PIL opens 16-bit PNG / TIFF) are scaled from [0, 65535] to
    8 bits (``v // 257``); PIL's own ``convert`` would clip them at 255, turning a 16-bit image nearly white.
    Float images ('F') are clipped to [0, 255]. CMYK, palette, 1-bit, YCbCr and alpha modes go through PIL's convert
    (alpha is dropped, as torchvision's ``pil_loader`` does).
    """
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


class PILLoader:
    """Open an image file and convert it to ``mode`` (a class, not a lambda, so DataLoader workers can pickle it).

    A file PIL cannot decode (corrupt, truncated, zero bytes, not an image) raises :class:`BadImageError` naming it.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img.load()  # decode now, inside the try: PIL opens lazily
                return to_mode(img, self.mode)
        except _DECODE_ERRORS as err:
            size = os.path.getsize(path) if os.path.exists(path) else None
            raise BadImageError(
                f"cannot read image {path!r} ({size} bytes): {type(err).__name__}: {err}. Fix or remove the file, or "
                f"set data.on_bad_image=skip to replace unreadable images by the next readable one (with a warning)"
            ) from err


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder, images converted to ``mode`` (:func:`to_mode`), unreadable files per policy.

    ``on_bad_image="error"``: reading an unreadable file raises :class:`BadImageError` naming it (from a
    DataLoader worker, PyTorch re-raises it in the main process with the same message).
    ``on_bad_image="skip"``: the sample is replaced by the next readable one (index + 1, + 2, ... cyclically),
    the same for any worker count, so runs stay reproducible; each process warns once per bad file with its
    count so far (``bad_files`` holds them). Files are checked when read, not scanned up front: a scan would
    decode (or at least stat) every file before training -- minutes on ImageNet over a network file system.
    """

    def __init__(self, root: str, mode: str, on_bad_image: str = "error") -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image={on_bad_image!r}; valid: {', '.join(BAD_IMAGE_POLICIES)}")
        super().__init__(root, loader=PILLoader(mode))
        self.on_bad_image = on_bad_image
        self.bad_files: dict[str, str] = {}  # path -> reason, in this process

    def __getitem__(self, index: int):
        if self.on_bad_image == "error":
            return super().__getitem__(index)
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            try:
                return super().__getitem__(j)
            except BadImageError as err:
                path = self.samples[j][0]
                if path not in self.bad_files:
                    self.bad_files[path] = str(err)
                    warnings.warn(
                        f"data.on_bad_image=skip: skipped unreadable image {path!r} (sample {j}), using "
                        f"the next readable one; {len(self.bad_files)} bad file(s) so far in this "
                        f"process. {err.__cause__}",
                        stacklevel=2,
                    )
        raise BadImageError(f"imagefolder {self.root!r}: none of its {n} images can be read")


def _image_folder(
    root: str | None,
    split: str,
    in_chans: int,
    num_classes: int,
    train_dir: str,
    val_dir: str,
    on_bad_image: str = "error",
    key: str = "data.root",
):
    if root is None:
        raise ValueError(f"imagefolder needs {key}=... (a folder with train/ and val/ class sub-folders)")
    folder = os.path.join(root, train_dir if split == "train" else val_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"imagefolder: {folder!r} does not exist. Fix: set {key}=... to a folder containing "
            f"{train_dir}/ and {val_dir}/ (one sub-folder per class), or data.train_dir / data.val_dir."
        )
    try:
        ds = CheckedImageFolder(folder, "L" if in_chans == 1 else "RGB", on_bad_image)
    except FileNotFoundError as err:  # torchvision: no class folder, or class folders without image files
        raise FileNotFoundError(
            f"imagefolder: {folder!r} holds no usable images ({err}). Fix: one sub-folder per class with the images "
            f"in it ({folder}/<class>/<name>.jpg), or point {key}=... at such a folder."
        ) from err
    if len(ds.classes) != num_classes:
        raise ValueError(
            f"imagefolder: {folder!r} has {len(ds.classes)} class folders but data.num_classes={num_classes}"
        )
    return ds


# ------------------------------------------------------------------------------------------- unlabeled image folder
#: label of every image of an unlabeled folder (the online probe and the kNN skip labels < 0)
UNLABELED = -1


def list_image_files(root: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
    """Every file under ``root`` (recursively, symlinked folders followed) whose name ends in one of
    ``extensions`` (any case), in sorted path order; hidden files and folders (names starting with ".", e.g.
    ``.ipynb_checkpoints``, macOS ``._x.jpg``) are left out.

    A missing ``root``, a file given as ``root`` and a folder without any image file are errors that name the folder
    and the accepted extensions."""
    if not os.path.exists(root):
        raise FileNotFoundError(
            f"data=folder: data.root={root!r} does not exist. Fix: set data.root=... to a folder "
            f"of images (any layout, sub-folders included; {', '.join(extensions)})"
        )
    if not os.path.isdir(root):
        raise NotADirectoryError(
            f"data=folder: data.root={root!r} is a file, not a folder. Fix: set data.root=... "
            f"to the folder that holds the images"
        )
    files, skipped = [], 0
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            if name.lower().endswith(extensions):
                files.append(os.path.join(directory, name))
            else:
                skipped += 1
    if not files:
        raise FileNotFoundError(
            f"data=folder: no image files under {os.path.abspath(root)!r} (searched its sub-folders too; "
            f"{skipped} other file(s) found). Accepted extensions: {', '.join(extensions)} (any case). Fix: point "
            f"data.root=... at the folder that holds the images"
        )
    return sorted(files)


class UnlabeledImageFolder(CheckedImageFolder):
    """Every image file under ``root``, flat or in nested folders of any depth, as ``(PIL image, -1)``.

    For pretraining on images without labels: no ``train/`` / ``val/`` split and no class folders are needed
    (sub-folders are only where the files are). Files in sorted path order (:func:`list_image_files`), converted to
    ``mode`` and unreadable ones handled per ``on_bad_image`` as in :class:`CheckedImageFolder`.
    """

    def __init__(self, root: str, mode: str, on_bad_image: str = "error") -> None:
        super().__init__(root, mode, on_bad_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return [], {}

    def make_dataset(
        self,
        directory: str,
        class_to_idx: dict[str, int],
        extensions=None,
        is_valid_file=None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        return [(path, UNLABELED) for path in list_image_files(str(directory))]


def folder_eval_root_sets(
    eval_root: str | None,
    in_chans: int,
    num_classes: int,
    train_dir: str = "train",
    val_dir: str = "val",
    on_bad_image: str = "error",
) -> tuple[Dataset, Dataset] | None:
    """The labelled kNN bank and test set of ``data=folder``: ImageFolders ``eval_root/train_dir`` and
    ``eval_root/val_dir`` (one sub-folder per class), or None without ``eval_root`` (no labelled evaluation)."""
    if eval_root is None:
        return None
    return tuple(
        _image_folder(eval_root, split, in_chans, num_classes, train_dir, val_dir, on_bad_image, key="data.eval_root")
        for split in ("train", "test")
    )


# ---------------------------------------------------------------------------------------------------------- synthetic
class SyntheticDataset(Dataset):
    """Deterministic images whose class is visible in the pixels, for tests, smoke runs and benchmarks without files.

    Class ``c`` sets the mean intensity (graded from dark to bright) and the stripe frequency and orientation; each
    sample draws a random stripe phase, a random colour tint (a nuisance that colour jitter teaches invariance to) and
    Gaussian noise. The class -> pattern mapping is the same in every split; everything random depends only on
    ``seed`` and the index, so every call, in any process or DataLoader worker, returns the same image. Raw-pixel
    1-NN on 32-px images reaches roughly 80-90 % (chance 1/K): clearly learnable, yet not saturated, so pretraining
    has room to help.

    Fast enough never to bound a benchmark (about 15 000 224-px images per second on one CPU thread): all
    per-sample numbers (phase, tint, noise offset) are drawn at construction for the whole set in one vectorised
    draw, and the noise comes from a small bank of Gaussian noise tiles drawn once per seed; an image is then one
    stripe row (``image_size`` values, tinted) added to a shifted window of one noise tile, a single uint8 pass. The
    noise is clipped to +-``NOISE_CLIP`` and the tinted stripes to [``NOISE_CLIP``, 255 - ``NOISE_CLIP``] so that the
    sum never leaves [0, 255] (no clipping pass per image). Channels are made as planes and merged by PIL.
    """

    NOISE_STD = 60.0  # grey levels (before the clip)
    NOISE_CLIP = 50  # the noise is clipped to +-this, the tinted stripes to [this, 255 - this]
    NOISE_TILES = 16  # tiles in the noise bank (each image_size + margin square)

    def __init__(self, size: int, image_size: int, in_chans: int, num_classes: int, seed: int) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"synthetic: in_chans must be 1 or 3, got {in_chans}")
        if size < 1 or num_classes < 1 or image_size < 1:
            raise ValueError(
                f"synthetic: size, num_classes, image_size must be >= 1, got {size}, {num_classes}, {image_size}"
            )
        self.image_size, self.in_chans, self.num_classes, self.seed = image_size, in_chans, num_classes, seed
        rng = np.random.default_rng(seed)
        labels = np.arange(size) % num_classes  # balanced: every class present when size >= num_classes
        rng.shuffle(labels)
        self.targets = labels.tolist()
        self._labels = labels
        self._level = 78.0 + 100.0 * np.arange(num_classes) / max(num_classes - 1, 1)  # mean grey 78..178
        # every sample's random numbers at once (the same whatever reads them, and in what order)
        margin = max(1, image_size // 4)
        self._phase = rng.uniform(0, 2 * np.pi, size)
        self._tint = rng.uniform(0.5, 1.0, (size, in_chans))
        self._tile = rng.integers(0, self.NOISE_TILES, size)
        self._offset = rng.integers(0, margin, (size, 2))
        r = self.NOISE_CLIP
        noise = np.random.default_rng((seed, 1)).normal(
            0.0, self.NOISE_STD, (self.NOISE_TILES, in_chans, image_size + margin, image_size + margin)
        )
        self._noise = (np.clip(np.rint(noise), -r, r) + r).astype(np.uint8)  # stored shifted by +r: [0, 2r]
        self._coords = 2 * np.pi * np.arange(image_size) / image_size

    def __len__(self) -> int:
        return len(self.targets)

    def image_array(self, index: int) -> np.ndarray:
        """Sample ``index`` as a ``(in_chans, image_size, image_size)`` uint8 array (channel planes)."""
        label, s, r = int(self._labels[index]), self.image_size, self.NOISE_CLIP
        wave = np.sin((1 + label % 4) * self._coords + self._phase[index])  # stripe frequency 1..4 per class
        profile = self._tint[index][:, None] * (self._level[label] + 40.0 * wave)  # (C, s) tinted stripe profile
        profile = (np.clip(np.rint(profile), r, 255 - r) - r).astype(np.uint8)  # + noise in [0, 2r]: in [0, 255]
        # vertical stripes vary along x, horizontal ones along y; per channel plane, so numpy's inner loop runs
        # over a whole contiguous image row either way
        profile = profile[:, None, :] if (label // 4) % 2 == 0 else profile[:, :, None]
        dy, dx = self._offset[index]
        return np.add(self._noise[self._tile[index], :, dy : dy + s, dx : dx + s], profile)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        planes = self.image_array(index)
        if self.in_chans == 1:
            return Image.fromarray(planes[0]), self.targets[index]
        return Image.merge("RGB", [Image.fromarray(p) for p in planes]), self.targets[index]


# -------------------------------------------------------------------------------------------------------- entry point
def build_dataset(
    name: str,
    split: str,
    root: str | None,
    download: bool = False,
    image_size: int = 32,
    in_chans: int = 3,
    num_classes: int = 10,
    synthetic_size: int = 512,
    train_dir: str = "train",
    val_dir: str = "val",
    stl_unlabeled: bool = False,
    on_bad_image: str = "error",
) -> Dataset:
    """Build a data set of ``(PIL.Image, int label)`` items.

    Args:
        name: one of ``DATASET_NAMES``.
        split: "train" or "test" (for imagefolder, "test" reads ``val_dir``; ``folder``, unlabeled images, has
            only "train": its labelled evaluation sets come from :func:`folder_eval_root_sets`).
        root: data folder; ``None`` means the Debian Fashion-MNIST folder or ``./data`` for torchvision sets.
        download: let torchvision fetch missing files.
        image_size, in_chans, num_classes, synthetic_size: used by ``synthetic`` (``in_chans`` also picks the
            ImageFolder mode, ``num_classes`` is checked against the ImageFolder classes).
        train_dir, val_dir: ImageFolder sub-folders.
        stl_unlabeled: STL-10 train split becomes ``train+unlabeled`` (105k images, label -1 for unlabeled);
            for pretraining only, never for evaluation.
        on_bad_image: ImageFolder only (the other sets are arrays): ``error`` or ``skip`` unreadable files.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split, download)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision_dataset(name, root, split, download, stl_unlabeled)
    if name == "imagefolder":
        return _image_folder(root, split, in_chans, num_classes, train_dir, val_dir, on_bad_image)
    if name == "folder":
        if split != "train":
            raise ValueError(
                f"data=folder images carry no labels, so there is no {split!r} split to evaluate on. Fix: give a "
                f"labelled set with data.eval_root=<folder with {train_dir}/ and {val_dir}/ class sub-folders> when "
                f"pretraining, or evaluate a checkpoint with data=imagefolder data.root=<that folder> "
                f"data.num_classes=<its class count>"
            )
        if root is None:
            raise ValueError("data=folder needs data.root=<a folder of images> (flat or nested, no labels needed)")
        return UnlabeledImageFolder(root, "L" if in_chans == 1 else "RGB", on_bad_image)
    # Test set: another seed (no overlap in noise) and a quarter of the size, but at least one image per class.
    size = synthetic_size if split == "train" else max(synthetic_size // 4, num_classes)
    return SyntheticDataset(size, image_size, in_chans, num_classes, seed=0 if split == "train" else 1)


def take_subset(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """Deterministic random subset of ``min(n, len(ds))`` items (``ds`` itself when ``n`` is None or covers it all).

    Indices are sorted so that reading stays sequential on disk-backed data sets.
    """
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"subset size must be >= 1 or null, got {n}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(ds), generator=generator)[:n].sort().values.tolist()
    return Subset(ds, indices)


class IndexedDataset(Dataset):
    """Wrap a ``(img, label)`` data set to return ``(transform(img), label, index)``.

    The index is the position in *this* data set; InstDisc uses it to address its memory bank.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Any] | None = None) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img, label = self.base[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label), index
