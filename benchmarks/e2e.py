#!/usr/bin/env python
"""The whole pretraining command's steady images/s beside each of its stages alone, on the same settings.

    python benchmarks/e2e.py experiment=fmnist_simclr augment.backend=batched data.num_workers=1 --steps 30
    python benchmarks/e2e.py --device cuda method=moco_v3 backbone=resnet50 data=synthetic data.image_size=224 \\
        data.synthetic_size=65536 data.num_workers=14 data.batch_size=256 augment.backend=batched --steps 60

Overrides are those of ``tools/pretrain.py``; ``--device cuda`` adds ``trainer=gpu`` (bf16-mixed) unless a
``trainer=`` override is given, ``--device cpu`` forces ``trainer.accelerator=cpu``. Stages (images/s; a sample
counts once whatever its number of views), each after untimed warm-up:

* ``whole``   the real ``run_pretraining`` path (``tools/pretrain.py`` without Hydra's CLI): Lightning Trainer,
              loader workers, batch transfer, ``on_after_batch_transfer`` (batched views), ``training_step`` with
              the online probe and logging, optimizer step and the method's hooks. A callback times the batches
              after the first ``--warmup`` (validation, if any falls inside, excluded); on CUDA it synchronises
              twice (start and end of the window), never per step. ``trainer.max_steps`` = warmup + steps.
* ``step``    the model step alone: one batch already on the device (views made once), objective forward,
              backward, the method's optimizer and hooks (``benchmarks/throughput.py``'s ``no_aug_step``).
* ``loader``  the train loader alone (``data.num_workers`` workers, ``data.pin_memory``), iterated past its
              prefetch buffer before timing: per_sample -> augmented views; batched -> raw uint8 batches.
* ``aug``     ``augment.backend=batched`` only: one raw batch already on the device -> the views
              (``BatchedViews``), repeated.
* ``synthetic_gen``  ``data=synthetic`` only: the data set's own item generation (PIL images) in this process.
* ``whole_no_prefetch``  not run unless named in ``--stages``: ``whole`` again with ``data.device_prefetch=false``
              (each batch copied to the device right before its step, on the compute stream, instead of during the
              step before on a side stream; ``ssl_vision/data/prefetch.py``). ``prefetch_gain`` = ``whole`` /
              ``whole_no_prefetch``; on the CPU the prefetch is a pass-through and both run the same path.

``whole_over_step`` is the fraction of the model step's speed the whole command keeps (1.0: nothing but the model
step counts); ``loader_over_step`` and ``aug_over_step`` say which stage could bound it (< 1: it does). Prints a
table and one JSON line (also written atomically to ``--json``). With loader workers, batches prefetched during
the warm-up are served free to the first timed steps: use ``--steps`` well above ``num_workers x prefetch_factor``
(``prefetch_buffer`` in the JSON; a warning says when it is not).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.throughput import batches, build_stepper, device_name, emit, rate  # noqa: E402
from ssl_vision.data.batched import is_raw_batch  # noqa: E402
from ssl_vision.launch import run_pretraining  # noqa: E402

STAGES = ("whole", "step", "loader", "aug", "synthetic_gen", "whole_no_prefetch")
DEFAULT_STAGES = ("whole", "step", "loader", "aug", "synthetic_gen")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SteadyTimer(L.Callback):
    """Images/s of the training batches after the first ``warmup`` ones: the clock starts at the end of batch
    ``warmup`` and stops at the end of batch ``warmup + steps`` (CUDA synchronised at those two points only);
    validation inside the window is subtracted."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.batches = self.images = 0
        self.t0: float | None = None
        self.elapsed = self.paused = 0.0
        self._val_t0: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches == self.warmup:
            _sync(pl_module.device)
            self.t0 = time.perf_counter()
        elif self.t0 is not None and self.batches <= self.warmup + self.steps:
            self.images += int(batch[1].shape[0])
            if self.batches == self.warmup + self.steps:
                _sync(pl_module.device)
                self.elapsed = time.perf_counter() - self.t0 - self.paused

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_t0 is not None and self.t0 is not None:
            self.paused += time.perf_counter() - self._val_t0
        self._val_t0 = None

    @property
    def images_per_s(self) -> float:
        if self.elapsed <= 0:
            raise RuntimeError(
                f"the timed window did not complete: {self.batches} batches ran, {self.warmup} + {self.steps} needed"
            )
        return self.images / self.elapsed


