#!/usr/bin/env python
"""Training-step speed of ssl_vision vs lightly, method by method, on the same backbone, batch and views.

    pip install -e '.[bench]'                               # lightly (optional extra)
    python benchmarks/vs_lightly.py                          # all methods, resnet18 x0.25 at 32 px, batch 64
    python benchmarks/vs_lightly.py --methods simclr byol --steps 10 --rounds 3 --json vs_lightly.json
    python benchmarks/vs_lightly.py --quick --methods simclr --steps 1      # smoke test
    python benchmarks/vs_lightly.py --device cuda --precision bf16 --lightly-channels-last --paper-heads \
        --methods moco_v3 --backbone resnet50 --image-size 224 --batch 128 --peak-tflops 989   # GPU (gpu_check.sh)

* **Same inputs.** One batch of views is made once with the per-sample pipeline (``conf/augment`` preset of the
  method at ``--image-size``; multi-crop 2 global + 6 local for SwAV / DINO) and fed unchanged to both sides, so
  augmentation and data loading are excluded.
* **Ours** is the real thing: ``SSLModule`` (from :mod:`ssl_vision.launch`, the method's config) run by a Lightning
  ``Trainer`` (CPU, fp32, no logger / checkpoints / validation); a callback times ``on_train_batch_start`` ->
  ``on_train_batch_end``: ``training_step`` through the objective, backward, the method's optimizer step and its
  hooks (EMA, queues, clipping), the online linear probe and ``self.log``; with our defaults (among them
  ``perf.channels_last=true``: NHWC ResNet weights), or what ``--ours OVERRIDE ...`` sets (e.g.
  ``perf.channels_last=false`` for the NCHW layout that lightly's loop keeps, as PyTorch does by default).
* **lightly** is a plain PyTorch loop in the style of lightly's ``examples/pytorch`` scripts, built from lightly's
  heads, losses and utilities (``update_momentum``, ``LARS``) with our backbone (same factory, same seed) and the
  same head sizes, lr and optimizer type (LARS / SGD / AdamW). lightly has no MoCo v3 model: ``moco_v3`` is
  lightly's MoCo projection + BYOL prediction heads with a symmetric ``NTXentLoss`` (2N-2 in-batch negatives
  instead of MoCo v3's N-1; same cost order). MAE uses lightly's timm masked ViT and decoder on our ViT.
* Heads are shrunk for a CPU (``SMALL`` below, both sides alike; ``--paper-heads`` keeps the configs' sizes).
  Our MAE runs with ``norm_pix_loss=false`` and ``probe_features=visible`` (lightly's MSE target, no extra pass).

* **Devices and precision.** ``--device cuda`` runs both sides on the GPU (views made once, then moved there; each
  step timed between ``torch.cuda.synchronize`` calls); ``--precision bf16`` is Lightning's ``bf16-mixed`` for ours
  and ``torch.autocast(bfloat16)`` around lightly's step; ``--lightly-channels-last`` puts lightly's model and
  inputs in NHWC too (ours is NHWC by default). ``--backbone`` picks any ``conf/backbone`` for every method.
* **FLOPs and MFU.** ``gflop_per_step``: the forward + backward FLOPs of one step (matrix products and
  convolutions, ``torch.utils.flop_counter``), counted once on the lightly-built model -- the same arithmetic as
  ours; ``*_tflop_s`` = that x steps/s; ``*_mfu`` = that / ``--peak-tflops`` when given.

Each round times ``--steps`` steps of ours then of lightly's (after ``--warmup`` untimed ones), ``--rounds``
rounds alternating. images/s = batch / median step time; ``ratio`` = ours / lightly (> 1: ours faster) over all
rounds; ``ratio_per_round`` the same ratio within each round (both sides back to back, so under the same machine
load): its spread is the run-to-run noise to read the ratio against.
Prints a table and one JSON line (also ``--json``). ``benchmarks/parity.py`` trains the same lightly-built models
(:class:`LightlyMethod`) and compares the kNN accuracy they reach with ours.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.throughput import device_name, emit  # noqa: E402
from ssl_vision.backbones import create_backbone  # noqa: E402
from ssl_vision.data.views import build_multiview  # noqa: E402
from ssl_vision.launch import build_module  # noqa: E402
from ssl_vision.optim import linear_scaled_lr  # noqa: E402

METHODS = ("simclr", "moco_v2", "moco_v3", "byol", "simsiam", "swav", "dino", "mae")
AUGMENT = {"swav": "multicrop", "dino": "multicrop", "mae": "mae"}  # others: their own 2-view preset
SMALL = {  # head sizes for a CPU run, applied to ours (config overrides) and read back for lightly's heads
    "simclr": ["proj_hidden_dim=512"],
    "moco_v2": ["proj_hidden_dim=512", "queue_size=4096"],
    "moco_v3": ["proj_hidden_dim=512", "pred_hidden_dim=512", "proj_out_dim=128"],
    "byol": ["proj_hidden_dim=512", "pred_hidden_dim=512", "proj_out_dim=128"],
    "simsiam": ["proj_hidden_dim=512", "proj_out_dim=512", "pred_hidden_dim=128"],
    "swav": ["proj_hidden_dim=512", "num_prototypes=512", "queue_length=0"],
    "dino": ["hidden_dim=512", "bottleneck_dim=128", "out_dim=4096"],
    "mae": ["decoder_dim=128", "decoder_depth=2", "decoder_heads=4"],
}
ALWAYS = {"mae": ["norm_pix_loss=false", "probe_features=visible"]}


def compose_cfg(method: str, args: argparse.Namespace) -> Any:
    kw = (SMALL.get(method, []) if not args.paper_heads else []) + ALWAYS.get(method, [])
    if args.backbone:  # a conf/backbone name with its own defaults (e.g. resnet50, vit_small: patch 16)
        backbone = [f"backbone={args.backbone}"]
    else:
        backbone = (
            ["backbone=vit_tiny", "backbone.patch_size=4"]
            if method == "mae"
            else ["backbone=resnet18", f"backbone.width={args.width}"]
        )
    overrides = [
        f"method={method}",
        f"augment={AUGMENT.get(method, method)}",
        *backbone,
        "data=synthetic",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        "trainer=cpu",
        "logger=none",
        *[f"method.kwargs.{k}" for k in kw],
        *args.ours,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def make_views(cfg: Any, batch: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One batch of augmented views (per-sample pipeline on random images), reused for every step of both sides."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    mv = build_multiview(OmegaConf.to_container(cfg.augment.views), size, 3, cfg.data.mean, cfg.data.std)
    per_image = [
        mv(Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()))
        for _ in range(batch)
    ]
    views = [torch.stack([p[v] for p in per_image]) for v in range(len(per_image[0]))]
    return views, torch.arange(batch) % 10, torch.arange(batch)


# -------------------------------------------------------------------------------------------------------- ours
class _Repeat(Dataset):
    def __init__(self, batch: tuple, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return self.batch


class _Premade(L.LightningDataModule):
    def __init__(self, batch: tuple, batch_size: int, steps: int) -> None:
        super().__init__()
        self.batch, self.batch_size, self.steps = batch, batch_size, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, self.steps), batch_size=None, shuffle=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.times: list[float] = []
        self.device = device

    def on_train_batch_start(self, *args) -> None:
        _sync(self.device)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self.t0)


def time_ours(
    module: L.LightningModule,
    batch: tuple,
    batch_size: int,
    warmup: int,
    steps: int,
    device: torch.device = torch.device("cpu"),
    bf16: bool = False,
) -> list[float]:
    """``batch`` already on ``device`` (Lightning's per-step transfer is then a no-op, as lightly's loop has none)."""
    timer = _StepTimer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_steps=warmup + steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_Premade(batch, batch_size, warmup + steps))
    return timer.times[warmup:]


# -------------------------------------------------------------------------------------------------------- lightly
class LightlyMethod(nn.Module):
    """A lightly model + loss + optimizer; ``step(views)`` is one training step as in lightly's examples."""

    def __init__(
        self,
        method: str,
        cfg: Any,
        backbone: nn.Module,
        dim: int,
        lr: float,
        with_optimizer: bool = True,
        freeze_prototypes_steps: int = 0,
    ) -> None:
        """``with_optimizer=False``: no ``self.opt`` (the caller builds one, as benchmarks/parity.py does);
        ``freeze_prototypes_steps``: SwAV's prototypes get no update for that many steps (``loss(step=...)``)."""
        super().__init__()
        from lightly import loss as LL
        from lightly.models import modules as LM

        self.method, self.backbone, self.k = method, backbone, cfg.method.kwargs
        k, m = self.k, method
        if m == "simclr":
            self.head = LM.SimCLRProjectionHead(dim, k.proj_hidden_dim, k.proj_out_dim, num_layers=k.proj_layers)
            self.criterion = LL.NTXentLoss(temperature=k.temperature)
        elif m in ("moco_v2", "moco_v3", "byol"):
            if m == "moco_v2":
                self.head = LM.MoCoProjectionHead(dim, k.proj_hidden_dim, k.embed_dim)
                self.criterion = LL.NTXentLoss(temperature=k.temperature, memory_bank_size=(k.queue_size, k.embed_dim))
            else:
                out = k.proj_out_dim
                self.head = (
                    LM.BYOLProjectionHead(dim, k.proj_hidden_dim, out)
                    if m == "byol"
                    else LM.MoCoProjectionHead(dim, k.proj_hidden_dim, out, num_layers=2, batch_norm=True)
                )
                self.predictor = LM.BYOLPredictionHead(out, k.pred_hidden_dim, out)
                self.criterion = (
                    LL.NegativeCosineSimilarity() if m == "byol" else LL.NTXentLoss(temperature=k.temperature)
                )
            self.backbone_m, self.head_m = copy.deepcopy(backbone), copy.deepcopy(self.head)
            for p in [*self.backbone_m.parameters(), *self.head_m.parameters()]:
                p.requires_grad = False
        elif m == "simsiam":
            self.head = LM.SimSiamProjectionHead(dim, k.proj_hidden_dim, k.proj_out_dim)
            self.predictor = LM.SimSiamPredictionHead(k.proj_out_dim, k.pred_hidden_dim, k.proj_out_dim)
            self.criterion = LL.NegativeCosineSimilarity()
        elif m == "swav":
            self.head = LM.SwaVProjectionHead(dim, k.proj_hidden_dim, k.proj_out_dim)
            self.prototypes = LM.SwaVPrototypes(
                k.proj_out_dim, k.num_prototypes, n_steps_frozen_prototypes=freeze_prototypes_steps
            )
            self.criterion = LL.SwaVLoss(
                temperature=k.temperature,
                sinkhorn_iterations=k.sinkhorn_iterations,
                sinkhorn_epsilon=k.sinkhorn_epsilon,
            )
        elif m == "dino":

            def head() -> nn.Module:
                return LM.DINOProjectionHead(
                    dim,
                    k.hidden_dim,
                    k.bottleneck_dim,
                    k.out_dim,
                    batch_norm=bool(k.get("use_bn_in_head", False)),
                    norm_last_layer=k.norm_last_layer,
                )

            self.head, self.head_m = head(), head()  # weight-normed: not deep-copyable; a second one, as lightly
            self.head_m.load_state_dict(self.head.state_dict())
            self.backbone_m = copy.deepcopy(backbone)
            for p in [*self.backbone_m.parameters(), *self.head_m.parameters()]:
                p.requires_grad = False
            self.criterion = LL.DINOLoss(
                output_dim=k.out_dim,
                warmup_teacher_temp=k.warmup_teacher_temp,
                teacher_temp=k.teacher_temp,
                warmup_teacher_temp_epochs=k.warmup_teacher_temp_epochs,
                student_temp=k.student_temp,
                center_momentum=k.center_momentum,
            )
        elif m == "mae":
            from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM
            from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MAEDecoderTIMM is deprecated in lightly 1.6 (same computation)
                # "skip" both: the backbone keeps the weights and the position embedding it arrives with (ours:
                # MAE's initialisation, fixed sin-cos table), so parity.py's two sides start from the same weights
                self.encoder = MaskedVisionTransformerTIMM(
                    vit=backbone, weight_initialization="skip", pos_embed_initialization="skip"
                )
                self.decoder = MAEDecoderTIMM(
                    num_patches=backbone.patch_embed.num_patches,
                    patch_size=backbone.patch_embed.patch_size[0],
                    in_chans=int(cfg.data.in_chans),  # pixels per patch: patch_size² × channels (1 on Fashion-MNIST)
                    embed_dim=backbone.embed_dim,
                    decoder_embed_dim=k.decoder_dim,
                    decoder_depth=k.decoder_depth,
                    decoder_num_heads=k.decoder_heads,
                    mlp_ratio=k.decoder_mlp_ratio,
                )
            self.criterion = nn.MSELoss()
        else:
            raise ValueError(f"no lightly counterpart for {method!r}; valid: {', '.join(METHODS)}")
        o = cfg.method.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if not with_optimizer:
            self.opt = None
        elif o.name == "lars":
            from lightly.utils.lars import LARS

            self.opt = LARS(
                params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, trust_coefficient=o.trust_coefficient
            )
        elif o.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def _embed(self, x: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        if momentum:
            with torch.no_grad():
                return self.head_m(self.backbone_m(x).flatten(1))
        return self.head(self.backbone(x).flatten(1))

    def loss(self, views: list[torch.Tensor], step: int | None = None, epoch: int = 0) -> torch.Tensor:
        """The method's loss on ``views``; ``step`` (optimizer steps taken) for SwAV's prototype freezing, ``epoch``
        for DINO's teacher-temperature warmup."""
        m, k = self.method, self.k
        if m == "simclr":
            return self.criterion(self._embed(views[0]), self._embed(views[1]))
        if m == "moco_v2":
            return self.criterion(self._embed(views[0]), self._embed(views[1], momentum=True))
        if m in ("moco_v3", "byol"):
            p0, p1 = self.predictor(self._embed(views[0])), self.predictor(self._embed(views[1]))
            z0, z1 = self._embed(views[0], momentum=True), self._embed(views[1], momentum=True)
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        if m == "simsiam":
            z0, z1 = self._embed(views[0]), self._embed(views[1])
            p0, p1 = self.predictor(z0), self.predictor(z1)
            return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        if m == "swav":
            self.prototypes.normalize()
            out = [self.prototypes(nn.functional.normalize(self._embed(v), dim=1), step) for v in views]
            return self.criterion(out[:2], out[2:])
        if m == "dino":
            teacher = [self._embed(v, momentum=True) for v in views[:2]]
            student = [self._embed(v) for v in views]
            return self.criterion(teacher, student, epoch=epoch)
        # mae
        from lightly.models import utils as LU

        images = views[0]
        b, seq = images.shape[0], self.encoder.sequence_length
        idx_keep, idx_mask = LU.random_token_mask(size=(b, seq), mask_ratio=k.mask_ratio, device=images.device)
        encoded = self.encoder.encode(images=images, idx_keep=idx_keep)
        masked = LU.repeat_token(self.decoder.mask_token, (b, seq))
        masked = LU.set_at_index(masked, idx_keep, self.decoder.embed(encoded).type_as(masked))
        pred = self.decoder.predict(LU.get_at_index(self.decoder.decode(masked), idx_mask))
        patches = LU.patchify(images, self.encoder.vit.patch_embed.patch_size[0])
        target = LU.get_at_index(patches, idx_mask - 1)  # idx_mask counts the class token
        if k.get("norm_pix_loss", False):  # per-patch mean / variance normalised target, as MAE's norm_pix_loss
            target = LU.normalize_mean_var(target, dim=-1)
        return self.criterion(pred, target)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """lightly's EMA of the momentum / teacher copies towards the online backbone and head."""
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_m, m=m)
        update_momentum(self.head, self.head_m, m=m)

    def step(self, views: list[torch.Tensor]) -> None:
        if self.method in ("moco_v2", "moco_v3", "byol", "dino"):
            mom = {
                "moco_v2": self.k.get("momentum", 0.999),
                "moco_v3": self.k.get("momentum", 0.99),
                "byol": self.k.get("momentum", 0.99),
                "dino": self.k.get("momentum", 0.996),
            }
            self.update_momentum(mom[self.method])
        loss = self.loss(views)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def time_lightly(
    model: LightlyMethod, views: list[torch.Tensor], warmup: int, steps: int, bf16: bool = False
) -> list[float]:
    """``model`` and ``views`` on one device; ``bf16``: the step under ``torch.autocast`` (as Lightning's
    ``bf16-mixed`` does for ours)."""
    model.train()
    device = views[0].device
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.step(views)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def step_flops(model: LightlyMethod, views: list[torch.Tensor], bf16: bool = False) -> int:
    """FLOPs of one training step's forward + backward (matrix products and convolutions, as counted by
    ``torch.utils.flop_counter``), on the lightly-built model: the same arithmetic as ours (same backbone, head
    sizes and views), counted once. The optimizer step and element-wise ops are not counted (MFU convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(views)
        loss.backward()
    model.opt.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# -------------------------------------------------------------------------------------------------------- driver
def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose_cfg(method, args)
    views, labels, indices = make_views(cfg, args.batch)
    torch.manual_seed(0)
    ours = build_module(cfg, num_samples=args.batch)
    b = cfg.backbone
    torch.manual_seed(0)  # the same initial backbone weights on both sides
    backbone, dim = create_backbone(
        b.name,
        in_chans=3,
        image_size=cfg.data.image_size,
        width=b.width,
        channels=None,
        small_stem=b.small_stem,
        zero_init_residual=b.zero_init_residual,
        patch_size=b.patch_size,
        drop_path_rate=b.drop_path_rate,
    )
    lr = linear_scaled_lr(cfg.method.optim.base_lr, args.batch, rule=cfg.method.optim.lr_scaling)
    device, bf16 = torch.device(args.device), args.precision == "bf16"
    layout = torch.channels_last if args.lightly_channels_last else torch.contiguous_format
    theirs = LightlyMethod(method, cfg, backbone, dim, lr).to(device, memory_format=layout)
    views = [v.to(device).contiguous(memory_format=layout) for v in views]
    labels, indices = labels.to(device), indices.to(device)
    their_views = views[: 2 if method not in ("swav", "dino", "mae") else None]
    flops = step_flops(theirs, their_views, bf16)
    t_ours: list[float] = []
    t_theirs: list[float] = []
    per_round = []  # paired ratios: the two sides of one round ran back to back, under the same machine load
    for _ in range(args.rounds):
        a = time_ours(ours, (views, labels, indices), args.batch, args.warmup, args.steps, device, bf16)
        b = time_lightly(theirs, their_views, args.warmup, args.steps, bf16)
        per_round.append(round(statistics.median(b) / statistics.median(a), 3))
        t_ours, t_theirs = t_ours + a, t_theirs + b
    ips_ours, ips_theirs = args.batch / statistics.median(t_ours), args.batch / statistics.median(t_theirs)
    sides = [int(v.shape[-1]) for v in views]
    shown = "+".join(f"{sides.count(s)}x{s}" for s in sorted(set(sides), reverse=True))
    tflops = {side: flops * ips / args.batch / 1e12 for side, ips in (("ours", ips_ours), ("lightly", ips_theirs))}
    row = {
        "method": method,
        "backbone": cfg.backbone.name,
        "views": shown,
        "ours_img_s": round(ips_ours, 1),
        "lightly_img_s": round(ips_theirs, 1),
        "ratio": round(ips_ours / ips_theirs, 3),
        "ratio_per_round": per_round,
        "timed_steps": len(t_ours),
        "gflop_per_step": round(flops / 1e9, 3),
        "ours_tflop_s": round(tflops["ours"], 4),
        "lightly_tflop_s": round(tflops["lightly"], 4),
    }
    if args.peak_tflops:  # model FLOP utilisation against the stated peak
        row.update(
            ours_mfu=round(tflops["ours"] / args.peak_tflops, 4),
            lightly_mfu=round(tflops["lightly"] / args.peak_tflops, 4),
        )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed run")
    ap.add_argument("--rounds", type=int, default=2, help="alternations ours / lightly")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--paper-heads", action="store_true", help="keep the configs' head sizes (slow on a CPU)")
    ap.add_argument("--quick", action="store_true", help="batch 16, 1 round, 1 warm-up step (smoke test)")
    ap.add_argument(
        "--backbone",
        default=None,
        help="a conf/backbone name for every method (e.g. resnet50, vit_small); default resnet18 x--width, "
        "MAE vit_tiny patch 4",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="both sides run there")
    ap.add_argument(
        "--precision",
        default="32",
        choices=["32", "bf16"],
        help="bf16: Lightning bf16-mixed for ours, torch.autocast(bfloat16) for lightly's loop",
    )
    ap.add_argument(
        "--lightly-channels-last",
        action="store_true",
        help="lightly's model and inputs in NHWC too (ours is NHWC by default: perf.channels_last)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s at --precision, to report model FLOP utilisation (MFU)",
    )
    ap.add_argument(
        "--ours",
        nargs="+",
        default=[],
        metavar="OVERRIDE",
        help="extra config overrides for our side only, e.g. perf.channels_last=false",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        import lightly  # noqa: F401
    except ImportError:
        ap.error("lightly is not installed: pip install -e '.[bench]' (or pip install lightly)")
    if args.quick:
        args.batch, args.rounds, args.warmup = 16, 1, 1
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per round: no banners
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    rows = [measure(m, args) for m in args.methods]
    where = device_name(torch.device(args.device))  # the card, or the CPU model and torch's thread count
    head = f"{'method':<9}{'views':>14}{'ours img/s':>12}{'lightly img/s':>15}{'ours/lightly':>14}  per round"
    print(
        f"batch {args.batch}, {args.image_size} px, "
        f"{args.backbone or f'resnet18 x{args.width} (mae: vit_tiny/4)'}, {where}, precision {args.precision}, "
        f"load avg {os.getloadavg()[0]:.2f}, ours with {args.ours or 'defaults'}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['method']:<9}{r['views']:>14}{r['ours_img_s']:>12.1f}{r['lightly_img_s']:>15.1f}{r['ratio']:>14.3f}"
            f"  {' '.join(f'{x:.2f}' for x in r['ratio_per_round'])}   "
            f"{r['gflop_per_step']:.1f} GFLOP/step, TFLOP/s ours {r['ours_tflop_s']:.3f} lightly "
            f"{r['lightly_tflop_s']:.3f}"
            + (f", MFU ours {r['ours_mfu']:.1%} lightly {r['lightly_mfu']:.1%}" if "ours_mfu" in r else "")
        )
    res = {
        "batch": args.batch,
        "image_size": args.image_size,
        "width": args.width,
        "steps": args.steps,
        "ours_overrides": args.ours,
        "device": args.device,
        "precision": args.precision,
        "device_name": where,
        "lightly_channels_last": args.lightly_channels_last,
        "peak_tflops": args.peak_tflops,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
    return emit(res, args.json)  # the JSON line last; --json written atomically


if __name__ == "__main__":
    main()
