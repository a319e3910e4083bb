"""A run's record: throughput timing, ``results.json``, and files written without losing what was there.

Nothing here reads a config.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

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
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(payload, indent=2, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mtime_stamp(path: Path) -> str:
    """``path``'s modification time as ``YYYYmmdd-HHMMSS`` (local time), the stamp of kept files."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(Path(path).stat().st_mtime))


def keep_previous(path: Path, stamp: str | None = None) -> Path | None:
    """Rename an existing ``path`` to ``<stem>.<stamp><ext>`` (``stamp``: its mtime unless given, e.g. to keep a
    pair of files under one name; ``-1``, ``-2``... when that name is taken, e.g. several runs within one second),
    so nothing is overwritten; returns the new name, or None if nothing was there.
    ``last.knn.json`` -> ``last.knn.20250101-120000.json``."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = stamp or mtime_stamp(path)
    kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    os.replace(path, kept)
    print(f"[ssl_vision] {path} existed; kept the previous one as {kept.name}")
    return kept


def write_results(run_dir: Path, results: dict) -> Path:
    """Write ``run_dir/results.json``; an existing one is kept as ``results.<mtime>.json``, never overwritten."""
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise KeyError(f"results lack the documented keys {missing}")
    path = Path(run_dir) / "results.json"
    keep_previous(path)
    write_json_atomic(path, results)
    return path
