#!/usr/bin/env python
"""Training throughput of one method, split into data pipeline, model step and bare backbone.

    python benchmarks/throughput.py experiment=fmnist_simclr --steps 20 --warmup 3 --json tp.json
    python benchmarks/throughput.py method=simclr backbone=resnet18 backbone.width=0.25 data=fashion_mnist \\
        data.batch_size=256 trainer.precision=bf16-mixed

Overrides are those of ``tools/pretrain.py`` (composed from ``conf/pretrain.yaml``). No Lightning Trainer: the
module and datamodule come from :mod:`ssl_vision.launch` and a plain loop is timed, so the numbers are the method's
own cost. The optimizer is the method's own (``method.optim.name``: SGD / LARS / AdamW via
:func:`~ssl_vision.optim.build_optimizer`, same param groups, scaled lr; no lr / weight-decay schedule); the online
probe, logging and the non-finite-loss check of ``SSLModule.training_step`` are left out. After ``--warmup``
untimed steps, each rate (images/s; a sample counts once whatever its number of views) is taken over ``--steps`` steps:

* ``full_step``     next(train loader) + objective forward/backward + ``before_optimizer_step`` + optimizer step
                    + ``after_optimizer_step``;
* ``no_aug_step``   the same step on one pre-fetched batch reused (model only);
* ``aug_only``      iterating the train loader alone (``data.num_workers`` workers, no model);
* ``bare_fwd_bwd``  backbone forward + backward alone, one pass per view, loss = sum of the outputs' means;
* ``backbone_passes`` the backbone passes the method's own step makes, replayed alone: every call of the online
                    backbone with gradients (forward + backward) and of a momentum copy or no-grad pass (forward
                    only), on the inputs and in the order the step made them, recorded by forward hooks on the
                    trunks (:func:`ssl_vision.launch.backbone_trunks`: a ResNet whole, a ViT's ``blocks``).

``aug_share = 1 - full_step / no_aug_step`` is the fraction of the step lost to the data pipeline and
``method_overhead = bare_fwd_bwd / no_aug_step`` the method's step time over the bare backbone's (the
performance target's measure). ``passes_overhead = backbone_passes / no_aug_step`` is the step's time over the
backbone arithmetic the
method itself is defined to do (a MoCo v3 step includes its momentum encoder's forward of both views; MoCo v1/v2
back-propagate the query view only; MAE's encoder sees the visible tokens): what the heads, loss, optimizer and
state updates add. ``passes`` names those passes. With ``--rounds R`` the three model-only rates are timed R
times, alternating (warm-up in full in the first round, one step in later ones): each rate is the median over the
rounds, each overhead the median of the rounds' paired ratios (listed in ``*_per_round``), which on a shared
machine is far steadier than one ratio of two rates timed minutes apart. The last stdout line is one JSON object
(also written to ``--json``). With workers, batches prefetched during the warmup of
``full_step`` are served free to its first timed steps: use ``--steps`` well above ``2 × data.num_workers``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ssl_vision.data.batched import is_raw_batch  # noqa: E402
from ssl_vision.launch import backbone_trunks, build_datamodule, build_module  # noqa: E402
from ssl_vision.objectives.base import StepInfo  # noqa: E402
from ssl_vision.optim import build_optimizer, linear_scaled_lr, param_groups  # noqa: E402
from ssl_vision.run_record import write_json_atomic  # noqa: E402

RATES = ("full_step", "no_aug_step", "aug_only", "bare_fwd_bwd", "backbone_passes")
PRECISIONS = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
}


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        with contextlib.suppress(OSError):
            name = next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                name,
            )
    return f"{name} ({torch.get_num_threads()} threads)"


def batches(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Endless train batches, a new epoch (and sampler order) whenever the loader runs out."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def rate(fn: Callable[[], None], warmup: int, steps: int, batch_size: int, device: torch.device) -> float:
    """images/s of ``fn`` (one batch per call) over ``steps`` calls after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return batch_size * steps / (time.perf_counter() - t0)


@dataclass
class Pass:
    """One backbone call of a training step: the trunk module, its input, and whether gradients were on."""

    module: nn.Module
    x: torch.Tensor
    grad: bool


