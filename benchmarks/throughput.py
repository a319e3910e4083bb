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
* ``bare_fwd_bwd``  backbone forward + backward alone, one pass per view, loss = sum of the outputs' means.

``aug_share = 1 - full_step / no_aug_step`` is the fraction of the step lost to the data pipeline and
``method_overhead = bare_fwd_bwd / no_aug_step`` the method's step time over the bare backbone's. The last stdout
line is one JSON object (also written to ``--json``). With workers, batches prefetched during the warmup of
``full_step`` are served free to its first timed steps: use ``--steps`` well above ``2 × data.num_workers``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ssl_vision.data.batched import is_raw_batch  # noqa: E402
from ssl_vision.launch import build_datamodule, build_module  # noqa: E402
from ssl_vision.objectives.base import StepInfo  # noqa: E402
from ssl_vision.optim import build_optimizer, linear_scaled_lr, param_groups  # noqa: E402
from ssl_vision.training import write_json_atomic  # noqa: E402

RATES = ("full_step", "no_aug_step", "aug_only", "bare_fwd_bwd")
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16": "16-mixed", "16-mixed": "16-mixed"}


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        with contextlib.suppress(OSError):
            name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("model name")), name)
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


def build_stepper(cfg: DictConfig, total_steps: int) -> Stepper:
    torch.manual_seed(int(cfg.seed))
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = PRECISIONS.get(str(cfg.trainer.precision))
    if precision is None or (precision == "16-mixed" and not use_cuda):
        raise ValueError(f"trainer.precision={cfg.trainer.precision} not supported here on {device.type}; "
                         "use 32-true, bf16-mixed (or 16-mixed on CUDA)")
    autocast: Callable[[], contextlib.AbstractContextManager] = (
        contextlib.nullcontext if precision == "32-true" else
        lambda: torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")

    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, num_samples=dm.num_train_samples).to(device).train()
    backbone, objective, bs = module.backbone, module.objective, dm.batch_size
    spec = module.optim_spec
    groups = param_groups(backbone.named_parameters(), spec.weight_decay, name="backbone")
    groups += objective.parameter_groups(spec.weight_decay)
    opt = build_optimizer(spec.name, groups, lr=linear_scaled_lr(spec.base_lr, bs, rule=spec.lr_scaling),
                          momentum=spec.momentum, betas=tuple(spec.betas), nesterov=spec.nesterov,
                          trust_coefficient=spec.trust_coefficient)
    total, done, per_epoch = total_steps, [0], len(dm.train_dataloader())

    def info(indices: torch.Tensor | None = None) -> StepInfo:
        return StepInfo(global_step=done[0], total_steps=total, epoch=done[0] // per_epoch, max_epochs=1,
                        steps_per_epoch=per_epoch, indices=indices)

    def to_device(batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        if is_raw_batch(batch):  # augment.backend=batched: uint8 images to the device, views made there
            batch = dm.batch_views({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                    for k, v in batch.items()})
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

    return Stepper(dm, module, device, precision, bs, to_device, train_step, bare_step)


def measure(cfg: DictConfig, steps: int, warmup: int) -> dict[str, Any]:
    st = build_stepper(cfg, total_steps=2 * (warmup + steps))
    dm, device, bs, precision = st.dm, st.device, st.batch_size, st.precision
    to_device, train_step, bare_step = st.to_device, st.train_step, st.bare_step
    fixed = to_device(next(iter(dm.train_dataloader())))
    train_it, aug_it = batches(dm.train_dataloader()), batches(dm.train_dataloader())
    out = {
        "no_aug_step": rate(lambda: train_step(*fixed), warmup, steps, bs, device),
        "bare_fwd_bwd": rate(lambda: bare_step(fixed[0]), warmup, steps, bs, device),
        "full_step": rate(lambda: train_step(*to_device(next(train_it))), warmup, steps, bs, device),
    }
    del train_it  # stop its workers before timing the loader alone
    # the loader alone; with the batched backend the views are made on the device, so that is included here
    out["aug_only"] = rate((lambda: to_device(next(aug_it))) if dm.backend == "batched" else (lambda: next(aug_it)),
                           warmup, steps, bs, device)
    return {"method": cfg.method.name, "backbone": cfg.backbone.name, "data": cfg.data.name, "batch_size": bs,
            "precision": precision, "backend": dm.backend, "device": device_name(device),
            "threads": torch.get_num_threads(),
            "steps": steps, "warmup": warmup, **{k: round(out[k], 2) for k in RATES},
            "aug_share": round(1.0 - out["full_step"] / out["no_aug_step"], 4),
            "method_overhead": round(out["bare_fwd_bwd"] / out["no_aug_step"], 4)}


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
    parser.add_argument("--json", type=Path, default=None, help="also write the result object here")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    res = measure(compose_cfg(overrides), args.steps, args.warmup)
    print(f"{res['method']} / {res['backbone']} / {res['data']}  batch {res['batch_size']}  {res['precision']}  "
          f"{res['device']}  {res['steps']} steps after {res['warmup']} warmup")
    for k in RATES:
        print(f"  {k:<16}{res[k]:>12.1f} images/s")
    for k in ("aug_share", "method_overhead"):
        print(f"  {k:<16}{res[k]:>12.3f}")
    return emit(res, args.json)


if __name__ == "__main__":
    main()
