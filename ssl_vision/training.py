"""Run plumbing shared by the tools: throughput timing, results files, checkpoint discovery.

Kept apart from ``module.py`` so the LightningModule stays about the method; nothing here reads a config.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch

#: keys every results.json carries (other tools and benchmarks read them; keep stable, see README).
RESULT_KEYS = ("method", "backbone", "data", "steps", "images_seen", "wall_s", "images_per_s", "train_loss",
               "knn_top1", "knn_top1_init", "probe_top1", "checkpoint")


class ThroughputTimer(L.Callback):
    """Wall time of fit, and the training-only time (validation excluded) behind ``images_per_s``."""

    def __init__(self) -> None:
        self.fit_start = self.train_s = 0.0
        self.wall_s = 0.0
        self._epoch_t0: float | None = None
        self._val_t0: float | None = None
        self.images_seen = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training and self._epoch_t0 is not None:  # validation inside an epoch: stop the train clock
            self.train_s += time.perf_counter() - self._epoch_t0
            self._epoch_t0 = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._epoch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images_seen += int(batch[1].shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_t0 is not None:
            self.train_s += time.perf_counter() - self._epoch_t0
            self._epoch_t0 = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.wall_s = time.perf_counter() - self.fit_start

    @property
    def images_per_s(self) -> float:
        return self.images_seen / self.train_s if self.train_s > 0 else 0.0


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_results(run_dir: Path, results: dict) -> Path:
    """Write ``run_dir/results.json``; an existing one is kept as ``results.<mtime>.json``, never overwritten."""
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise KeyError(f"results lack the documented keys {missing}")
    path = Path(run_dir) / "results.json"
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"results.{stamp}.json")
        os.replace(path, kept)
        print(f"[ssl_vision] {path} existed; kept the previous one as {kept.name}")
    write_json_atomic(path, results)
    return path


def find_resume_checkpoint(resume: str | None, search_root: Path, run_prefix: str) -> Path | None:
    """``resume=<path>``: that file (must exist); ``resume=auto``: the newest ``last.ckpt`` of runs named
    ``run_prefix`` under ``search_root`` (None when there is none, so the run starts fresh)."""
    if resume in (None, "", "null"):
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file; pass a path to a .ckpt or resume=auto")
        return path
    candidates = sorted(Path(search_root).glob(f"{run_prefix}/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without arbitrary unpickling (``weights_only=True``); refuse anything else clearly."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise ValueError(f"refusing to load {path}: it is not loadable with weights_only=True (a file that needs "
                         f"arbitrary unpickling can run code). Original error: {exc}") from exc