def record_passes(module: nn.Module, step: Callable[[], None]) -> list[Pass]:
    """Run ``step`` once with forward hooks on the backbone trunks of ``module`` (an ``SSLModule``); return their
    calls in order. Inputs are kept (detached): :func:`replay_passes` runs the same calls again."""
    passes: list[Pass] = []

    def hook(mod: nn.Module, args: tuple, _out: Any) -> None:
        passes.append(Pass(mod, args[0].detach(), torch.is_grad_enabled()))

    handles = [module.get_submodule(n).register_forward_hook(hook) for n in backbone_trunks(module)]
    try:
        step()
    finally:
        for h in handles:
            h.remove()
    return passes


def replay_passes(passes: list[Pass], autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """The recorded calls alone: no-grad ones forward only, the others forward + one backward of their sum."""
    for p in passes:
        p.module.zero_grad(set_to_none=True)
    outs = []
    with autocast():
        for p in passes:
            if p.grad:
                outs.append(p.module(p.x).float().mean())
            else:
                with torch.no_grad():
                    p.module(p.x)
    if outs:
        torch.stack(outs).sum().backward()


def describe_passes(passes: list[Pass]) -> str:
    """e.g. ``"fwd+bwd 2x(64, 3, 32, 32); fwd 2x(64, 3, 32, 32)"``: the calls by kind and input shape, in order."""
    parts: list[list] = []
    for p in passes:
        kind, shape = "fwd+bwd" if p.grad else "fwd", tuple(p.x.shape)
        if parts and parts[-1][:2] == [kind, shape]:
            parts[-1][2] += 1
        else:
            parts.append([kind, shape, 1])
    return "; ".join(f"{k} {n}x{s}" for k, s, n in parts)


@dataclass
class Stepper:
    """One method's training step as a plain loop (what ``measure`` times), built from a composed config."""

    dm: Any
    module: Any
    device: torch.device
    precision: str
    batch_size: int
    to_device: Callable[[Any], tuple[list[torch.Tensor], torch.Tensor]]
    train_step: Callable[[list[torch.Tensor], torch.Tensor], None]
    bare_step: Callable[[list[torch.Tensor]], None]
    autocast: Callable[[], contextlib.AbstractContextManager]


def build_stepper(cfg: DictConfig, total_steps: int) -> Stepper:
    torch.manual_seed(int(cfg.seed))
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = PRECISIONS.get(str(cfg.trainer.precision))
    if precision is None or (precision == "16-mixed" and not use_cuda):
        raise ValueError(
            f"trainer.precision={cfg.trainer.precision} not supported here on {device.type}; "
            "use 32-true, bf16-mixed (or 16-mixed on CUDA)"
        )
    autocast: Callable[[], contextlib.AbstractContextManager] = (
        contextlib.nullcontext
        if precision == "32-true"
        else lambda: torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")

    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, num_samples=dm.num_train_samples).to(device).train()
    backbone, objective, bs = module.backbone, module.objective, dm.batch_size
    spec = module.optim_spec
    groups = param_groups(backbone.named_parameters(), spec.weight_decay, name="backbone")
    groups += objective.parameter_groups(spec.weight_decay)
    opt = build_optimizer(
        spec.name,
        groups,
        lr=linear_scaled_lr(spec.base_lr, bs, rule=spec.lr_scaling),
        momentum=spec.momentum,
        betas=tuple(spec.betas),
        nesterov=spec.nesterov,
        trust_coefficient=spec.trust_coefficient,
    )
    total, done, per_epoch = total_steps, [0], len(dm.train_dataloader())

    def info(indices: torch.Tensor | None = None) -> StepInfo:
        return StepInfo(
            global_step=done[0],
            total_steps=total,
            epoch=done[0] // per_epoch,
            max_epochs=1,
            steps_per_epoch=per_epoch,
            indices=indices,
        )

    def to_device(batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        if is_raw_batch(batch):  # augment.backend=batched: uint8 images to the device, views made there
            batch = dm.batch_views(
                {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            )
        views, _, indices = batch
        views = views[: objective.num_views] if objective.num_views else views
        return [v.to(device, non_blocking=True) for v in views], indices.to(device, non_blocking=True)

    def train_step(views: list[torch.Tensor], indices: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = objective(views, backbone, info(indices)).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # before_optimizer_step sees unscaled gradients (a no-op unless 16-mixed)
        objective.before_optimizer_step(info())
        scaler.step(opt)
        scaler.update()
        done[0] += 1  # as Lightning's global_step, already counts this step when after_optimizer_step runs
        objective.after_optimizer_step(backbone, info())

    def bare_step(views: list[torch.Tensor]) -> None:
        backbone.zero_grad(set_to_none=True)
        with autocast():
            loss = sum(backbone(v).float().mean() for v in views)
        loss.backward()

    return Stepper(dm, module, device, precision, bs, to_device, train_step, bare_step, autocast)


MODEL_RATES = ("no_aug_step", "bare_fwd_bwd", "backbone_passes")


def measure(cfg: DictConfig, steps: int, warmup: int, rounds: int = 1) -> dict[str, Any]:
    st = build_stepper(cfg, total_steps=(rounds + 2) * (warmup + steps) + 1)
    dm, device, bs, precision = st.dm, st.device, st.batch_size, st.precision
    to_device, train_step, bare_step = st.to_device, st.train_step, st.bare_step
    fixed = to_device(next(iter(dm.train_dataloader())))
    train_it, aug_it = batches(dm.train_dataloader()), batches(dm.train_dataloader())
    passes = record_passes(st.module, lambda: train_step(*fixed))
    model = {
        "no_aug_step": lambda: train_step(*fixed),
        "bare_fwd_bwd": lambda: bare_step(fixed[0]),
        "backbone_passes": lambda: replay_passes(passes, st.autocast),
    }
    # the model-only rates alternate round by round: a ratio of two rates of one round shares that round's load
    per_round = {k: [] for k in MODEL_RATES}
    for r in range(rounds):
        for k in MODEL_RATES:
            per_round[k].append(rate(model[k], warmup if r == 0 else min(warmup, 1), steps, bs, device))
    out = {k: statistics.median(v) for k, v in per_round.items()}
    out["full_step"] = rate(lambda: train_step(*to_device(next(train_it))), warmup, steps, bs, device)  # noqa: F821 (del below)
    del train_it  # stop its workers before timing the loader alone
    # the loader alone; with the batched backend the views are made on the device, so that is included here
    out["aug_only"] = rate(
        (lambda: to_device(next(aug_it))) if dm.backend == "batched" else (lambda: next(aug_it)),
        warmup,
        steps,
        bs,
        device,
    )
    ratios = {
        name: [a / b for a, b in zip(per_round[num], per_round["no_aug_step"])]
        for name, num in (("method_overhead", "bare_fwd_bwd"), ("passes_overhead", "backbone_passes"))
    }
    res = {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        "batch_size": bs,
        "precision": precision,
        "backend": dm.backend,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        **{k: round(out[k], 2) for k in RATES},
        "aug_share": round(1.0 - out["full_step"] / out["no_aug_step"], 4),
        **{k: round(statistics.median(v), 4) for k, v in ratios.items()},
        "passes": describe_passes(passes),
    }
    if rounds > 1:
        res.update({f"{k}_per_round": [round(x, 3) for x in v] for k, v in ratios.items()})
    return res


def emit(res: dict[str, Any], json_path: Path | None) -> dict[str, Any]:
    """The benchmarks' common ending: ``res`` to ``json_path`` (atomically) when given, and as the last stdout line."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, res)
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternations of the model-only rates (medians reported; ratios paired per round)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result object here")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    res = measure(compose_cfg(overrides), args.steps, args.warmup, args.rounds)
    print(
        f"{res['method']} / {res['backbone']} / {res['data']}  batch {res['batch_size']}  {res['precision']}  "
        f"{res['device']}  {res['steps']} steps after {res['warmup']} warmup"
    )
    for k in RATES:
        print(f"  {k:<16}{res[k]:>12.1f} images/s")
    for k in ("aug_share", "method_overhead", "passes_overhead"):
        print(f"  {k:<16}{res[k]:>12.3f}")
    print(f"  passes          {res['passes']}")
    for k in ("method_overhead_per_round", "passes_overhead_per_round"):
        if k in res:
            print(f"  {k}: {res[k]}")
    return emit(res, args.json)


if __name__ == "__main__":
    main()
