"""The typed schema of the pretraining config: one home for every default.

The dataclasses below are what the code builds from a config (``OptimSpec`` -> the optimizer and schedule,
``ViewSpec`` -> one family of augmented views) and, registered in Hydra's ConfigStore by :func:`register`, the
structured-config schema the YAML files merge onto: ``conf/method/*.yaml`` start from ``/schema/method``,
``conf/augment/*.yaml`` from ``/schema/augment`` (``views`` a mapping of name -> ``ViewSpec``) and
``conf/backbone/*.yaml`` from ``/schema/backbone`` and ``conf/data/*.yaml`` from ``/schema/data`` (``DataSpec``: the
keyword arguments of :class:`ssl_vision.data.SSLDataModule`), so each YAML states only what differs from these
defaults. A misspelt key anywhere in these nodes is an error naming it (``Key 'blur' not in 'ViewSpec'``), and a value
of the wrong type is refused when the config is composed (``data.batch_size=abc``: ``Value 'abc' of type 'str' could
not be converted to Integer``, ``full_key: data.batch_size``); ranges are checked by
:mod:`ssl_vision.config_checks` and the code that uses a value.

No torch here: ``tools/pretrain.py --cfg job`` composes the config without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import MISSING

__all__ = [
    "OptimSpec",
    "ViewSpec",
    "AugmentSpec",
    "BackboneSpec",
    "DataSpec",
    "MethodSpec",
    "register",
    "view_specs",
]

INTERPOLATION_NAMES = ("nearest", "bilinear", "bicubic")


@dataclasses.dataclass
class OptimSpec:
    """Optimizer and lr schedule of a method (``method.optim``)."""

    name: str = "sgd"  # sgd | lars | adamw
    base_lr: float = 0.03  # scaled by the global batch per ``lr_scaling``
    lr_scaling: str = "linear"  # linear (× B/256) | sqrt (× √B) | none
    weight_decay: float = 1e-4  # never applied to 1-D tensors (biases, norms)
    momentum: float = 0.9  # SGD / LARS momentum (unused by adamw)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    nesterov: bool = False
    trust_coefficient: float = 0.001  # LARS η (unused by sgd / adamw)
    trust_clip: bool = False  # LARC clipping of the LARS rate (solo-learn's clip_lr); the papers use plain LARS
    warmup_epochs: float = 0.0  # linear warmup, then cosine
    warmup_start_factor: float = 0.0  # warmup starts at base × this
    final_factor: float = 0.0  # cosine ends at base × this
    weight_decay_end: float | None = (
        None  # cosine weight-decay schedule to this value (DINO 0.04 → 0.4); null: constant
    )


@dataclasses.dataclass
class ViewSpec:
    """How to draw one kind of view (``augment.views.<name>``); ``count`` identical-recipe views are drawn
    independently.

    Probabilities are in [0, 1]; an op with probability 0 (or zero strength) is left out of the pipeline entirely.
    ``jitter`` is (brightness, contrast, saturation, hue). ``gray_before_jitter`` reproduces MoCo v1 / InstDisc, which
    apply ``RandomGrayscale`` before an always-on ``ColorJitter``. Crop sizes are a ratio of the data's image size (a
    96-px local crop of a 224-px recipe is ``size_ratio = 96/224``). Not to be modified once built.
    """

    count: int = 1
    size_ratio: float = 1.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    flip_p: float = 0.5
    interpolation: str = "bilinear"
    gray_before_jitter: bool = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"ViewSpec.count must be >= 1, got {self.count}")
        if self.size_ratio <= 0:
            raise ValueError(f"ViewSpec.size_ratio must be > 0, got {self.size_ratio}")
        for field in ("jitter_p", "gray_p", "blur_p", "solarize_p", "flip_p"):
            p = getattr(self, field)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewSpec.{field} must be in [0, 1], got {p}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"ViewSpec.scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ViewSpec.ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")
        if len(self.jitter) != 4 or min(self.jitter) < 0:
            raise ValueError(f"ViewSpec.jitter must be 4 non-negative values (b, c, s, h), got {self.jitter}")
        if self.interpolation not in INTERPOLATION_NAMES:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATION_NAMES)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ViewSpec:
        """Build from a config mapping (dict or OmegaConf DictConfig); lists become tuples, unknown keys fail."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - valid
        if unknown:
            raise ValueError(f"unknown ViewSpec keys {sorted(unknown)}; valid keys: {', '.join(sorted(valid))}")
        kwargs = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in values.items()}
        return cls(**kwargs)


def view_specs(views: Mapping[str, Any] | Sequence[Any]) -> list[ViewSpec]:
    """``augment.views`` -> the ``ViewSpec`` list in order: a mapping name -> spec (the config's form; mapping
    order, which the presets write large -> small) or a sequence of specs; dicts are parsed with ``from_dict``."""
    items = list(views.values()) if isinstance(views, Mapping) else list(views)
    return [v if isinstance(v, ViewSpec) else ViewSpec.from_dict(v) for v in items]


