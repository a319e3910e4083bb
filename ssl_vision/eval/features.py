"""Frozen-backbone features for offline evaluation (docs/reference.md §10): data, extraction, an on-disk cache.

* :class:`EvalData` -- the data values evaluation needs (a subset of ``conf/data/*.yaml``), as typed fields.
* :func:`build_eval_loaders` -- train and test loaders under the deterministic eval transform, in file order.
* :func:`extract_features` -- backbone in ``eval()`` under ``torch.no_grad()``; the modules' modes are restored.
* :func:`cached_features` -- load features from ``<ckpt stem>.features.<split>.pt`` if they were computed from
  the same weights and data, else compute and store them (a plain tensor dict: safe with ``weights_only``).
* :func:`augmented_loader` -- RandomResizedCrop + flip views of the train split, seeded from (seed, epoch, index)
  so they do not depend on batch size or worker count (the linear probe's ``augment=true``).

Features do not depend on batch size or worker count beyond float rounding: the backbone is in eval mode (BN uses
running statistics, no dropout / drop-path), the order is the data set's, and augmentation is seeded per sample.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssl_vision.data import IndexedDataset, ViewSpec, build_dataset, build_eval_transform, build_view_transform
from ssl_vision.data.datasets import take_subset
from ssl_vision.data.sampling import SeededViews
from ssl_vision.eval.outputs import OPTION
from ssl_vision.progress import progress as progress_bar

__all__ = [
    "EvalData",
    "resolve_eval_data",
    "build_eval_splits",
    "build_eval_loaders",
    "augmented_loader",
    "extract_features",
    "cached_features",
    "file_sha256",
    "resolve_device",
]


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What evaluation needs to know about a data set (field names as in ``conf/data/*.yaml``)."""

    name: str
    root: str | None
    image_size: int
    in_chans: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    download: bool = False
    eval_crop_ratio: float = 1.0
    synthetic_size: int = 512
    train_dir: str = "train"
    val_dir: str = "val"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EvalData:
        """Pick the known keys of a data config (the rest, e.g. ``batch_size``, is ignored); lists become tuples."""
        values = {"root": None, **values}  # no root: the data set's default location
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n != "root" and values.get(n) is None]
        if missing:
            raise ValueError(
                f"the data config lacks {missing} (have {sorted(values)}); pick a data set with "
                f"data=<name> or add the keys with +data.<key>=..."
            )
        kw = {n: values[n] for n in fields if n in values}
        kw["mean"], kw["std"] = tuple(float(m) for m in kw["mean"]), tuple(float(s) for s in kw["std"])
        return cls(**kw)


def _datamodule_keys() -> set[str]:
    """The keyword arguments of ``SSLDataModule``: the keys of a composed ``data`` node (``DataSpec``)."""
    import inspect

    from ssl_vision.data import SSLDataModule

    return {n for n in inspect.signature(SSLDataModule.__init__).parameters if n != "self"}


