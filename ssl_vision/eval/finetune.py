"""End-to-end fine-tuning of a pretrained backbone + linear head (docs/reference.md §10.3, MAE ``main_finetune.py``).

Unlike the linear probe, every weight trains and the model is in ``train()`` mode (BN statistics update,
drop-path is active). The recipe follows MAE (He et al. 2021, https://arxiv.org/abs/2111.06377, appendix A.3):

* AdamW (default betas), ``lr = blr × B / 256``, per-step linear warmup then half-cosine to ``min_lr``;
* layer-wise lr decay for ViTs through timm (``create_optimizer_v2(layer_decay=...)``, i.e.
  ``param_groups_layer_decay``): block ``i`` gets ``decay ** (depth - i)``, the stem ``decay ** (depth + 1)``,
  the head 1, as in MAE / BEiT -- except the final ``norm``, which timm groups with the last block (``decay``;
  MAE: 1). No weight decay on 1-D params, ``pos_embed`` and ``cls_token``. ResNets (and any non-ViT) get no
  layer decay: their blocks have no single depth order the recipe was tuned for;
* mixup 0.8 / cutmix 1.0 through ``timm.data.Mixup`` (with label smoothing folded into the soft targets) and
  ``SoftTargetCrossEntropy``; without mixup, label-smoothed cross entropy;
* drop-path (stochastic depth) in the ViT blocks; random erasing on the normalised tensor;
* train augmentation RandomResizedCrop + flip at the data's size, seeded per (seed, epoch, index);
* the head is ``Linear(d, C)`` with trunc-normal(std 2e-5) weight and zero bias (MAE), on the backbone's own
  pooled feature (the cls token for ssl_vision's ViTs, global average pooling for ResNets).

Not included: RandAugment (timm's draws from Python's ``random``, so it could not be seeded per sample), mixed
precision, gradient accumulation (``batch_size`` is the effective batch), EMA of the weights.
The result is top-1 / top-5 on the test split after the last epoch (rule ``"last"``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ssl_vision.backbones import create_backbone, is_vit
from ssl_vision.data import IndexedDataset, build_eval_transform, build_view_transform
from ssl_vision.data.sampling import SeededViews
from ssl_vision.eval.features import PROBE_AUGMENT, EvalData, build_eval_splits, resolve_device
from ssl_vision.eval.linear import topk_accuracy
from ssl_vision.optim import linear_scaled_lr, warmup_cosine

__all__ = [
    "FinetuneSpec",
    "make_finetune_spec",
    "build_finetune_model",
    "build_optimizer",
    "build_mixup",
    "set_lr",
    "lr_at",
    "finetune_backbone",
    "Classifier",
]


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tuning recipe with every value explicit; ``lr`` is the absolute (already batch-scaled) peak lr."""

    epochs: int
    batch_size: int
    lr: float
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float | None = 0.65  # ViTs only; None: no layer decay
    drop_path: float = 0.1  # ViTs only
    smoothing: float = 0.1
    mixup: float = 0.8  # Beta(α, α) mixup; 0: off
    cutmix: float = 1.0  # Beta(α, α) cutmix; 0: off
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    reprob: float = 0.25  # random erasing probability
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError(
                f"fine-tuning needs epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0, "
                f"min_lr >= 0; got {self.epochs}, {self.batch_size}, {self.lr}, {self.weight_decay}, "
                f"{self.min_lr}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"finetuning.warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}]")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"finetuning.layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        for name in ("drop_path", "smoothing", "mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"finetuning.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"finetuning.mixup / cutmix are Beta alphas >= 0, got {self.mixup}, {self.cutmix}")
        if self.mixes and self.batch_size % 2:
            raise ValueError(
                f"mixup / cutmix pair each sample with the batch flipped: batch_size must be even, "
                f"got {self.batch_size}"
            )

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


def make_finetune_spec(
    recipe: Mapping[str, Any],
    lr: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
) -> FinetuneSpec:
    """``recipe`` (``conf/linear.yaml: finetuning``) with the non-None overrides applied.

    Without an explicit ``lr`` (argument or ``recipe["lr"]``) the peak lr is ``blr × batch_size / 256`` (MAE).
    """
    r = dict(recipe)
    blr, recipe_lr = r.pop("blr"), r.pop("lr", None)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("weight_decay", weight_decay)):
        if value is not None:
            r[key] = value
    lr = lr if lr is not None else recipe_lr
    if lr is None:
        lr = linear_scaled_lr(float(blr), int(r["batch_size"]), rule="linear")
    if float(r.get("warmup_epochs", 0)) > float(r["epochs"]):
        raise ValueError(
            f"finetuning.warmup_epochs={r['warmup_epochs']} exceeds epochs={r['epochs']}; "
            f"set finetuning.warmup_epochs=... (or more epochs)"
        )
    known = {f.name for f in dataclasses.fields(FinetuneSpec)}
    unknown = sorted(set(r) - known)
    if unknown:
        raise ValueError(f"unknown finetuning keys {unknown}; valid: blr, lr, {', '.join(sorted(known - {'lr'}))}")
    return FinetuneSpec(lr=float(lr), seed=seed, **r)