def compose_run_cfg(overrides: list[str], run_dir: Path) -> DictConfig:
    """The composed pretrain config with Hydra's runtime set to ``run_dir``, as ``tools/pretrain.py`` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def device_overrides(device: str, overrides: list[str]) -> list[str]:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        return [] if any(o.startswith("trainer=") for o in overrides) else ["trainer=gpu"]
    return ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto"]


def loader_rate(dm, steps: int, warmup: int) -> float:
    """The train loader alone; the warm-up also drains its prefetch buffer, so the timed batches are made while
    they are timed."""
    it = batches(dm.train_dataloader())
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        next(it)
    elapsed = time.perf_counter() - t0
    del it
    return dm.batch_size * steps / elapsed


def synthetic_rate(ds, n: int) -> float:
    """Items of the synthetic train set (PIL image + label) per second, in this process."""
    n = min(n, len(ds))
    ds[0]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


def measure(
    overrides: list[str], device: str, steps: int, warmup: int, run_dir: Path, stages: tuple[str, ...] = STAGES
) -> dict[str, Any]:
    base = [
        "logger=none",
        "eval.final_eval=false",
        "eval.knn_at_init=false",
        "checkpoint.save_init=false",
        *device_overrides(device, overrides),
        *overrides,
    ]
    cfg = compose_run_cfg([*base, f"paths.output_root={run_dir / 'outputs'}"], run_dir / "run")
    workers = int(cfg.data.num_workers)
    buffer = workers * 2  # DataLoader's default prefetch_factor
    st = build_stepper(cfg, total_steps=10 * (warmup + steps) + 10)
    dev, dm, bs = st.device, st.dm, st.batch_size
    res: dict[str, Any] = {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        "image_size": int(cfg.data.image_size),
        "batch_size": bs,
        "precision": st.precision,
        "backend": dm.backend,
        "num_workers": workers,
        "pin_memory": dm.pin_memory,
        "device_prefetch": dm.device_prefetch,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "device": device_name(dev),
        "steps": steps,
        "warmup": warmup,
        "prefetch_buffer": buffer,
        "log_every_n_steps": int(cfg.trainer.log_every_n_steps),
    }
    if "synthetic_gen" in stages and cfg.data.name == "synthetic":
        res["synthetic_gen"] = round(synthetic_rate(dm.train_dataset, max(200, 4 * bs)), 1)
    if "loader" in stages:
        res["loader"] = round(loader_rate(dm, steps, max(warmup, buffer + 1)), 2)
    raw = next(iter(dm.train_dataloader()))
    if "aug" in stages and is_raw_batch(raw):
        on_dev = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in raw.items()}
        res["aug"] = round(rate(lambda: dm.batch_views(on_dev), warmup, steps, bs, dev), 2)  # noqa: F821 (del below)
    if "step" in stages:
        fixed = st.to_device(raw)
        res["step"] = round(rate(lambda: st.train_step(*fixed), warmup, steps, bs, dev), 2)  # noqa: F821
        del fixed
    del st, dm, raw
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for stage, extra in (("whole", []), ("whole_no_prefetch", ["data.device_prefetch=false"])):
        if stage in stages:
            res[stage] = whole_rate([*base, *extra], run_dir / stage, warmup, steps, dev)
    for k in ("whole", "loader", "aug", "whole_no_prefetch"):
        if k in res and "step" in res:
            res[f"{k}_over_step"] = round(res[k] / res["step"], 4)
    if "whole" in res and "whole_no_prefetch" in res:
        res["prefetch_gain"] = round(res["whole"] / res["whole_no_prefetch"], 4)
    if workers and steps < 4 * buffer:
        warnings.warn(
            f"--steps {steps} is not well above the loader's prefetch buffer ({buffer} batches): the "
            "whole-run rate may be overstated when the loader bounds it",
            stacklevel=2,
        )
    return res


def whole_rate(overrides: list[str], run_dir: Path, warmup: int, steps: int, dev: torch.device) -> float:
    """The ``whole`` stage: ``run_pretraining`` for ``warmup + steps`` steps, images/s of the last ``steps``."""
    cfg = compose_run_cfg(
        [*overrides, f"paths.output_root={run_dir / 'outputs'}", f"trainer.max_steps={warmup + steps}"], run_dir / "run"
    )
    timer = SteadyTimer(warmup, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pretraining(cfg, extra_callbacks=[timer])
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return round(timer.images_per_s, 2)


def print_table(res: dict[str, Any]) -> None:
    print(
        f"{res['method']} / {res['backbone']} / {res['data']} {res['image_size']}px  batch {res['batch_size']}  "
        f"{res['precision']}  {res['backend']}  workers {res['num_workers']}  threads {res['threads']}  "
        f"{res['device']}  {res['steps']} steps after {res['warmup']}  device_prefetch {res['device_prefetch']}"
    )
    for k in STAGES:
        if k in res:
            ratio = f"{res[k] / res['step']:>8.3f} x step" if "step" in res else ""
            print(f"  {k:<18}{res[k]:>12.1f} images/s {ratio}")
    if "prefetch_gain" in res:
        print(f"  whole / whole_no_prefetch: {res['prefetch_gain']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (batches) per stage")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each stage's window")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in this process")
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {', '.join(STAGES)} (default: all but whole_no_prefetch)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result object here (atomically)")
    args, overrides = parser.parse_known_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; valid: {', '.join(STAGES)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        res = measure(overrides, args.device, args.steps, args.warmup, Path(tmp), stages)
    print_table(res)
    return emit(res, args.json)


if __name__ == "__main__":
    main()
