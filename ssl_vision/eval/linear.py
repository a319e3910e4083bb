"""Linear probe on a frozen backbone (docs/reference.md §10.2).

The backbone stays frozen **and in ``eval()`` mode** for the whole run (MoCo's note: BN in train mode would
rewrite its running statistics, which are part of the model; cf. kdexd/virtex#16). Without augmentation (the
default) the train and test features are computed once under ``no_grad`` and cached beside the checkpoint
(``<stem>.features.<split>.pt``); the classifier then trains on the cached (N, D) tensors in seconds.

Protocols (the recipe values live in ``conf/linear.yaml: protocols``):

* ``sgd_cosine`` -- SGD m0.9, lr 0.1×B/256, cosine to 0, wd 0 (lightly benchmarks, SimCLR / MoCo v3 style).
* ``sgd_step``   -- SGD m0.9, lr 30, ×0.1 at 60% and 80% of the epochs, wd 0 (MoCo v1/v2 ``main_lincls.py``).
* ``lars_bn``    -- BatchNorm1d(d, affine=False, eps=1e-6) -> Linear, LARS lr 0.1×B/256, warmup + cosine
  (MAE ``main_linprobe.py``).

The classifier is ``Linear(d, C)`` with weight N(0, 0.01) and zero bias. The reported number follows the rule
``"last"``: top-1 / top-5 on the test split after the last epoch. ``report_best_on_test`` adds, clearly flagged,
the best epoch *selected on the test split* (optimistic; some papers report it, never silently here).

End-to-end fine-tuning (docs/reference.md §10.3, ``tools/linear_probe.py finetune=true``) lives in
:mod:`ssl_vision.eval.finetune`; it reuses :func:`topk_accuracy` from here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vision.eval.outputs import output_path
from ssl_vision.eval.features import (
    EvalData,
    augmented_loader,
    build_eval_loaders,
    build_eval_splits,
    cached_features,
    extract_features,
    file_sha256,
    resolve_device,
)
from ssl_vision.optim import LARS, linear_scaled_lr, param_groups, warmup_cosine
from ssl_vision.progress import progress as progress_bar

__all__ = [
    "ProbeSpec",
    "make_probe_spec",
    "build_head",
    "train_linear_probe",
    "probe_checkpoint",
    "topk_accuracy",
    "PROTOCOLS",
]

PROTOCOLS = ("sgd_cosine", "sgd_step", "lars_bn")
_SCHEDULES = ("cosine", "step")
_OPTIMIZERS = ("sgd", "lars")
BEST_ON_TEST_NOTE = "epoch selected on the test split: optimistic, not a held-out number; the result is 'last'"


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """One linear-probe recipe with every value explicit; ``lr`` is the absolute (already batch-scaled) lr."""

    protocol: str
    optimizer: str  # sgd | lars
    lr: float
    schedule: str  # cosine | step
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.6, 0.8)  # step schedule: fractions of the epochs where lr ×= 0.1
    head_bn: bool = False  # BatchNorm1d(d, affine=False, eps=1e-6) before the Linear (MAE)
    trust_coefficient: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS or self.schedule not in _SCHEDULES:
            raise ValueError(
                f"probe optimizer must be one of {_OPTIMIZERS} and schedule one of {_SCHEDULES}, got "
                f"{self.optimizer!r}, {self.schedule!r}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"probe needs epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; got "
                f"{self.epochs}, {self.batch_size}, {self.lr}, {self.weight_decay}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")


def make_probe_spec(
    protocol: str,
    recipes: Mapping[str, Mapping[str, Any]],
    lr: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
) -> ProbeSpec:
    """The recipe ``recipes[protocol]`` with the non-None overrides applied.

    A recipe holds ``optimizer, base_lr, lr_scaling (linear | none), schedule, epochs, batch_size, weight_decay``
    and optionally ``momentum, nesterov, warmup_epochs, milestones, head_bn, trust_coefficient``. Without an
    explicit ``lr`` the lr is ``base_lr`` scaled by the batch size (``linear``: ×B/256).
    """
    if protocol not in recipes:
        raise ValueError(f"unknown linear-probe protocol {protocol!r}; valid: {', '.join(sorted(recipes))}")
    r = dict(recipes[protocol])
    batch = int(batch_size if batch_size is not None else r.pop("batch_size"))
    r.pop("batch_size", None)
    base_lr, rule = r.pop("base_lr"), r.pop("lr_scaling")
    r.pop("lr", None)
    if lr is None:
        lr = linear_scaled_lr(float(base_lr), batch, rule=rule)
    if epochs is not None:
        r["epochs"] = epochs
    if weight_decay is not None:
        r["weight_decay"] = weight_decay
    if float(r.get("warmup_epochs", 0)) > float(r["epochs"]):
        raise ValueError(
            f"protocol {protocol!r}: warmup_epochs={r['warmup_epochs']} exceeds epochs={r['epochs']}; "
            f"set protocols.{protocol}.warmup_epochs=... (or more epochs)"
        )
    if "milestones" in r:
        r["milestones"] = tuple(float(m) for m in r["milestones"])
    return ProbeSpec(protocol=protocol, lr=float(lr), batch_size=batch, seed=seed, **r)


def build_head(feature_dim: int, num_classes: int, bn: bool = False) -> nn.Module:
    """``Linear(d, C)`` (weight N(0, 0.01), bias 0), after ``BatchNorm1d(d, affine=False, eps=1e-6)`` if ``bn``."""
    linear = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if not bn:
        return linear
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), linear)


def _optimizer(head: nn.Module, spec: ProbeSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            head.parameters(),
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
        )
    # LARS as in MAE: the 1-D bias gets neither decay nor the trust ratio (param_groups marks it lars_exclude)
    groups = param_groups(head.named_parameters(), spec.weight_decay)
    return LARS(
        groups, lr=spec.lr, momentum=spec.momentum, trust_coefficient=spec.trust_coefficient, nesterov=spec.nesterov
    )


def lr_at(spec: ProbeSpec, step: int, steps_per_epoch: int) -> float:
    """The lr of optimizer step ``step`` (per-step warmup + cosine, or per-epoch ×0.1 steps)."""
    total = spec.epochs * steps_per_epoch
    if spec.schedule == "cosine":
        return warmup_cosine(step, total, round(spec.warmup_epochs * steps_per_epoch), spec.lr)
    epoch = step // steps_per_epoch
    drops = sum(epoch >= round(m * spec.epochs) for m in spec.milestones)
    return spec.lr * 0.1**drops


def topk_accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 / top-``min(5, C)`` accuracy in percent; ties go to the lowest class index (stable sort)."""
    top = min(5, logits.shape[1])
    ranked = logits.sort(dim=1, descending=True, stable=True).indices[:, :top]
    hits = ranked == labels[:, None]
    n = labels.shape[0]
    return {"top1": 100.0 * float(hits[:, 0].sum()) / n, "top5": 100.0 * float(hits.any(dim=1).sum()) / n}


