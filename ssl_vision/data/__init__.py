"""Data: data sets of ``(PIL image, label)``, multi-view augmentation and the Lightning data module."""

from ssl_vision.data.datamodule import SSLDataModule
from ssl_vision.data.datasets import (
    DATASET_NAMES,
    IndexedDataset,
    SyntheticDataset,
    build_dataset,
    read_idx,
    take_subset,
)
from ssl_vision.data.views import (
    MultiView,
    ViewSpec,
    blur_kernel_size,
    build_eval_transform,
    build_multiview,
    build_view_transform,
)

__all__ = [
    "DATASET_NAMES",
    "IndexedDataset",
    "MultiView",
    "SSLDataModule",
    "SyntheticDataset",
    "ViewSpec",
    "blur_kernel_size",
    "build_dataset",
    "build_eval_transform",
    "build_multiview",
    "build_view_transform",
    "read_idx",
    "take_subset",
]
