"""Lightning data module: multi-view pretraining batches plus the two evaluation loaders (kNN bank, test set)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_vision.data.batched import BatchedViews
from ssl_vision.data.datasets import (
    BAD_IMAGE_POLICIES,
    IndexedDataset,
    build_dataset,
    folder_eval_root_sets,
    take_subset,
)
from ssl_vision.data.encoded import DECODE_MODES, DeviceDecodedViews, EncodedImages, collate_encoded
from ssl_vision.data.prefetch import DevicePrefetcher
from ssl_vision.data.raw_batch import RawImages, collate_raw, is_raw_batch, load_side
from ssl_vision.data.sampling import GlobalBatchSampler, SeededViews
from ssl_vision.data.views import build_eval_transform, build_multiview, view_specs

# data without labels (data=folder, no data.eval_root) has no evaluation loaders by design (eval_skipped says why);
# Lightning's warning about the empty list would only alarm
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


class ResumableLoader(DataLoader):
    """The train loader: it starts an epoch where the trainer says the epoch stands, and starts it late.

    * **Late**: ``iter()`` returns a stub; the real iterator (the sampler's pass, the workers' prefetch) is made at
      the first ``next()``. Lightning calls ``iter()`` early -- ``trainer.estimated_stepping_batches`` in
      ``configure_optimizers`` sets up the train data before a checkpoint is restored and before the sampler gets its
      epoch -- and does not call it again for the first epoch of a resumed run; an eager iterator (always, with
      workers) would then replay epoch 0's order and augmentations.
    * **Where the trainer stands**: at that first ``next()``, ``batches_done()`` (the trainer's count of batches
      already run this epoch: 0 normally, k after a resume from a mid-epoch checkpoint) makes the sampler leave out
      the first k global batches. Lightning counts them itself, so ``len()`` stays the full epoch.
    * ``state_dict`` / ``load_state_dict`` expose the same position, so Lightning records it in checkpoints and
      treats the loader as resumable.
    * **Device prefetch** (``prefetch``, ``data.device_prefetch``): each pass, once made, is wrapped by the
      :class:`~ssl_vision.data.prefetch.DevicePrefetcher`, which copies the next batch to the GPU while the current
      step runs (a pass-through off CUDA). The position above is the trainer's count of batches run, so the batch
      read ahead is not counted.
    """

    def __init__(
        self,
        *args: Any,
        batches_done: Callable[[], int | None],
        prefetch: DevicePrefetcher | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done
        self._prefetch = prefetch

    def __iter__(self) -> _LateIterator:
        return _LateIterator(self)

    def _start(self):
        done = self._batches_done()
        if done is not None:  # None: no trainer; keep what load_state_dict set
            self.sampler.skip_batches(done)
        passing = super().__iter__()
        return passing if self._prefetch is None else self._prefetch.wrap(passing)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict(self._batches_done() or 0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class _LateIterator:
    """Makes the loader's real iterator at the first ``next()`` (see :class:`ResumableLoader`)."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self) -> _LateIterator:
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = self.loader._start()
        return next(self.iterator)

    def __len__(self) -> int:
        return len(self.loader)