@torch.no_grad()
def _evaluate(head: nn.Module, feats: Tensor, labels: Tensor, chunk: int = 8192) -> dict[str, float]:
    head.eval()
    logits = torch.cat([head(feats[s : s + chunk]) for s in range(0, feats.shape[0], chunk)])
    return topk_accuracy(logits.float().cpu(), labels.cpu())


def _num_batches(n: int, batch_size: int, bn: bool) -> int:
    """Batches per epoch: the last partial batch is kept unless a BN head would see a single sample."""
    full, rest = divmod(n, batch_size)
    return full + (rest > 0 and not (bn and rest == 1 and full > 0))


def _batches(n: int, batch_size: int, generator: torch.Generator, bn: bool) -> list[Tensor]:
    """A seeded permutation of ``range(n)`` cut into :func:`_num_batches` batches."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))[: _num_batches(n, batch_size, bn)]


def train_linear_probe(
    train_f: Tensor,
    train_y: Tensor,
    test_f: Tensor,
    test_y: Tensor,
    num_classes: int,
    spec: ProbeSpec,
    device: torch.device | str = "cpu",
    report_best_on_test: bool = False,
    epoch_features: Callable[[int], tuple[Tensor, Tensor]] | None = None,
    progress: Any = False,
) -> dict[str, Any]:
    """Train ``build_head`` on features and report test top-1 / top-5 after the last epoch (rule ``"last"``).

    Args:
        train_f, train_y: (N, D) float features and (N,) labels; test_f, test_y: (M, D), (M,).
        spec: the recipe (see :class:`ProbeSpec`); the data order comes from ``spec.seed``.
        report_best_on_test: also evaluate every epoch and add ``best_on_test`` (flagged as test-selected).
        epoch_features: ``epoch -> (features, labels)`` giving fresh train features each epoch (augmentation);
            ``train_f`` / ``train_y`` are then only used for the shapes.
        progress: a tqdm bar over the epochs (with the last epoch's train loss) on stderr: ``True``, ``False``,
            or ``None`` / ``"auto"``: when stderr is a terminal.

    Returns:
        ``{"rule": "last", "top1", "top5", "train_loss", "train_top1", "epochs", "steps"}`` (+ ``best_on_test``).
    """
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(
            f"probe: features must be (N, D) and (M, D), got {tuple(train_f.shape)}, {tuple(test_f.shape)}"
        )
    if spec.head_bn and train_f.shape[0] < 2:
        raise ValueError("probe: the BN head needs at least 2 training samples")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # a seeded head init that leaves the caller's RNG alone
        torch.manual_seed(spec.seed)
        head = build_head(train_f.shape[1], num_classes, spec.head_bn).to(device)
    opt = _optimizer(head, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = _num_batches(train_f.shape[0], spec.batch_size, spec.head_bn)
    test_f, test_y = test_f.to(device).float(), test_y.to(device).long()
    step, best = 0, None
    bar = progress_bar(range(spec.epochs), "linear probe", progress, unit="epoch")
    for epoch in bar:
        if epoch_features is not None:
            train_f, train_y = epoch_features(epoch)
        x_all, y_all = train_f.to(device).float(), train_y.to(device).long()
        head.train()
        # accumulated on the device: no host sync per step
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long), 0
        for idx in _batches(x_all.shape[0], spec.batch_size, gen, spec.head_bn):
            for group in opt.param_groups:
                group["lr"] = lr_at(spec, step, steps_per_epoch)
            x, y = x_all[idx.to(device)], y_all[idx.to(device)]
            logits = head(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
        loss_sum, correct = float(loss_sum), int(correct)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"probe: the loss became {loss_sum} in epoch {epoch}; lower the lr (now {spec.lr})"
            )
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", refresh=False)
        if report_best_on_test and epoch < spec.epochs - 1:
            acc = _evaluate(head, test_f, test_y)
            if best is None or acc["top1"] > best["top1"]:
                best = {**acc, "epoch": epoch + 1}
    final = _evaluate(head, test_f, test_y)
    out = {
        "rule": "last",
        **final,
        "train_loss": loss_sum / max(seen, 1),
        "train_top1": 100.0 * correct / max(seen, 1),
        "epochs": spec.epochs,
        "steps": step,
    }
    if report_best_on_test:
        if best is None or final["top1"] >= best["top1"]:
            best = {**final, "epoch": spec.epochs}
        out["best_on_test"] = {**best, "note": BEST_ON_TEST_NOTE}
    return out


# ------------------------------------------------------------------------------------------ whole checkpoint
def _plain(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as JSON writes it back (tuples -> lists), so the returned dict equals the results file."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def probe_checkpoint(
    checkpoint: str | Path,
    spec: ProbeSpec,
    data: EvalData,
    backbone: nn.Module,
    info: dict,
    batch_size: int,
    num_workers: int,
    device: str = "auto",
    augment: bool = False,
    cache: bool = True,
    report_best_on_test: bool = False,
    train_subset: int | None = None,
    extract: Callable = extract_features,
    output_dir: str | Path | None = None,
    progress: Any = False,
) -> dict[str, Any]:
    """Linear-probe a loaded, frozen ``backbone`` (from :func:`load_backbone`) on ``data``.

    ``batch_size`` / ``num_workers`` are for feature extraction (the probe's own batch is ``spec.batch_size``).
    Features are cached beside ``checkpoint`` (in ``output_dir`` when given) unless ``augment`` (then recomputed
    every epoch from seeded RandomResizedCrop + flip views, backbone still in eval mode) or ``cache=False``; a
    cache that cannot be written (read-only folder) is skipped with a note. ``extract`` is the extraction function
    (tests count its calls). ``progress``: tqdm bars on stderr for each feature extraction and the probe's epochs
    (``True`` / ``False`` / ``None`` or ``"auto"``: when stderr is a terminal).
    """
    dev = resolve_device(device)
    backbone = backbone.to(dev).eval().requires_grad_(False)
    train_loader, test_loader = build_eval_loaders(data, batch_size, num_workers, train_subset, spec.seed)
    weights_id = {"sha256": file_sha256(checkpoint), "weights": info.get("weights")}
    data_id = {**dataclasses.asdict(data), "train_subset": train_subset, "seed": spec.seed}
    status, t0 = {}, time.perf_counter()

    def features(split: str, loader) -> tuple[Tensor, Tensor]:
        if not cache:
            status[split] = "off"
            return extract(backbone, progress_bar(loader, f"features {split}", progress, unit="batch"), dev)
        fp = {**weights_id, "data": data_id, "split": split, "transform": "eval"}
        f, y, status[split] = cached_features(
            output_path(checkpoint, f".features.{split}.pt", output_dir),
            fp,
            lambda: extract(backbone, progress_bar(loader, f"features {split}", progress, unit="batch"), dev),
        )
        return f, y

    test_f, test_y = features("test", test_loader)
    epoch_features = None
    if augment:
        train_ds, _ = build_eval_splits(data, train_subset, spec.seed)
        status["train"] = "augmented (recomputed every epoch)"
        # shapes only; the real train features come from epoch_features
        train_f, train_y = torch.empty(len(train_ds), test_f.shape[1]), torch.empty(len(train_ds), dtype=torch.long)

        def epoch_features(epoch: int) -> tuple[Tensor, Tensor]:
            loader = augmented_loader(train_ds, data, epoch, spec.seed, batch_size, num_workers)
            return extract(
                backbone,
                progress_bar(loader, f"features train (augmented, epoch {epoch})", progress, unit="batch", leave=False),
                dev,
            )
    else:
        train_f, train_y = features("train", train_loader)
    extract_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = train_linear_probe(
        train_f, train_y, test_f, test_y, data.num_classes, spec, dev, report_best_on_test, epoch_features, progress
    )
    return {
        **res,
        "protocol": spec.protocol,
        "spec": _plain(dataclasses.asdict(spec)),
        "augment": augment,
        "feature_cache": status,
        "train_samples": int(train_f.shape[0]),
        "test_samples": int(test_f.shape[0]),
        "feature_dim": int(test_f.shape[1]),
        "num_classes": data.num_classes,
        "extract_s": round(extract_s, 3),
        "train_s": round(time.perf_counter() - t1, 3),
    }
