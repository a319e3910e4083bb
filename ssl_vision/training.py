"""Run plumbing shared by the tools: throughput timing, results files, checkpoint discovery.

Kept apart from ``module.py`` so the LightningModule stays about the method; nothing here reads a config.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


def find_resume_checkpoint(resume: str | None, search_root: Path, run_prefix: str) -> Path | None:
    """``resume=<path>``: that file (must exist); ``resume=auto``: the newest ``last.ckpt`` of runs named
    ``run_prefix`` under ``search_root`` (None when there is none, so the run starts fresh).

    Single runs live in ``<root>/<prefix>/<time>/``, multirun (``-m``, submitit) jobs in
    ``<root>/multirun/<time>/<job num>-<prefix>/`` (``hydra.run`` / ``hydra.sweep`` in conf/pretrain.yaml): both count.
    """
    if resume in (None, "", "null"):
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file; pass a path to a .ckpt or "
                                    f"resume=auto")
        return path
    root = Path(search_root)
    candidates = [*root.glob(f"{run_prefix}/*/checkpoints/last.ckpt"),
                  *root.glob(f"multirun/*/*-{run_prefix}/checkpoints/last.ckpt")]
    candidates.sort(key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def check_resume_compatible(path: Path, method: str, backbone: dict[str, Any], data: dict[str, Any]) -> dict:
    """Read ``path`` safely (:func:`load_checkpoint`) and check it was written by a run of the same method, backbone
    (name, width, channels, patch size...) and input shape (``in_chans``, ``image_size``) as this one.

    A mismatch would otherwise surface as a page of missing / unexpected ``state_dict`` keys from Lightning (or, worse,
    load into a differently shaped model); this says what the checkpoint holds and what would be right.
    Returns the loaded checkpoint.
    """
    ckpt = load_checkpoint(path)
    info = (ckpt.get("ssl_vision") or {}).get("run_info") if isinstance(ckpt, dict) else None
    if not info or "method" not in info or "state_dict" not in ckpt:
        raise ValueError(f"resume={str(path)!r} is not an ssl_vision pretraining checkpoint (no ssl_vision.run_info / "
                         f"state_dict); resume from a checkpoints/last.ckpt written by tools/pretrain.py")
    had_backbone = info.get("backbone") or {}
    had_data = info.get("data") or {}
    problems = []
    if info["method"] != method:
        problems.append(f"method={info['method']} (this run: method={method})")
    keys = [k for k in ("name", "width", "channels", "patch_size", "small_stem") if k in had_backbone and k in backbone]
    for k in keys:
        if had_backbone[k] != backbone[k]:
            problems.append(f"backbone.{k}={had_backbone[k]} (this run: {backbone[k]})")
    for k in ("in_chans", "image_size"):
        if k in had_data and k in data and had_data[k] != data[k]:
            problems.append(f"data.{k}={had_data[k]} (this run: {data[k]})")
    if problems:
        raise ValueError(f"resume={str(path)!r} was written by another kind of run: {'; '.join(problems)}. Resume it "
                         f"with the same settings (method={info['method']} backbone={had_backbone.get('name')} ...), "
                         f"start fresh with resume=null, or evaluate it with tools/knn_eval.py checkpoint=...")
    return ckpt


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without arbitrary unpickling (``weights_only=True``); refuse anything else clearly."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for objects outside its allow-list
        raise ValueError(f"refusing to load {path}: it is not loadable with weights_only=True (a file that needs "
                         f"arbitrary unpickling can run code). Original error: {exc}") from exc
    except (EOFError, RuntimeError, OSError) as exc:  # truncated zip, not a torch file, unreadable
        raise ValueError(f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({exc}). Use an "
                         f"intact one (checkpoints/ keeps save_top_k periodic ones besides last.ckpt)") from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer that never leaves a half-written checkpoint behind.

    Lightning's ``TorchCheckpointIO`` serialises to memory and then opens the target for writing, which truncates it:
    a kill or a full disk during the write loses the previous ``last.ckpt`` as well as the new one. Here the bytes go
    to a temporary file in the same directory, are flushed and fsync'ed, and only then ``os.replace`` (atomic on
    POSIX) puts them in place; the directory is fsync'ed too so the rename survives a power cut. On any error the
    temporary file is removed and the previous checkpoint is untouched. A SIGKILL can leave a stale
    ``.<name>.tmp-<pid>`` file, which nothing reads.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            written = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            if _looks_like_full_disk(exc):
                free = shutil.disk_usage(path.parent).free
                raise OSError(errno.ENOSPC, f"writing checkpoint {path} failed after {written / 2**20:.0f} MiB: the disk "
                              f"looks full ({free / 2**20:.0f} MiB free there now, the partial file removed, any "
                              f"previous {path.name} untouched). Free space, or point paths.output_root at a larger "
                              f"disk, or keep fewer checkpoints (checkpoint.save_top_k).") from exc
            raise
        _fsync_dir(path.parent)


def _looks_like_full_disk(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, or the message torch's zip writer gives when a write comes up short (what a full disk does to
    ``torch.save``: ``[enforce fail at inline_container.cc] . unexpected pos N vs M``)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final state of a fit.

    Lightning writes ``last.ckpt`` only together with a periodic checkpoint (and at the end of training only if none
    was written at all), so with ``every_n_train_steps`` a run whose last step is not a multiple of N would end with a
    ``last.ckpt`` some steps old -- and ``results.json`` would point at it.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips if this step was saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