def resolve_eval_data(
    stored: Mapping[str, Any],
    override: Mapping[str, Any] | None,
    backbone_in_chans: int,
    backbone_image_size: int | None = None,
) -> EvalData:
    """The checkpoint's data config ``stored`` with the keys of ``override`` replacing its values.

    ``override=None`` (``data: null`` in the tool configs) evaluates on the pretraining data; ``data=<name>`` gives a
    whole data config, ``+data.root=...`` a single key. A key neither config knows is an error; so is an
    ``in_chans`` the backbone was not built for. Another ``image_size`` only warns (ResNets pool globally and the
    ViTs are built with ``dynamic_img_size``), since evaluating at another resolution is sometimes intended.
    """
    merged = dict(stored)
    if override:
        # keys a current data config has count as known too: a checkpoint written before a data key existed
        # (e.g. ``decode``) still takes ``data=<name>``
        known = set(stored) | {f.name for f in dataclasses.fields(EvalData)} | _datamodule_keys()
        unknown = sorted(set(override) - known)
        if unknown:
            raise ValueError(f"unknown data keys {unknown}; valid keys: {', '.join(sorted(known))}")
        merged.update(override)
    if merged.get("name") == "folder" and merged.get("eval_root"):  # unlabeled pretraining images: evaluate on the
        merged = {**merged, "name": "imagefolder", "root": merged["eval_root"]}  # labelled set the run was given
    data = EvalData.from_mapping(merged)
    if data.in_chans != backbone_in_chans:
        raise ValueError(f"data.in_chans={data.in_chans} but the backbone was built for in_chans={backbone_in_chans}")
    if backbone_image_size is not None and data.image_size != backbone_image_size:
        warnings.warn(
            f"evaluating at data.image_size={data.image_size} although the backbone was pretrained at "
            f"{backbone_image_size}",
            stacklevel=2,
        )
    return data


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------- data
def build_eval_splits(data: EvalData, train_subset: int | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Untransformed ``(PIL image, label)`` train and test splits; ``train_subset`` takes a fixed random subset.

    STL-10's unlabeled images are never used here (evaluation needs labels)."""
    common = dict(
        root=data.root,
        download=data.download,
        image_size=data.image_size,
        in_chans=data.in_chans,
        num_classes=data.num_classes,
        synthetic_size=data.synthetic_size,
        train_dir=data.train_dir,
        val_dir=data.val_dir,
        stl_unlabeled=False,
    )
    train = take_subset(build_dataset(data.name, "train", **common), train_subset, seed)
    test = build_dataset(data.name, "test", **common)
    for split, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise ValueError(f"the {split} split of {data.name} is empty (root={data.root!r})")
    return train, test


def _loader(ds: Dataset, batch_size: int, num_workers: int, sampler=None) -> DataLoader:
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def build_eval_loaders(
    data: EvalData, batch_size: int, num_workers: int, train_subset: int | None = None, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of ``(img (B, C, S, S), label (B,), index (B,))`` under the eval transform
    (resize / centre crop by ``eval_crop_ratio``, normalise); file order, no shuffle, no drop_last."""
    transform = build_eval_transform(data.image_size, data.in_chans, data.mean, data.std, data.eval_crop_ratio)
    train, test = build_eval_splits(data, train_subset, seed)
    return (
        _loader(IndexedDataset(train, transform), batch_size, num_workers),
        _loader(IndexedDataset(test, transform), batch_size, num_workers),
    )


#: the linear probe's train augmentation (docs/reference.md §10.2): RandomResizedCrop + flip, no colour ops
PROBE_AUGMENT = ViewSpec(scale=(0.08, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0, flip_p=0.5)


def augmented_loader(
    train: Dataset, data: EvalData, epoch: int, seed: int, batch_size: int, num_workers: int
) -> DataLoader:
    """RandomResizedCrop(image_size) + flip views of ``train`` for one ``epoch``, in file order; each sample's
    crop is drawn from ``(seed, epoch, index)``, so it is the same for any batch size and worker count."""
    transform = build_view_transform(PROBE_AUGMENT, data.image_size, data.in_chans, data.mean, data.std)
    keys = [(i, epoch) for i in range(len(train))]  # SeededViews reads (index, epoch) keys
    return _loader(SeededViews(train, transform, seed=seed), batch_size, num_workers, sampler=keys)


# ---------------------------------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: DataLoader, device: torch.device | str, progress: Any = False, desc: str = "features"
) -> tuple[Tensor, Tensor]:
    """Run ``backbone`` over ``loader`` in ``eval()`` mode without gradients.

    Args:
        backbone: maps (B, C, H, W) -> (B, D); must already live on ``device``.
        loader: yields ``(images, labels, ...)`` batches.
        device: where the images go.
        progress: a tqdm bar (batches) on stderr: ``True``, ``False`` (default: the caller shows its own, or
            none), or ``None`` / ``"auto"``: when stderr is a terminal (:func:`ssl_vision.progress.progress_enabled`).
        desc: the bar's label.

    Returns:
        ``(features (N, D) float32 CPU, labels (N,) int64 CPU)`` in loader order. Every submodule's
        train/eval mode is restored afterwards, whatever it was.
    """
    device = torch.device(device)
    param = next(backbone.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"extract_features: the backbone is on {param.device} but device={device}; move it first")
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in progress_bar(loader, desc, progress, unit="batch"):
            images, y = batch[0], batch[1]
            f = backbone(images.to(device, non_blocking=True))
            if f.ndim != 2:
                raise ValueError(f"extract_features: the backbone returned shape {tuple(f.shape)}, expected (B, D)")
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        for m, was_training in modes:
            m.training = was_training
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------------- cache
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file: identifies the exact weights a feature cache was computed from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_features(
    cache: Path, fingerprint: dict[str, Any], compute: Callable[[], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor, str]:
    """Features from ``cache`` when its stored ``fingerprint`` equals this one, else ``compute()`` and store.

    ``fingerprint`` is a dict of plain values (weights hash, student/teacher, data, split, transform). The cache
    file is ``{"features": (N, D) float32, "labels": (N,) int64, "fingerprint": dict}``, written atomically and
    read with ``weights_only=True``. Returns ``(features, labels, "hit" | "written" | "replaced" | "not written")``;
    "not written" when the cache's folder cannot be written (read-only, full): the features are used all the same.
    """
    cache = Path(cache)
    status = "written"
    if cache.exists():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable cache is recomputed, never unpickled
            print(f"[ssl_vision] ignoring unreadable feature cache {cache}: {exc}")
            blob = {}
        if isinstance(blob, dict) and blob.get("fingerprint") == fingerprint:
            return blob["features"], blob["labels"], "hit"
        print(f"[ssl_vision] feature cache {cache} was computed from other weights or data; recomputing")
        status = "replaced"
    feats, labels = compute()
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"features": feats, "labels": labels, "fingerprint": fingerprint}, f)
        os.replace(tmp, cache)
    except OSError as exc:  # the cache only saves time: a read-only folder or a full disk must not lose the result
        tmp.unlink(missing_ok=True)
        hint = (
            f"; set {OPTION}=<a writable folder> to cache features there"
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else ""
        )
        print(
            f"[ssl_vision] feature cache {cache} not written ({exc.strerror or exc}){hint}; continuing without it",
            flush=True,
        )
        return feats, labels, "not written"
    return feats, labels, status