class SSLDataModule(L.LightningDataModule):
    """Pretraining and evaluation data for one data set.

    Train batches: ``(views, labels, indices)`` with ``views`` a list of ``(B, C, H, W)`` tensors ordered as in
    ``views`` (large -> small), ``labels`` ``(B,)`` (-1 for unlabeled STL-10 images) and ``indices`` ``(B,)`` positions
    in the pretraining train set (InstDisc's memory-bank rows). Validation: ``[kNN bank loader, test loader]``, both
    with the deterministic eval transform and items ``(img (B, C, H, W), label (B,), index (B,))``.

    Args mirror ``conf/data/*.yaml`` plus ``views`` (``conf/augment/*.yaml``) and ``seed`` (subset choice). The
    augmentation backend (``augment.backend``) is chosen with :meth:`with_backend`.
    """

    def __init__(
        self,
        *,
        name: str,
        root: str | None,
        image_size: int,
        in_chans: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        num_workers: int,
        views: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
        download: bool = False,
        train_subset: int | None = None,
        knn_train_subset: int | None = 10000,
        eval_crop_ratio: float = 1.0,
        synthetic_size: int = 512,
        stl_unlabeled: bool = False,
        train_dir: str = "train",
        val_dir: str = "val",
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        on_bad_image: str = "error",
        decode: str = "host",
        eval_root: str | None = None,
        device_prefetch: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not isinstance(device_prefetch, bool):
            raise ValueError(f"data.device_prefetch must be true or false, got {device_prefetch!r}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image={on_bad_image!r}; valid: {', '.join(BAD_IMAGE_POLICIES)}")
        self.on_bad_image = on_bad_image
        if decode not in DECODE_MODES:
            raise ValueError(f"data.decode={decode!r}; valid: {', '.join(DECODE_MODES)}")
        if decode == "device" and name not in ("imagefolder", "folder"):
            raise ValueError(
                f"data.decode=device decodes JPEG files of an ImageFolder (data=imagefolder, "
                f"data=imagenet or data=folder); data {name!r} needs data.decode=host"
            )
        if eval_root is not None and name != "folder":
            raise ValueError(
                f"data.eval_root is the labelled evaluation set of data=folder; data {name!r} "
                f"evaluates on its own test split: remove data.eval_root"
            )
        self.eval_root = eval_root  # data=folder: labelled train/ and val/ class folders for kNN and the probe
        self.decode = decode  # host: PIL in the loader workers; device: JPEG bytes to the device (.encoded)
        self.name, self.root, self.download = name, root, download
        self.image_size, self.in_chans, self.num_classes = image_size, in_chans, num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        # Persistent workers need workers; Lightning / DataLoader reject the flag with num_workers == 0.
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_subset, self.knn_train_subset, self.seed = train_subset, knn_train_subset, seed
        self.synthetic_size, self.stl_unlabeled = synthetic_size, stl_unlabeled
        self.train_dir, self.val_dir = train_dir, val_dir
        # Built now so that a bad augmentation config fails at construction, before any data is read.
        self.train_transform = build_multiview(views, image_size, in_chans, mean, std)
        self.views, self.mean, self.std = view_specs(views), mean, std  # augment.views: name -> spec, in order
        self.backend, self.batch_views = "per_sample", None
        self.labeled_on_host: int | None = None  # labelled samples of the current train batch (host count)
        self.eval_transform = build_eval_transform(image_size, in_chans, mean, std, eval_crop_ratio)
        self.train_dataset: Dataset | None = None  # untransformed (img, label) items, after train_subset
        self.knn_train_dataset: Dataset | None = None  # labeled train images for the kNN bank
        self.test_dataset: Dataset | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, samples seen) of a resume under another batch
        # data.device_prefetch: the next train batch copied to the GPU while the step runs (CUDA only; .prefetch)
        self.device_prefetch = device_prefetch
        self.prefetcher = DevicePrefetcher(self._train_device) if device_prefetch else None

    def with_backend(self, backend: str) -> SSLDataModule:
        """``per_sample`` (default): views made image by image in the loader workers (PIL, :mod:`.views`).
        ``batched``: train batches are raw uint8 images (``collate_raw``) and :attr:`batch_views` turns them into
        ``(views, labels, indices)`` on the model's device (this data module's :meth:`on_after_batch_transfer`); see
        :mod:`.batched`. With ``decode="device"`` (``data.decode``, ImageFolder JPEGs; needs ``batched``) the train
        batches hold the files' bytes and :attr:`batch_views` decodes them on that device first (:mod:`.encoded`).
        Returns ``self``."""
        if backend not in ("per_sample", "batched"):
            raise ValueError(f"augment.backend must be 'per_sample' or 'batched', got {backend!r}")
        self._check_decode(backend)
        self.backend = backend
        self.batch_views = (
            None
            if backend == "per_sample"
            else BatchedViews(self.views, self.image_size, self.in_chans, self.mean, self.std, self.seed)
        )
        if self.decode == "device":  # JPEG bytes are decoded where the views are made (see .encoded)
            self.batch_views = DeviceDecodedViews(
                self.batch_views, self.in_chans, load_side(self.image_size), self.on_bad_image
            )
        return self

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a train batch's labelled samples while its labels are still on the host (or, when
        ``data.device_prefetch`` moved them already, from the host tensor they were copied from):
        :attr:`labeled_on_host`, which the online linear probe reads instead of counting on the device (a host-device
        sync per step)."""
        self.labeled_on_host = None
        trainer = self.trainer
        if trainer is not None and trainer.training:
            labels = (
                batch.get("labels")
                if isinstance(batch, Mapping)
                else (batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 3 else None)
            )
            prefetcher = self.prefetcher
            host = prefetcher.host_copy(labels) if prefetcher is not None and torch.is_tensor(labels) else None
            labels = labels if host is None else host  # prefetched to the device: the host tensor it came from
            if torch.is_tensor(labels) and labels.device.type == "cpu":
                self.labeled_on_host = int((labels >= 0).sum())
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``augment.backend=batched``: a train batch of raw uint8 images (or undecoded JPEG files) becomes
        ``(views, labels, indices)`` here, once Lightning has moved it to the model's device (:attr:`batch_views`)."""
        if not is_raw_batch(batch):
            return batch
        if self.batch_views is None:
            raise RuntimeError(
                f"a raw-image train batch reached the model but SSLDataModule has augment.backend="
                f"{self.backend!r}; build it with .with_backend('batched')"
            )
        return self.batch_views(batch)

    def _check_decode(self, backend: str) -> None:
        if self.decode == "device" and backend != "batched":
            raise ValueError(
                f"data.decode=device needs augment.backend=batched (the images are decoded on the "
                f"model's device and the views made there), got augment.backend={backend}; set "
                f"augment.backend=batched, or data.decode=host to decode with PIL in the loader workers"
            )

    def _build(self, split: str, stl_unlabeled: bool = False) -> Dataset:
        return build_dataset(
            self.name,
            split,
            self.root,
            download=self.download,
            image_size=self.image_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            synthetic_size=self.synthetic_size,
            train_dir=self.train_dir,
            val_dir=self.val_dir,
            stl_unlabeled=stl_unlabeled,
            on_bad_image=self.on_bad_image,
        )

    def prepare_data(self) -> None:
        """Download once (rank 0 only, called by Lightning) so that ``setup`` on every rank finds the files."""
        if self.download:
            self._build("train", self.stl_unlabeled)
            self._build("test")

    def setup(self, stage: str | None = None) -> None:
        """Build the data sets once; later calls (one per Lightning stage) are no-ops."""
        if self.train_dataset is not None:
            return
        train = self._build("train", self.stl_unlabeled)
        self.train_dataset = take_subset(train, self.train_subset, self.seed)
        if self.name == "folder":  # unlabeled images: kNN bank and test set only from a labelled data.eval_root
            evaluation = folder_eval_root_sets(
                self.eval_root, self.in_chans, self.num_classes, self.train_dir, self.val_dir, self.on_bad_image
            )
            if evaluation is None:
                return
            labeled_train, self.test_dataset = evaluation
        else:
            # STL-10's unlabeled images have label -1; the kNN bank must hold only the labeled train images.
            labeled_train = self._build("train") if self.stl_unlabeled and self.name == "stl10" else train
            self.test_dataset = self._build("test")
        self.knn_train_dataset = take_subset(labeled_train, self.knn_train_subset, self.seed)

    @property
    def eval_skipped(self) -> str | None:
        """Why there is no kNN / probe evaluation (``data=folder`` without ``data.eval_root``), or None."""
        if self.name == "folder" and self.eval_root is None:
            return (
                "data=folder holds unlabeled images and no labelled evaluation set was given: kNN and the "
                "linear probe need one; set data.eval_root=<folder with train/ and val/ class sub-folders> "
                "(and data.num_classes), or evaluate a checkpoint later with tools/knn_eval.py data=imagefolder "
                "data.root=<labelled folder> data.num_classes=<N>"
            )
        return None

    @property
    def num_train_samples(self) -> int:
        """Length of the pretraining train set (after ``train_subset``): InstDisc's memory-bank size."""
        return len(self._require(self.train_dataset))

    def _require(self, ds: Dataset | None) -> Dataset:
        if ds is None:
            raise RuntimeError("SSLDataModule.setup() must be called before using the data sets")
        return ds

    def _loader(self, ds: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,  # queues and BatchNorm need full batches; evaluation must see every image
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, ``drop_last`` batches of ``(list of views, labels, indices)`` (see :mod:`.sampling`)."""
        train = self._require(self.train_dataset)
        if len(train) == 0:
            raise ValueError(f"the {self.name} train set is empty (root={self.root!r})")
        if len(train) < self.batch_size:
            raise ValueError(
                f"the {self.name} train set has {len(train)} samples, fewer than one batch of data.batch_size="
                f"{self.batch_size}, so drop_last would yield no batches; use a smaller data.batch_size "
                f"(or a larger data.train_subset / data.synthetic_size)."
            )
        # Data order from (seed, epoch) over the *global* batch and augmentation from (seed, epoch, index):
        # identical for any number of processes or workers, and a resumed run sees what an uninterrupted one would.
        sampler = self._train_sampler()
        if self._resume_at is not None:  # a position translated by adapt_resume_position, for this loader's first pass
            sampler.resume_at(*self._resume_at)
            self._resume_at = None
        self._check_decode(self.backend)
        if self.decode == "device":  # undecoded JPEG files; decoded and augmented on the device
            dataset, collate = EncodedImages(train, self.on_bad_image), collate_encoded
            self.batch_views.source = dataset  # names bad files and finds their replacements
        elif self.backend == "batched":  # un-augmented uint8 images; the views are made on the device
            dataset, collate = RawImages(train, self.in_chans, load_side(self.image_size)), collate_raw
        else:
            dataset, collate = SeededViews(train, self.train_transform, seed=self.seed), None
        # ResumableLoader: its position in the epoch goes into checkpoints, so a mid-epoch resume continues exactly.
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            batches_done=self._train_batches_done,
            prefetch=self.prefetcher,
        )

    def _train_sampler(self) -> GlobalBatchSampler:
        return GlobalBatchSampler(len(self._require(self.train_dataset)), self.batch_size, seed=self.seed, shuffle=True)

    def adapt_resume_position(self, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """Translate a checkpoint's data position into this run's global batch and data size, in place, before the
        trainer restores it (``SSLModule.on_load_checkpoint`` calls this).

        Lightning counts an epoch's progress in batches; after a change of the global batch (``data.batch_size``,
        devices, nodes) the saved count means other samples. The position is kept by samples seen
        (:meth:`GlobalBatchSampler.resume_position`): the train loader's saved state and Lightning's batch counters
        are rewritten to the batch count that stands for them under this run, so the resumed epoch continues at its
        first unseen sample and ends when the epoch's order is used up. A warning names the old and new global
        batch, data size and seed. Returns the position (``epoch``, ``batches_done``, ``samples_done``,
        ``changed``), or None when the checkpoint holds no train-loader position (then nothing is changed).
        """
        fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        states = (fit.get("state_dict") or {}).get("combined_loader") or []
        if len(states) != 1 or not isinstance(states[0], dict) or "batches_done" not in states[0]:
            return None
        sampler = self._train_sampler()
        pos = sampler.resume_position(states[0])
        if not pos["changed"]:
            return pos
        warnings.warn(pos["message"], stacklevel=2)
        # Lightning builds the train loader after this (and does not hand it the saved loader state when it built it
        # already): the loader's sampler gets the position when it is made
        self._resume_at = (pos["epoch"], pos["samples_done"])
        old_batches = int(states[0]["batches_done"])
        new_batches = pos["batches_done"] if pos["epoch"] == int(states[0]["epoch"]) else sampler.batches_per_epoch()
        states[0] = sampler.state_dict(0) | {
            "epoch": pos["epoch"],
            "batches_done": pos["batches_done"],
            "samples_done": pos["samples_done"],
        }
        progress = fit.get("epoch_loop.batch_progress") or {}
        for counters in (progress.get("current") or {}, progress.get("total") or {}):
            for key in counters:  # ready / started / processed / completed keep their offsets from one another
                counters[key] += new_batches - old_batches
        return pos

    def _train_batches_done(self) -> int | None:
        """Train batches of the current epoch already run, while a trainer fits (None otherwise, e.g. a loop over
        the loader after ``fit``). Lightning's loop progress, as restored from a checkpoint: ``ready`` equals the
        completed batches when the loader starts an epoch."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.state.status != "running":
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _train_device(self) -> torch.device | None:
        """The device this process's training steps run on, while a trainer fits (None otherwise): where
        ``data.device_prefetch`` copies the next train batch (this process's own device under DDP)."""
        if self._train_batches_done() is None:
            return None
        return self.trainer.strategy.root_device

    def val_dataloader(self) -> list[DataLoader]:
        """``[kNN bank (train split), test split]`` under the eval transform; no shuffle, no drop_last. No
        loaders (Lightning then skips validation) when the data has no labelled evaluation set
        (:attr:`eval_skipped`)."""
        if self.eval_skipped is not None:
            return []
        loaders = []
        for ds in (self._require(self.knn_train_dataset), self._require(self.test_dataset)):
            if len(ds) == 0:
                raise ValueError(f"an evaluation split of {self.name} is empty (root={self.root!r})")
            loaders.append(self._loader(IndexedDataset(ds, self.eval_transform), self.eval_batch_size, train=False))
        return loaders