# ---------------------------------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """``head(backbone(x))`` for backbones without a timm classifier slot (torchvision ResNets)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.backbone(x))


def build_finetune_model(
    backbone: nn.Module, create_kwargs: Mapping[str, Any], num_classes: int, drop_path: float
) -> tuple[nn.Module, bool]:
    """A trainable copy of ``backbone`` with a fresh ``Linear(d, num_classes)`` head; returns ``(model, vit)``.

    The backbone is rebuilt from ``create_kwargs`` (as :func:`load_backbone` returns them) with
    ``drop_path_rate=drop_path`` and loaded strictly from ``backbone``'s weights, so the caller's module stays
    untouched. A ViT keeps timm's own head slot (``reset_classifier``), which keeps timm's ``group_matcher`` --
    the layer map that layer-wise lr decay needs; other backbones are wrapped in :class:`Classifier`.
    """
    kw = dict(create_kwargs)
    kw["drop_path_rate"] = float(drop_path)  # ignored by the ResNets, which have no stochastic depth
    model, dim = create_backbone(**kw)
    model.load_state_dict(backbone.state_dict())
    vit = is_vit(model) and hasattr(model, "reset_classifier")
    if vit:
        model.reset_classifier(num_classes)
        head = model.get_classifier()
    else:
        head = nn.Linear(dim, num_classes)
        model = Classifier(model, head)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE main_finetune.py
    nn.init.zeros_(head.bias)
    return model.requires_grad_(True).train(), vit


def build_optimizer(model: nn.Module, spec: FinetuneSpec, vit: bool) -> torch.optim.Optimizer:
    """AdamW via timm; layer decay (``lr_scale`` per group) for ViTs only. Groups carry ``lr_scale`` (1 when
    absent); :func:`set_lr` applies it."""
    layer_decay = spec.layer_decay if vit else None
    return create_optimizer_v2(model, opt="adamw", lr=spec.lr, weight_decay=spec.weight_decay, layer_decay=layer_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr × lr_scale`` (the layer-decay factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(spec: FinetuneSpec, step: int, steps_per_epoch: int) -> float:
    """Peak-relative lr of optimizer step ``step``: linear warmup from 0 over ``warmup_epochs``, then half-cosine
    to ``min_lr`` (MAE ``util/lr_sched.py``, evaluated per step)."""
    total = spec.epochs * steps_per_epoch
    return warmup_cosine(step, total, round(spec.warmup_epochs * steps_per_epoch), spec.lr, final=spec.min_lr)


def build_mixup(spec: FinetuneSpec, num_classes: int) -> Mixup | None:
    """timm's batch-mode Mixup / CutMix producing label-smoothed soft targets (B, C), or None when off."""
    if not spec.mixes:
        return None
    return Mixup(
        mixup_alpha=spec.mixup,
        cutmix_alpha=spec.cutmix,
        prob=spec.mixup_prob,
        switch_prob=spec.mixup_switch_prob,
        mode="batch",
        label_smoothing=spec.smoothing,
        num_classes=num_classes,
    )


def _criterion(spec: FinetuneSpec) -> nn.Module:
    if spec.mixes:
        return SoftTargetCrossEntropy()  # smoothing is already in Mixup's targets
    if spec.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=spec.smoothing)
    return nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------------------------------- data
def _train_loader(train: Dataset, data: EvalData, spec: FinetuneSpec, epoch: int, num_workers: int) -> DataLoader:
    """RandomResizedCrop + flip (+ random erasing) views in a seeded random order; full batches only (mixup
    pairs a batch with its flip, and a last batch of one would break BN)."""
    ops: list = [build_view_transform(PROBE_AUGMENT, data.image_size, data.in_chans, data.mean, data.std)]
    if spec.reprob > 0:
        ops.append(T.RandomErasing(p=spec.reprob, value="random"))  # noise on the normalised tensor, as MAE's
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec.seed * 100_003 + epoch))
    keys = [(int(i), epoch) for i in order]  # SeededViews reads (index, epoch): same crop for any batch/workers
    return DataLoader(
        SeededViews(train, T.Compose(ops), seed=spec.seed),
        batch_size=spec.batch_size,
        sampler=keys,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    for x, y, _ in loader:
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y).long())
    return topk_accuracy(torch.cat(logits), torch.cat(labels))


