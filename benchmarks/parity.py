#!/usr/bin/env python
"""kNN parity with lightly: each method trained by ssl_vision and by a lightly-built counterpart under one recipe.

    pip install -e '.[bench]'                                  # lightly 1.6 (optional extra)
    python benchmarks/parity.py                                # every method, its experiment=fmnist_<method> recipe
    python benchmarks/parity.py --methods simclr byol --steps 200 --seeds 0 1 --json parity.json
    python benchmarks/parity.py --steps 156 --rows parity.jsonl --override data.batch_size=128   # the RESULTS.md table;
        # --rows keeps every finished pair, so a killed run continues where it stopped when started again
    python benchmarks/parity.py --methods simclr --heads ours ...   # lightly's loss on our projection head
    python benchmarks/parity.py --methods simclr --steps 2 --seeds 0 --recipe none \
        --override data=synthetic data.synthetic_size=64 data.batch_size=16     # smoke test

What is the same on both sides, per method and seed:

* **Data.** One :class:`~ssl_vision.data.SSLDataModule` (the recipe's data set, views and batch): its train loader
  draws the order from ``(seed, epoch)`` and each sample's views from ``(seed, epoch, index)``, so both sides train
  on the same batches of the same views, in the same order. The sample indices each side saw are compared
  (``same_batches``).
* **Backbone initialisation.** lightly's side gets a copy of our backbone as built, before our first step.
* **Heads.** lightly's heads (``lightly.models.modules``) of our sizes (``method.kwargs``), built by
  :class:`benchmarks.vs_lightly.LightlyMethod`; their initialisation is lightly's (the libraries' modules differ).
* **Optimizer and schedule.** Ours (``ssl_vision.optim``) over lightly's model: the same optimizer type and values,
  the same weight-decay groups (1-D tensors excluded), SimSiam's fixed predictor lr, the lr scaled by the batch, and
  the warmup-cosine of our run (its length and warmup read from our scheduler) for ``--steps`` steps. DINO's
  per-parameter gradient clip when ours clips. The EMA momentum of MoCo / BYOL / DINO follows our objective's
  schedule (``EMATeacher``: constant or cosine to ``momentum_end``, the same update count), applied with lightly's
  ``update_momentum``; SwAV freezes its prototypes for the same number of steps (lightly's
  ``n_steps_frozen_prototypes``); MAE's target is normalised per patch when ours uses ``norm_pix_loss``
  (lightly's ``normalize_mean_var``).
* **Loss scale.** lightly's BYOL and MoCo v3 losses are multiplied by a constant (4 and 4τ,
  :func:`lightly_loss_scale`) so that their gradients have our loss's scale; the other methods' losses already do.
  Reported losses are the scaled ones.
* **Device.** Both sides on the CPU in float32 (the fmnist recipes' setting), one process.
* **Evaluation.** One weighted kNN (:mod:`ssl_vision.eval.knn`, the recipe's ``eval.knn_k[0]`` and
  ``eval.knn_temperature``) on backbone features of the recipe's kNN bank and test split.

What is lightly's: the projection / prediction heads, prototypes, the losses (``NTXentLoss`` with its memory bank
for MoCo v2, ``NegativeCosineSimilarity``, ``SwaVLoss``, ``DINOLoss``, MAE's masked ViT and decoder) and
``update_momentum``. lightly has no MoCo v3: its row is the approximation of ``vs_lightly.py`` (MoCo projection +
BYOL prediction heads, symmetric ``NTXentLoss``), not a reference implementation.

Reports kNN top-1 of both sides per seed, their means, the difference (ours - lightly) and the spread over seeds
(max - min of each side); the kNN of the shared initial backbone (``init_knn_top1``) and the first and last
training loss of each side show that both learn, and in which direction. Prints a table and
one JSON line (also ``--json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.throughput import emit  # noqa: E402
from benchmarks.vs_lightly import LightlyMethod  # noqa: E402
from ssl_vision.eval.features import extract_features  # noqa: E402
from ssl_vision.eval.knn import knn_accuracy  # noqa: E402
from ssl_vision.launch import build_datamodule, build_module  # noqa: E402
from ssl_vision.nn.momentum import ema_momentum  # noqa: E402
from ssl_vision.optim import (  # noqa: E402
    WarmupCosineLR,
    build_optimizer,
    clip_grad_per_param,
    linear_scaled_lr,
    param_groups,
)

#: what lightly 1.6 implements (MoCo v3: the approximation of vs_lightly.py)
METHODS = ("simclr", "moco_v2", "moco_v3", "byol", "simsiam", "swav", "dino", "mae")


def compose_cfg(method: str, recipe: str, seed: int, steps: int, overrides: list[str]) -> Any:
    """The recipe (``experiment=<recipe with {method} filled in>``; ``none``: the method's defaults) for ``steps``
    optimizer steps, without logger, checkpoints or validation (the kNN is run here, the same for both sides)."""
    name = recipe.format(method=method)
    base = [f"method={method}"] if name in ("", "none") else [f"experiment={name}"]
    run = [
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.devices=1",
        "logger=none",
        "eval.knn_at_init=false",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[*base, *run, *overrides])
    GlobalHydra.instance().clear()
    if cfg.augment.get("backend", "per_sample") != "per_sample":
        raise SystemExit(
            f"parity: augment.backend={cfg.augment.backend} makes the views on the device inside our "
            f"module; run with --override augment.backend=per_sample so both sides get the loader's views"
        )
    return cfg


class _Indices(L.Callback):
    """The sample indices of every training batch, and the loss of every step."""

    def __init__(self) -> None:
        self.indices: list[list[int]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch[2].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def train_ours(cfg: Any, dm: Any, steps: int) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Our ``SSLModule`` trained by a Lightning ``Trainer`` for ``steps`` steps on ``dm``; returns the module, a copy
    of its backbone as initialised, and what the other side needs (batches, losses, schedule)."""
    torch.manual_seed(int(cfg.seed))
    module = build_module(cfg, num_samples=dm.num_train_samples)
    init_backbone = copy.deepcopy(module.backbone)
    init_projector = copy.deepcopy(getattr(module.objective, "projector", None))  # for --heads ours
    rec = _Indices()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[rec],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    sched = trainer.lr_scheduler_configs[0].scheduler
    info = {
        "indices": rec.indices,
        "losses": rec.losses,
        "total_steps": int(sched.total_steps),
        "warmup_steps": int(sched.warmup_steps),
        "steps_per_epoch": int(trainer.num_training_batches),
        "init_projector": init_projector,
    }
    return module, init_backbone, info


def lightly_optimizer(model: LightlyMethod, cfg: Any, batch: int, fixed: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """Our optimizer over lightly's model: the backbone's and the heads' parameters in the decayed / not-decayed
    groups ours uses, modules named in ``fixed`` at a fixed lr (SimSiam's predictor)."""
    o = cfg.method.optim
    groups = param_groups(model.backbone.named_parameters(), o.weight_decay, name="backbone")
    seen = {id(p) for p in model.backbone.parameters()}  # MAE's masked encoder wraps the backbone: counted once
    for name, child in model.named_children():
        if name in ("backbone", "backbone_m", "head_m"):  # the online backbone above; EMA copies get no gradient
            continue
        own = [(n, p) for n, p in child.named_parameters() if id(p) not in seen]
        seen |= {id(p) for _, p in own}
        groups += param_groups(own, o.weight_decay, fixed_lr=name in fixed, name=name)
    lr = linear_scaled_lr(o.base_lr, batch, rule=o.lr_scaling)
    return build_optimizer(
        o.name,
        groups,
        lr=lr,
        momentum=o.momentum,
        betas=tuple(o.betas),
        nesterov=o.nesterov,
        trust_coefficient=o.trust_coefficient,
        trust_clip=o.trust_clip,
    )


def lightly_loss_scale(method: str, cfg: Any) -> float:
    """The factor on lightly's loss that gives it our loss's gradient scale, so one optimizer and lr mean the same
    step on both sides. BYOL: ours is the paper's symmetric ``ℓ(p1, z2) + ℓ(p2, z1)`` with ``ℓ = 2 − 2·cos``
    (Grill et al. 2020, eq. 2), lightly's ``0.5·(−cos − cos)``: ours = 4 + 4 × lightly's. MoCo v3: ours is
    ``2τ·(ctr(q1, k2) + ctr(q2, k1))`` (Chen et al. 2021, Alg. 1), the approximation averages two ``NTXentLoss``:
    × 4τ. Every other method's lightly loss is already on our scale (one mean cross-entropy, MSE or −cos)."""
    if method == "byol":
        return 4.0
    if method == "moco_v3":
        return 4.0 * float(cfg.method.kwargs.get("temperature", 1.0))
    return 1.0


def train_lightly(
    method: str,
    cfg: Any,
    dm: Any,
    ours: nn.Module,
    init_backbone: nn.Module,
    info: dict[str, Any],
    heads: str = "lightly",
) -> tuple[nn.Module, dict[str, Any]]:
    """lightly's counterpart (vs_lightly.LightlyMethod) on our initial backbone, trained on the same loader for the
    same steps under our optimizer, schedule and EMA momentum; returns its backbone and its batches and losses.
    ``heads="ours"`` (SimCLR): lightly's loss on a copy of our projection head as initialised, which separates the
    loss from the head."""
    torch.manual_seed(int(cfg.seed) + 1)  # heads: lightly's own initialisation, reproducibly
    backbone = copy.deepcopy(init_backbone)
    with torch.no_grad():  # the feature dim (eval mode: BatchNorm statistics untouched)
        size = int(cfg.data.image_size)
        dim = int(backbone.eval()(torch.zeros(2, int(cfg.data.in_chans), size, size)).shape[1])
    backbone.train()
    objective = ours.objective
    frozen = int(getattr(objective, "freeze_prototypes_niters", 0) or 0) if method == "swav" else 0
    model = LightlyMethod(method, cfg, backbone, dim, lr=0.0, with_optimizer=False, freeze_prototypes_steps=frozen)
    if heads == "ours":
        model.head = copy.deepcopy(info["init_projector"])
    fixed = ("predictor",) if method == "simsiam" and getattr(objective, "fix_pred_lr", False) else ()
    opt = lightly_optimizer(model, cfg, int(cfg.data.batch_size), fixed)
    o = cfg.method.optim
    sched = WarmupCosineLR(
        opt,
        total_steps=info["total_steps"],
        warmup_steps=info["warmup_steps"],
        warmup_start_factor=o.warmup_start_factor,
        final_factor=o.final_factor,
    )
    ema = getattr(objective, "ema", None)
    scale = lightly_loss_scale(method, cfg)
    clip = float(getattr(objective, "clip_grad", 0.0) or 0.0)
    steps, total = len(info["indices"]), info["total_steps"]
    indices, losses = [], []
    model.train()
    loader = dm.train_dataloader()
    step, epoch = 0, 0
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for views, _, index in loader:
            if step >= steps:
                break
            if ema is not None and step > 0:  # our EMA schedule; before step 0 the copies are the online networks
                # ours: BYOL / DINO update after step k (k = 1..T), MoCo before the forward of step k (k = 1..T-1):
                # either way the update before the forward of step k, momentum ema_momentum(k, updates of the run)
                model.update_momentum(ema_momentum(step, ema.num_updates(total), ema.momentum, ema.momentum_end))
            loss = model.loss(views, step=step, epoch=epoch) * scale
            loss.backward()
            if clip > 0:
                clip_grad_per_param([p for p in model.parameters() if p.grad is not None], clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            indices.append(index.tolist())
            losses.append(float(loss.detach()))
            step += 1
        epoch += 1
    return model.backbone, {"indices": indices, "losses": losses, "loss_scale": scale}


def knn_top1(backbone: nn.Module, dm: Any, cfg: Any) -> float:
    """Weighted kNN top-1 (%) of ``backbone``'s features: the recipe's kNN bank and test split, k and T."""
    bank_loader, test_loader = dm.val_dataloader()
    device = torch.device("cpu")
    backbone = backbone.to(device)
    xb, yb = extract_features(backbone, bank_loader, device)
    xt, yt = extract_features(backbone, test_loader, device)
    k = int(cfg.eval.knn_k[0])
    res = knn_accuracy(xb, yb, xt, yt, int(cfg.data.num_classes), ks=[k], temperature=float(cfg.eval.knn_temperature))
    return round(float(res[k]["top1"]), 2)


def run_pair(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose_cfg(method, args.recipe, seed, args.steps, args.override)
    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup()
    t0 = time.perf_counter()
    ours, init_backbone, info = train_ours(cfg, dm, args.steps)
    t1 = time.perf_counter()
    their_backbone, theirs = train_lightly(method, cfg, dm, ours, init_backbone, info, heads=args.heads)
    t2 = time.perf_counter()
    row = {
        "method": method,
        "seed": seed,
        "steps": len(info["indices"]),
        "same_batches": info["indices"] == theirs["indices"],
        "init_knn_top1": knn_top1(init_backbone, dm, cfg) if args.init_knn else None,
        "ours_knn_top1": knn_top1(ours.backbone, dm, cfg),
        "lightly_knn_top1": knn_top1(their_backbone, dm, cfg),
        "ours_loss_first_last": [round(info["losses"][0], 4), round(info["losses"][-1], 4)],
        "lightly_loss_first_last": [round(theirs["losses"][0], 4), round(theirs["losses"][-1], 4)],
        "lightly_loss_scale": theirs["loss_scale"],
        "ours_train_s": round(t1 - t0, 1),
        "lightly_train_s": round(t2 - t1, 1),
    }
    print(
        f"parity: {method} seed {seed}: kNN init {row['init_knn_top1']}, ours {row['ours_knn_top1']}, "
        f"lightly {row['lightly_knn_top1']} ({row['ours_train_s']} s / {row['lightly_train_s']} s of training)",
        file=sys.stderr,
        flush=True,
    )
    if not row["same_batches"]:
        raise RuntimeError(
            f"parity {method} seed {seed}: the two sides trained on different batches; the data "
            f"module's order is not deterministic here"
        )
    return row


def pair_key(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """What makes two pairs the same measurement: method, seed, steps, recipe and overrides."""
    key = {"method": method, "seed": seed, "steps": args.steps, "recipe": args.recipe, "overrides": args.override}
    return key if args.heads == "lightly" else {**key, "heads": args.heads}


def load_rows(path: Path | None) -> list[dict[str, Any]]:
    """The finished pairs of an earlier run with this ``--rows`` file (one JSON object a line); a line cut off by a
    kill is skipped."""
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_or_reuse(method: str, seed: int, args: argparse.Namespace, done: list[dict[str, Any]]) -> dict[str, Any]:
    """A pair from ``--rows`` when it holds the same measurement, else run it and append it there at once, so a
    crash or a kill later in a long run loses only the pair in progress."""
    key = pair_key(method, seed, args)
    for row in done:
        if row.get("key") == key:
            print(f"parity: {method} seed {seed}: reused from {args.rows}", file=sys.stderr, flush=True)
            return {k: v for k, v in row.items() if k != "key"}
    row = run_pair(method, seed, args)
    if args.rows is not None:
        with open(args.rows, "a") as f:
            f.write(json.dumps({**row, "key": key}) + "\n")
    return row


def summarise(method: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    ours = [r["ours_knn_top1"] for r in rows]
    theirs = [r["lightly_knn_top1"] for r in rows]
    mean = lambda xs: round(sum(xs) / len(xs), 2)  # noqa: E731
    return {
        "method": method,
        "seeds": [r["seed"] for r in rows],
        "ours_knn_top1": ours,
        "lightly_knn_top1": theirs,
        "ours_mean": mean(ours),
        "lightly_mean": mean(theirs),
        "diff": round(mean(ours) - mean(theirs), 2),
        "ours_spread": round(max(ours) - min(ours), 2),
        "lightly_spread": round(max(theirs) - min(theirs), 2),
        "init_mean": None if rows[0]["init_knn_top1"] is None else mean([r["init_knn_top1"] for r in rows]),
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per side")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument(
        "--recipe",
        default="fmnist_{method}",
        help="experiment name, {method} filled in (default: each method's fmnist_<method>); "
        "none: the method's defaults",
    )
    ap.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="OVERRIDE",
        help="config overrides for both sides, e.g. data.train_subset=5000",
    )
    ap.add_argument(
        "--no-init-knn",
        dest="init_knn",
        action="store_false",
        help="skip the kNN of the shared initial backbone (the baseline both sides start from)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument(
        "--heads",
        choices=("lightly", "ours"),
        default="lightly",
        help="lightly's side with lightly's heads (default) or, for SimCLR, with a copy of our projection head as "
        "initialised (only the loss is lightly's)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="JSON-lines file: each finished pair is appended at once, and pairs already there (same method, seed, "
        "steps, recipe, overrides) are reused, so an interrupted run continues where it stopped",
    )
    args = ap.parse_args(argv)
    if args.heads == "ours" and set(args.methods) != {"simclr"}:
        ap.error(f"--heads ours is for SimCLR (one projection head), got --methods {' '.join(args.methods)}")
    if args.steps < 1:
        ap.error(f"--steps must be a positive number of optimizer steps, got {args.steps}")
    try:
        import lightly  # noqa: F401
    except ImportError:
        ap.error("lightly is not installed: pip install -e '.[bench]' (or pip install lightly)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    done = load_rows(args.rows)
    rows = [summarise(m, [run_or_reuse(m, s, args, done) for s in args.seeds]) for m in args.methods]
    print(
        f"{args.steps} steps per side, seeds {args.seeds}, recipe {args.recipe}, overrides {args.override or '-'}, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'method':<9}{'init kNN':>10}{'ours kNN':>10}{'lightly kNN':>13}{'diff':>8}"
        f"{'spread ours':>13}{'spread lightly':>16}"
        f"  loss first->last (ours | lightly, first seed)"
    )
    for r in rows:
        first = r["runs"][0]
        init = "-" if r["init_mean"] is None else f"{r['init_mean']:.2f}"
        print(
            f"{r['method']:<9}{init:>10}{r['ours_mean']:>10.2f}{r['lightly_mean']:>13.2f}{r['diff']:>+8.2f}"
            f"{r['ours_spread']:>13.2f}{r['lightly_spread']:>16.2f}  "
            f"{first['ours_loss_first_last'][0]:.3f}->{first['ours_loss_first_last'][1]:.3f} | "
            f"{first['lightly_loss_first_last'][0]:.3f}->{first['lightly_loss_first_last'][1]:.3f}"
        )
    res = {
        "steps": args.steps,
        "seeds": args.seeds,
        "recipe": args.recipe,
        "heads": args.heads,
        "overrides": args.override,
        "threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
    return emit(res, args.json)  # the JSON line last; --json written atomically


if __name__ == "__main__":
    main()
