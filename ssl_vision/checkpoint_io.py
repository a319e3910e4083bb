"""Checkpoint files: safe loading (no arbitrary unpickling), atomic writing, and the run's checkpoint callback."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


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