@dataclasses.dataclass
class AugmentSpec:
    """``augment``: the views of a preset, by name (``global``, ``local``, ``view1``, ...), in the order the model
    receives them (large -> small crops; the leading views of the first crop size are the global crops)."""

    name: str = MISSING
    backend: str = "per_sample"  # per_sample (PIL, loader workers) | batched (tensor ops on the model's device)
    views: dict[str, ViewSpec] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BackboneSpec:
    """``backbone``: the arguments of :func:`ssl_vision.backbones.create_backbone` besides the data's."""

    name: str = MISSING
    width: float = 1.0  # ResNet only: stage widths round(64, 128, 256, 512 × width)
    channels: list[int] | None = None  # ResNet only: or an explicit list of 4 stage widths
    small_stem: Any = "auto"  # ResNet only: auto (3x3 stride-1, no max-pool for images <= 64 px) | true | false
    zero_init_residual: bool = False  # ResNet only
    patch_size: Any = "auto"  # ViT only: auto (16 at 224 px, 8 at 96 px, 4 at 28-32 px) | an integer
    drop_path_rate: float = 0.0  # ViT only (the student's stochastic depth; DINO 0.1)
    # timm only: further keyword arguments of timm.create_model, e.g. backbone.timm_kwargs.depth=4 (a shallower ViT)
    timm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataSpec:
    """``data``: the keyword arguments of :class:`ssl_vision.data.SSLDataModule` (besides ``views``, from ``augment``,
    and ``seed``), with its defaults; ``???`` (``MISSING``): the data set's file states it (every ``conf/data/*.yaml``
    does) or the command line must (``data=imagefolder data.root=... data.num_classes=...``).

    The field order is the order ``tools/pretrain.py --cfg job`` prints: what the data set is, then loading, then
    evaluation, then the loader's options.
    """

    # fashion_mnist | cifar10 | cifar100 | stl10 (torchvision) | imagefolder (data=imagefolder, data=imagenet) |
    # folder (unlabeled images, any layout) | synthetic (generated class patterns, no files)
    name: str = MISSING
    # where the data lives: torchvision's folder (cifar10 / cifar100 / stl10; download: true fills it), the IDX files
    # (fashion_mnist), the ImageFolder root with <train_dir>/ and <val_dir>/ class sub-folders (imagefolder), the image
    # folder (folder); null: synthetic, or the data set's default location
    root: str | None = MISSING
    # data=folder only: its labelled evaluation set (ImageFolder layout: <eval_root>/<train_dir>/<class>/...,
    # <eval_root>/<val_dir>/<class>/...); any other data set evaluates on its own test split (set here: an error)
    eval_root: str | None = None
    download: bool = False  # torchvision data sets: download into root when missing
    image_size: int = MISSING  # pixels (square) of a global crop and of the evaluation images
    in_chans: int = MISSING  # 1 (grayscale, e.g. Fashion-MNIST) or 3
    num_classes: int = MISSING  # labels of the evaluation set (kNN, online linear probe)
    mean: list[float] = MISSING  # per-channel normalisation statistics (one value per channel, or one for all)
    std: list[float] = MISSING
    batch_size: int = MISSING  # images per process and step (the global batch is × processes); >= 1
    num_workers: int = MISSING  # DataLoader worker processes; 0: load in the main process
    train_subset: int | None = None  # pretrain on this many train images (chosen by seed); null: all
    # online kNN bank: this many labelled train images (by seed), bounding the cost of every validation; null: all;
    # the full-bank number: tools/knn_eval.py on the checkpoint
    knn_train_subset: int | None = 10000
    # evaluation transform: Resize(round(image_size / ratio)) -> CenterCrop(image_size); ImageNet's 256 -> 224 is
    # 0.875; 1.0: resize only images that are not already image_size square. In (0, 1]
    eval_crop_ratio: float = 1.0
    synthetic_size: int = 512  # data=synthetic: train images (the test split has a quarter, at least num_classes)
    stl_unlabeled: bool = False  # STL-10: pretrain on train+unlabeled (105k; label -1), evaluate on the labelled 5k
    train_dir: str = "train"  # ImageFolder sub-folders of root (data=folder: of eval_root)
    val_dir: str = "val"
    eval_batch_size: int | None = None  # kNN bank / test loaders; null: batch_size
    pin_memory: bool = False  # page-locked host batches (faster copies to a GPU)
    persistent_workers: bool = False  # keep the loader workers between epochs (ignored with num_workers: 0)
    # unreadable image files (ImageFolder, folder): error (stop, naming the file) | skip (each replaced by the next
    # readable one, counted and reported)
    on_bad_image: str = "error"
    # host: PIL decodes in the loader workers | device: the workers only read the JPEG bytes and whole batches are
    # decoded on the model's device (nvjpeg on CUDA); device needs augment.backend=batched, data=imagefolder,
    # data=imagenet or data=folder, and reads JPEG only (another format is an unreadable image: on_bad_image)
    decode: str = "host"
    # copy the next train batch to the GPU (non-blocking, on a side stream) while the current step runs, so that no
    # host-to-device copy waits inside a step (best with pin_memory: true); CUDA only, elsewhere a pass-through. The
    # batches, their order and the resume position are unchanged (ssl_vision/data/prefetch.py)
    device_prefetch: bool = True


@dataclasses.dataclass
class MethodSpec:
    """``method``: the objective's name and keyword arguments, its optimizer and schedule."""

    name: str = MISSING
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
    sync_batchnorm: bool = False  # cross-replica BN in backbone and heads; applied on GPU DDP only
    # Lightning callbacks the method adds, each {_target_: <class>, <kwarg>: <value>} (instantiated by
    # ssl_vision/launch.py method_callbacks; they write into the run directory), e.g. MAE's reconstruction grid
    callbacks: list[Any] = dataclasses.field(default_factory=list)


_registered = False


def register() -> None:
    """Store the schema nodes in Hydra's ConfigStore (``schema/method``, ``schema/augment``, ``schema/backbone``,
    ``schema/data``, ``schema/optim``, ``schema/view``); idempotent. Call before composing ``conf/pretrain.yaml``:
    importing :mod:`ssl_vision` does."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in (
        ("method", MethodSpec),
        ("augment", AugmentSpec),
        ("backbone", BackboneSpec),
        ("data", DataSpec),
        ("optim", OptimSpec),
        ("view", ViewSpec),
    ):
        cs.store(group="schema", name=name, node=node)
    _registered = True
