"""Checkpoint files: safe, verified loading (no arbitrary unpickling, CRC-checked, clear errors for what is not a
checkpoint), atomic writing that refuses a non-finite training state, and the run's checkpoint callback."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

#: the periodic checkpoints' file name (``RunCheckpoint``'s ``filename``) and the names it produces, ``-vN`` included
#: (older versions of the callback wrote ``-v1`` copies when a resumed run rewrote a step)
PERIODIC_FILENAME = "epoch{epoch:03d}-step{step:07d}"
PERIODIC_RE = re.compile(r"^epoch(?P<epoch>\d+)-step(?P<step>\d+)(?:-v\d+)?\.ckpt$")
#: ``AtomicCheckpointIO``'s temporary files: ``.<target name>.tmp-<pid>@<host>`` (``@<host>`` absent in older ones)
TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9._-]+))?$")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy, non-zip format starts so too)


# ------------------------------------------------------------------------------------------------------------ loading
def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without arbitrary unpickling (``weights_only=True``), after checking that it is intact.

    Before ``torch.load`` the file is classified and verified, so that every failure says what the file is and what
    would be right: a missing path, a directory (its ``.ckpt`` files are listed), an empty or text file, a safetensors
    export, bytes that are no torch format at all, a zip cut short (truncated), or an entry whose CRC-32 does not match
    its bytes (a bit flipped on disk or in transfer: torch's own zip reader does not check CRCs, so such a file would
    load silently with a wrong weight). The CRC check reads every entry with :mod:`zipfile` (zlib's CRC-32): about
    0.03 s per 100 MB (measured) from the page cache, plus one read of the file when it is not cached (the
    ``torch.load`` that
    follows then reads it from the cache). Files written without CRCs (torch's ``compute_crc32=False``: every CRC field
    is 0) and legacy non-zip torch files cannot be verified and are loaded as they are. Only a real pickle that names a
    global outside torch's allow-list is refused as unsafe (it could run code).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for everything else, naming the file.
    """
    path = Path(path)
    kind = _inspect(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises, for a disallowed global or a non-torch pickle
        reason = _unpickling_reason(exc)
        if _disallowed_global(exc):
            raise ValueError(
                f"refusing to load {path}: it is not loadable with weights_only=True ({reason}; a file "
                f"that needs arbitrary unpickling can run code). Use a checkpoint written by "
                f"tools/pretrain.py or an export written by tools/export.py"
            ) from exc
        raise ValueError(
            f"cannot read checkpoint {path}: it is a pickle but not a torch checkpoint "
            f"(torch.load with weights_only=True: {reason}). Expected a .ckpt written by "
            f"tools/pretrain.py{_siblings_hint(path)}"
        ) from exc
    except (EOFError, RuntimeError, OSError, KeyError, IndexError, ValueError) as exc:
        what = "a zip archive" if kind == "zip" else "a legacy torch file"
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint (it looks like "
            f"{what} but torch.load fails: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            f". Use an intact one{_siblings_hint(path)}"
        ) from exc


def check_checkpoint_path(path: str | Path) -> Path:
    """The path as a ``Path`` if it names a file; ``FileNotFoundError`` if nothing is there, ``ValueError`` naming the
    ``.ckpt`` files inside if it is a directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.ckpt")) or sorted(path.glob("*/*.ckpt"))
        listed = ", ".join(str(p) for p in found[:8]) + (f" (and {len(found) - 8} more)" if len(found) > 8 else "")
        raise ValueError(
            f"checkpoint path {path} is a directory, not a checkpoint file; pass one file in it, e.g. "
            + (listed if found else "(it holds no .ckpt files; a run keeps them in <run dir>/checkpoints/)")
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist{_siblings_hint(path)}")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a regular file (a device, socket or pipe); pass a .ckpt file")
    return path


def _inspect(path: Path) -> str:
    """Classify ``path`` by its first bytes and verify a zip's CRCs; -> ``"zip"`` | ``"pickle"``, or raise."""
    check_checkpoint_path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
    if size == 0:
        raise ValueError(
            f"cannot read checkpoint {path}: the file is empty (0 bytes; a write that never happened or "
            f"a failed copy). Use an intact one{_siblings_hint(path)}"
        )
    if head.startswith(_ZIP_MAGIC):
        _verify_zip(path, size)
        return "zip"
    if head[0] == _PICKLE_PROTO:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        raise ValueError(
            f"cannot read checkpoint {path}: it is a safetensors file (an exported backbone), not a "
            f"training checkpoint; the evaluation tools read it with checkpoint={path}, but training "
            f"resumes only from a .ckpt written by tools/pretrain.py"
        )
    text = _as_text(head)
    if text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        raise ValueError(
            f"cannot read checkpoint {path}: it is a text file (starting {first!r}), not a torch "
            f"checkpoint. Expected a .ckpt written by tools/pretrain.py (a zip archive){_siblings_hint(path)}"
        )
    raise ValueError(
        f"cannot read checkpoint {path}: it is not a torch checkpoint (a torch checkpoint is a zip "
        f"archive starting with bytes 50 4b 03 04, or a legacy torch pickle starting with 80; this file "
        f"starts with {head[:8].hex(' ')}). Expected a .ckpt written by tools/pretrain.py"
        f"{_siblings_hint(path)}"
    )


def _as_text(head: bytes) -> str | None:
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sample is still text
        if exc.start < len(head) - 4:
            return None
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    return text if text and printable >= 0.95 * len(text) else None


def _verify_zip(path: Path, size: int) -> None:
    """Read every entry of a torch zip with :mod:`zipfile`, which checks each one's CRC-32 at its end."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not any(i.CRC for i in infos if i.file_size):
                return  # written without CRC-32s (torch.utils.serialization.config.save.compute_crc32=False)
            for info in infos:
                try:
                    with zf.open(info, "r") as entry:
                        while entry.read(1 << 22):
                            pass
                except zipfile.BadZipFile as exc:
                    if "CRC" in str(exc):
                        raise ValueError(
                            f"checkpoint {path} is damaged: entry {info.filename} fails its CRC check (a "
                            f"bit flipped on disk or in transfer); use another checkpoint"
                            f"{_siblings_hint(path)}"
                        ) from exc
                    raise ValueError(
                        f"checkpoint {path} is damaged: entry {info.filename} cannot be read ({exc}; the "
                        f"file was altered on disk or in transfer); use another checkpoint"
                        f"{_siblings_hint(path)}"
                    ) from exc
                except (EOFError, OSError, zipfile.LargeZipFile) as exc:
                    raise ValueError(
                        f"cannot read checkpoint {path}: it is truncated (entry {info.filename} ends "
                        f"early: {exc}); use an intact one{_siblings_hint(path)}"
                    ) from exc
    except zipfile.BadZipFile as exc:
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated or damaged (a zip archive of {size} bytes "
            f"whose central directory at the end is missing or unreadable: {exc}; a write or copy that "
            f"was cut short). Use an intact one{_siblings_hint(path)}"
        ) from exc


def _siblings_hint(path: Path) -> str:
    """``" (other checkpoints in <dir>: a.ckpt, b.ckpt)"``, newest first; ``""`` when there are none."""
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()]
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return ""
    if not others:
        return f" (there are no other .ckpt files in {path.parent})"
    names = ", ".join(p.name for p in others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
    return f" (other checkpoints in {path.parent}, newest first: {names})"


def _unpickling_reason(exc: BaseException) -> str:
    """The weights-only unpickler's own reason (torch wraps it in a long paragraph suggesting weights_only=False)."""
    for e in (exc.__context__, exc.__cause__):
        if e is not None and str(e):
            return str(e).strip().splitlines()[0].rstrip(".")
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return (
        m.group(1).strip().splitlines()[0]
        if m
        else text.strip().splitlines()[0]
        if text.strip()
        else "unpickling failed"
    )


def _disallowed_global(exc: BaseException) -> bool:
    """A real pickle that names a global (a class or function) outside torch's weights-only allow-list."""
    texts = " ".join(str(e) for e in (exc, exc.__context__, exc.__cause__) if e is not None)
    return bool(re.search(r"GLOBAL|Unsupported global|Unsupported class", texts))


# ---------------------------------------------------------------------------------------------------- finite state
def _named_tensors(obj: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{name}[{k!r}]" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{name}[{i}]")


def first_nonfinite(obj: Any) -> tuple[str, torch.Tensor] | None:
    """The first floating (or complex) tensor in ``obj`` (nested dicts / lists / tuples, e.g. a whole checkpoint:
    ``state_dict``, ``optimizer_states``, callback and method state) holding a NaN or an infinity, as
    ``(name, tensor)`` with a name such as ``state_dict['backbone.layer1.0.bn1.running_var']``; None when all are
    finite.

    Fast: one sum per tensor instead of an element-wise ``isfinite`` (a sum is finite only if every element is; on
    the CPU summing is several times cheaper) and one synchronisation per device. Only a tensor whose sum is not
    finite -- a NaN or infinity, or finite values so large that their sum overflows -- is checked element by
    element."""
    named = [
        (n, t.detach())
        for n, t in _named_tensors(obj)
        if (t.is_floating_point() or t.is_complex()) and t.numel() and t.device.type != "meta"
    ]
    if not named:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    suspects: list[int] = []
    for idx in by_device.values():
        sums = torch.stack(
            [
                _real(named[i][1]).sum(dtype=torch.float64 if named[i][1].dtype == torch.float64 else torch.float32)
                for i in idx
            ]
        )
        suspects += [i for i, ok in zip(idx, torch.isfinite(sums).cpu().tolist()) if not ok]
    for i in sorted(suspects):
        if not bool(torch.isfinite(named[i][1]).all()):
            return named[i]
    return None


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


#: checkpoint entries that are bookkeeping, not training state: ModelCheckpoint keeps ±inf there ("no score yet")
_NOT_STATE = ("callbacks", "loops")


def training_state(checkpoint: Any) -> Any:
    """What of a checkpoint must be finite: everything but callback and loop bookkeeping (``state_dict``,
    ``optimizer_states``, the method's own state such as the online probe's optimizer)."""
    if isinstance(checkpoint, dict):
        return {k: v for k, v in checkpoint.items() if k not in _NOT_STATE}
    return checkpoint


def describe_nonfinite(name: str, tensor: torch.Tensor) -> str:
    t = tensor.detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"{name} (shape {tuple(t.shape)}: {nan} NaN and {inf} infinite of {t.numel()} values)"


def newest_finite_checkpoint(directory: str | Path) -> tuple[Path, int] | None:
    """The resumable checkpoint in ``directory`` with the highest ``global_step`` that loads (intact, CRCs checked)
    and holds only finite tensors, as ``(path, global_step)``; on a tie ``last.ckpt`` (what ``resume=auto`` takes),
    then the newest file. ``init.ckpt`` (weights before the first step, no optimizer state) does not count. Loads each
    candidate: meant for the moment a run stops, not for every step."""
    directory = Path(directory)
    best: tuple[tuple, Path, int] | None = None
    for p in directory.glob("*.ckpt") if directory.is_dir() else ():
        try:
            ckpt = load_checkpoint(p)
            if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
                continue
            if (ckpt.get("ssl_vision") or {}).get("init"):
                continue
            if first_nonfinite(training_state(ckpt)) is not None:
                continue
            step = int(ckpt["global_step"])
            key = (step, p.name == "last.ckpt", p.stat().st_mtime)
        except (ValueError, OSError):
            continue
        if best is None or key > best[0]:
            best = (key, p, step)
    return None if best is None else (best[1], best[2])


def describe_newest_finite(directory: str | Path | None) -> str:
    """One sentence naming the checkpoint to continue from (:func:`newest_finite_checkpoint`) and how, or saying
    that there is none."""
    if directory is None:
        return "This run writes no checkpoints, so there is none to continue from: fix the cause and start again."
    found = newest_finite_checkpoint(directory)
    if found is None:
        return (
            f"There is no finite checkpoint in {directory} to continue from: fix the cause and start afresh "
            f"(resume=null)."
        )
    path, step = found
    how = (
        f"resume=auto (it takes this run's last.ckpt) or resume={path}"
        if path.name == "last.ckpt"
        else f"resume={path}"
    )
    return (
        f"The newest finite checkpoint is {path} (global step {step}): fix the cause and continue from it with {how}."
    )


# ------------------------------------------------------------------------------------------------------ loop position
def normalize_fit_position(checkpoint: Any, batches_per_epoch: int | None = None) -> str | None:
    """Make a checkpoint's loop progress say where the run stands in its data, in place; returns what was corrected
    (None when nothing was).

    The position that matters is in the train loader's saved state (``loops.fit_loop.state_dict.combined_loader``,
    written by ``ResumableLoader``): epoch ``e`` of the data order, and Lightning's count ``k`` of its batches run
    (``epoch_loop.batch_progress.current.processed``). Lightning also restores from its epoch counters
    (``epoch_progress``), and those are wrong in two situations, each of which made a resumed run silently train
    the wrong samples:

    * **An epoch stopped short** (``trainer.should_stop``: ``trainer.max_time``, a callback, a signal handler that
      sets it; or ``max_steps`` inside an epoch): Lightning marks the epoch processed anyway, and a checkpoint written
      then (``on_train_epoch_end``, ``on_train_end``) sends the resumed run to the next epoch, skipping the rest of
      epoch ``e``. Corrected to "inside epoch ``e``" (``processed = completed = e``), so the run continues at batch
      ``k + 1`` of ``e``.
    * **A checkpoint written on an epoch's last batch** (``checkpoint.every_n_steps`` dividing the epoch): Lightning
      resumes it by closing the epoch but then runs the next epoch without counting it as started (and without its
      ``on_train_epoch_start`` hooks), so the checkpoints of that resumed leg say one epoch fewer, and a further resume
      from one of them trains an epoch again (one epoch too many overall). Such a checkpoint is rewritten into the
      form of one written at that epoch's end (``on_train_epoch_end``), which Lightning resumes at the start of epoch
      ``e + 1``; and the epoch counters of checkpoints written by such a leg (``ready``/``started`` one behind) are set
      to epoch ``e``.

    ``batches_per_epoch``: the trainer's count (``trainer.num_training_batches``) when known; otherwise the loader's
    saved ``num_samples // global_batch``. A checkpoint without a train-loader position of this shape (not written by
    ``tools/pretrain.py``) is left alone.
    """
    fit = ((checkpoint.get("loops") or {}).get("fit_loop")) if isinstance(checkpoint, dict) else None
    if not isinstance(fit, dict):
        return None
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    states = (fit.get("state_dict") or {}).get("combined_loader") or []
    if not (
        isinstance(epochs, dict)
        and isinstance(batches, dict)
        and len(states) == 1
        and isinstance(states[0], dict)
        and "epoch" in states[0]
    ):
        return None
    try:
        current, e, k = batches["current"], int(states[0]["epoch"]), int(batches["current"]["processed"])
        if k <= 0:
            return None  # nothing of the epoch run yet: nothing to place
        if batches_per_epoch is None and states[0].get("global_batch") and states[0].get("num_samples"):
            batches_per_epoch = int(states[0]["num_samples"]) // int(states[0]["global_batch"])
        done = bool(batches.get("is_last_batch")) or (batches_per_epoch is not None and k >= int(batches_per_epoch))
        at_batch_end = int(current["completed"]) == k - 1  # written inside on_train_batch_end
        saved = dict(epochs["current"])
        want = {
            "ready": e + 1,
            "started": e + 1,
            "processed": int(saved["processed"]),
            "completed": int(saved["completed"]),
        }
        what = None
        if not done:
            want["processed"] = want["completed"] = e
            if int(saved["processed"]) > e:
                what = f"epoch {e} was stopped after {k} of its batches; resuming continues it at batch {k + 1}"
        elif at_batch_end:
            want["processed"], want["completed"] = e + 1, e
            current["completed"] = k
            batches["total"]["completed"] = int(batches["total"]["processed"])
            batches["is_last_batch"] = True
            stepped = fit.get("epoch_loop.state_dict")
            if isinstance(stepped, dict) and "_batches_that_stepped" in stepped:
                stepped["_batches_that_stepped"] = int(stepped["_batches_that_stepped"]) + 1
            what = f"written on the last batch of epoch {e}; resuming starts epoch {e + 1}"
        if (int(saved["ready"]), int(saved["started"])) != (e + 1, e + 1) and what is None:
            what = f"its epoch counters said epoch {int(saved['ready']) - 1} for a position in epoch {e}"
        changed = any(epochs[part] != want for part in ("total", "current"))
        if changed or what:
            for part in ("total", "current"):
                epochs[part] = dict(want)
            checkpoint["epoch"] = int(want["completed"])  # trainer.current_epoch as it stands at that position
    except (KeyError, TypeError, ValueError):
        return None  # another layout of the loop state: not ours to rewrite
    return (what or "epoch counters set to the data position") if changed or what else None


# ------------------------------------------------------------------------------------------------------------ writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint writer that never leaves a half-written or non-finite checkpoint behind.

    Lightning's ``TorchCheckpointIO`` serialises to memory and then opens the target for writing, which truncates it:
    a kill or a full disk during the write loses the previous ``last.ckpt`` as well as the new one. Here the bytes go
    to a temporary file in the same directory, are flushed and fsync'ed, and only then ``os.replace`` (atomic on
    POSIX) puts them in place; the directory is fsync'ed too so the rename survives a power cut. On any error the
    temporary file is removed and the previous checkpoint is untouched.

    A state holding a NaN or an infinity in any floating tensor (weights, buffers such as BN statistics, optimizer
    state, method state) is not written at all: a diverged run would otherwise replace ``last.ckpt`` -- the file
    ``resume=auto`` continues from -- with a poisoned one. The writer raises ``FloatingPointError`` naming the first
    non-finite tensor and the newest finite checkpoint in the directory (or saying there is none); the run stops there.

    A SIGKILL during a write leaves ``.<name>.tmp-<pid>@<host>``; such files whose writer process no longer runs on
    this host are removed the next time a checkpoint is written in that directory (a live process's never are).
    """

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading (the file a fit resumes from), then :func:`normalize_fit_position`: a checkpoint
        written before the loop position was kept right resumes where its data position says, with a note."""
        kwargs = {} if map_location is None else {"map_location": map_location}
        checkpoint = super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        what = normalize_fit_position(checkpoint)
        if what:
            print(f"[ssl_vision] {path}: loop position corrected ({what})", flush=True)
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        bad = first_nonfinite(training_state(checkpoint))
        if bad is not None:
            step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
            raise FloatingPointError(
                f"refusing to write checkpoint {path}: the state at global step {step} is not finite, first in "
                f"{describe_nonfinite(*bad)}. Training has diverged (likely a learning rate too high: lower "
                f"method.optim.base_lr or lengthen warmup_epochs; or fp16 overflow: trainer.precision=bf16-mixed). "
                f"{path.name} was not written (any earlier file of that name is untouched) and the run stops here. "
                + describe_newest_finite(path.parent)
            )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}@{_host()}")
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
                raise OSError(
                    errno.ENOSPC,
                    f"writing checkpoint {path} failed after {written / 2**20:.0f} MiB: the disk "
                    f"looks full ({free / 2**20:.0f} MiB free there now, the partial file removed, any "
                    f"previous {path.name} untouched). Free space, or point paths.output_root at a larger "
                    f"disk, or keep fewer checkpoints (checkpoint.save_top_k).",
                ) from exc
            raise
        _fsync_dir(path.parent)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when it cannot be told: such a file is left alone)."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove ``AtomicCheckpointIO`` temporary files in ``directory`` whose writer process is gone (a SIGKILL during
    a write leaves them: a full checkpoint's size each). Only files of this host (or of older versions, which did not
    record the host) are considered, and never one of a live process. Returns the removed paths."""
    removed = []
    if os.name != "posix":
        return removed
    host = _host()
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TMP_RE.match(p.name)
        if m is None or (m["host"] is not None and m["host"] != host):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


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


# ----------------------------------------------------------------------------------------------------------- callback
class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final state of a fit, whose file names never grow a
    ``-vN``, and which keeps the newest ``save_top_k`` periodic checkpoints of the directory.

    * Lightning writes ``last.ckpt`` only together with a periodic checkpoint (and at the end of training only if none
      was written at all), so with ``every_n_train_steps`` a run whose last step is not a multiple of N would end with
      a ``last.ckpt`` some steps old -- and ``results.json`` would point at it. It is written at the end here.
    * ``enable_version_counter`` is off: a resumed run that reaches a step whose file exists (written before a kill,
      or by the run it resumes) replaces it atomically instead of adding ``epoch...-stepN-v1.ckpt``, and ``last.ckpt``
      stays ``last.ckpt`` (Lightning would write ``last-v1.ckpt`` when the restored callback state names another
      last path).
    * After each periodic save the directory's periodic files (``epochNNN-stepNNNNNNN[-vN].ckpt``, left by earlier
      runs in it included) are pruned to the newest ``save_top_k`` steps up to the current one (one file per step,
      the newest). Files of later steps -- from the run that a resume from an earlier checkpoint abandoned -- are left
      until this run reaches and rewrites them; the checkpoint the run resumed from is never removed (Lightning's
      rule).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        kwargs.setdefault("filename", PERIODIC_FILENAME)
        super().__init__(*args, **kwargs)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Every checkpoint of the fit (this callback's, any other's, ``trainer.save_checkpoint``) records the loop
        position its data position says (:func:`normalize_fit_position`), with the trainer's own batch count."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        n = trainer.num_training_batches
        normalize_fit_position(checkpoint, int(n) if isinstance(n, int) or float(n).is_integer() else None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips if this step was saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_top_k > 0 and self.dirpath is not None:
            self._prune_periodic(trainer, int(trainer.global_step))

    def _prune_periodic(self, trainer: L.Trainer, current_step: int) -> None:
        plan = (
            periodic_prune_plan(
                Path(self.dirpath),
                self.save_top_k,
                current_step,
                protect=[p for p in (trainer.ckpt_path, self._last_checkpoint_saved) if p],
            )
            if trainer.is_global_zero
            else None
        )
        keep, remove = trainer.strategy.broadcast(plan, src=0)
        for path in remove:
            self._remove_checkpoint(trainer, str(path))
        # the top-k bookkeeping (saved in the checkpoint) now lists exactly the files kept
        self.best_k_models = {str(p): torch.tensor(step) for p, step in keep}
        if keep:
            self.kth_best_model_path, kth = min(((str(p), s) for p, s in keep), key=lambda x: x[1])
            self.kth_value = torch.tensor(kth)
            self.best_model_path, best = max(((str(p), s) for p, s in keep), key=lambda x: x[1])
            self.best_model_score = torch.tensor(best)


def periodic_prune_plan(directory: Path, keep_k: int, current_step: int, protect=()) -> tuple[list, list]:
    """-> ``(keep, remove)``: ``keep`` the newest ``keep_k`` steps ``<= current_step`` among the periodic files in
    ``directory`` (as ``(path, step)``, one file per step: the newest; ``-vN`` copies count like any file), ``remove``
    the other periodic files of steps ``<= current_step``, minus ``protect``ed paths. Later steps are left alone."""
    protected = {Path(p).resolve() for p in protect}
    by_step: dict[int, list[Path]] = {}
    for p in directory.glob("*.ckpt"):
        m = PERIODIC_RE.match(p.name)
        if m and int(m["step"]) <= current_step:
            by_step.setdefault(int(m["step"]), []).append(p)
    keep, remove = [], []
    for rank, step in enumerate(sorted(by_step, reverse=True)):
        files = sorted(by_step[step], key=lambda p: (p.resolve() in protected, p.stat().st_mtime), reverse=True)
        if rank < keep_k:
            keep.append((files[0], step))
            files = files[1:]
        remove += [p for p in files if p.resolve() not in protected]
    return keep, remove