# ---------------------------------------------------------------------------------------------------- train
def _train(model, opt, loader_of, spec: FinetuneSpec, steps_per_epoch: int, mixup, device) -> tuple[float, int]:
    criterion, step, mean_loss = _criterion(spec), 0, float("nan")
    for epoch in range(spec.epochs):
        model.train()
        loss_sum, seen = torch.zeros((), device=device), 0
        for x, y, _ in loader_of(epoch):
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).long().to(device, non_blocking=True)
            set_lr(opt, lr_at(spec, step, steps_per_epoch))
            if mixup is not None:
                x, y = mixup(x, y)  # y: (B, C) soft targets summing to 1
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach() * x.shape[0]
            seen += x.shape[0]
        mean_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"fine-tuning: the loss became {mean_loss} in epoch {epoch}; lower the lr (now {spec.lr})"
            )
    return mean_loss, step


def finetune_backbone(
    backbone: nn.Module,
    create_kwargs: Mapping[str, Any],
    data: EvalData,
    spec: FinetuneSpec,
    eval_batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    train_subset: int | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Fine-tune a copy of ``backbone`` (from :func:`load_backbone`) plus a new head on ``data``'s train split.

    Args:
        backbone, create_kwargs: the loaded backbone and ``info["create_kwargs"]``; ``backbone`` is not modified.
        data: the data set (``data.num_classes`` sets the head).
        spec: the recipe; ``spec.seed`` fixes head init, data order, crops, mixup draws and drop-path.
        eval_batch_size / num_workers: test-split evaluation and loading.
        train_subset: fine-tune on a fixed random subset of the train split (quick looks only).

    Returns:
        ``(results, model)``: results hold ``rule`` ("last"), ``top1``, ``top5`` (test split, %), ``train_loss``
        (last epoch, on mixed targets), ``epochs``, ``steps``, ``lr``, ``layer_decay`` and ``drop_path`` as
        applied (None where the backbone does not take them), ``spec``, sizes and timings; ``model`` is the
        fine-tuned classifier (B, C, H, W) -> (B, num_classes) on ``device``.
    """
    dev = resolve_device(device)
    train, test = build_eval_splits(data, train_subset, spec.seed)
    if len(train) < spec.batch_size:
        raise ValueError(
            f"fine-tuning drops incomplete batches, and the train split has {len(train)} images < "
            f"batch_size={spec.batch_size}; lower finetuning.batch_size"
        )
    steps_per_epoch = len(train) // spec.batch_size
    eval_tf = build_eval_transform(data.image_size, data.in_chans, data.mean, data.std, data.eval_crop_ratio)
    test_loader = DataLoader(
        IndexedDataset(test, eval_tf),
        batch_size=eval_batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    np_state = np.random.get_state()  # timm's Mixup draws lambda / boxes from numpy's global RNG
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded head init, drop-path, erasing; the caller's RNG is kept
        torch.manual_seed(spec.seed)
        np.random.seed(spec.seed)
        try:
            model, vit = build_finetune_model(backbone, create_kwargs, data.num_classes, spec.drop_path)
            model.to(dev)
            opt = build_optimizer(model, spec, vit)
            t0 = time.perf_counter()
            loss, steps = _train(
                model,
                opt,
                lambda e: _train_loader(train, data, spec, e, num_workers),
                spec,
                steps_per_epoch,
                build_mixup(spec, data.num_classes),
                dev,
            )
            t1 = time.perf_counter()
            acc = _evaluate(model, test_loader, dev)
        finally:
            np.random.set_state(np_state)
    results = {
        "rule": "last",
        **acc,
        "train_loss": loss,
        "epochs": spec.epochs,
        "steps": steps,
        "lr": spec.lr,
        "layer_decay": spec.layer_decay if vit else None,
        "drop_path": spec.drop_path if vit else None,
        "mixup": spec.mixes,
        "spec": dataclasses.asdict(spec),
        "train_samples": len(train),
        "test_samples": len(test),
        "num_classes": data.num_classes,
        "train_s": round(t1 - t0, 3),
        "eval_s": round(time.perf_counter() - t1, 3),
        "device": str(dev),
    }
    return results, model
