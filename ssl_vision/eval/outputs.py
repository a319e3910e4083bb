"""Where the evaluation tools write, and how they report a place they cannot write to.

Every tool (kNN, linear probe, export, embedding plot) writes ``<checkpoint stem><suffix>`` beside the checkpoint,
or into ``output_dir`` when it is set (:func:`output_path`). The tools compute first, then write, and print their
result JSON whatever happens to the write (:func:`publish`): a checkpoint in a read-only directory (a shared
model store, a mounted bucket) still gets evaluated, its numbers are printed, and the error that follows says
which file could not be written and names ``output_dir=<folder>``.

Files are written to a temporary name in the target directory and renamed (never half-written), with the mode a
plain ``open()`` would give (``0o666`` minus the umask: ``0o644`` under umask 022), also for safetensors files,
which the safetensors library itself creates as ``0o600``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from ssl_vision.run_record import keep_previous, write_json_atomic

__all__ = [
    "OutputNotWritable",
    "output_path",
    "explain_write_errors",
    "publish",
    "exit_on_unwritable_output",
    "writable",
    "warn_if_unwritable",
    "default_file_mode",
    "save_safetensors_atomic",
    "write_result_json",
    "OPTION",
]

#: the config key of every evaluation tool that moves its outputs away from the checkpoint
OPTION = "output_dir"
#: errno values meaning "you may not write here" (EROFS: a read-only mount)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)

T = TypeVar("T")


class OutputNotWritable(PermissionError):
    """A result file cannot be written where the tool was told to write it (the message names ``output_dir``)."""


def output_path(checkpoint: str | Path, suffix: str, output_dir: str | Path | None = None) -> Path:
    """``<checkpoint stem><suffix>`` beside ``checkpoint`` or, when ``output_dir`` is given, inside it.

    ``runs/x/last.ckpt``, ``.knn.json`` -> ``runs/x/last.knn.json``; with ``output_dir=/tmp/eval``:
    ``/tmp/eval/last.knn.json``. The folder is created when the file is written, not here."""
    checkpoint = Path(checkpoint)
    name = checkpoint.stem + suffix
    if output_dir is None or str(output_dir) == "":
        return checkpoint.with_name(name)
    return Path(output_dir).expanduser() / name


def _denied(exc: BaseException) -> bool:
    return isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in _DENIED)


def _message(path: Path, exc: OSError, output_dir_set: bool) -> str:
    where = path.parent
    why = exc.strerror or str(exc)
    if output_dir_set:
        hint = f"choose another folder with {OPTION}=<a writable folder>"
    else:
        hint = (
            f"it is the checkpoint's directory: set {OPTION}=<a writable folder> (e.g. {OPTION}=$HOME/ssl_eval) "
            f"to write the results there instead"
        )
    return f"cannot write {path} ({why}): {where} is not writable for this user; {hint}"


@contextmanager
def explain_write_errors(path: str | Path, output_dir_set: bool = False) -> Iterator[None]:
    """Turn a permission / read-only error raised inside the block into :class:`OutputNotWritable` naming the file
    and ``output_dir=``; other errors (a full disk, ...) pass through unchanged."""
    try:
        yield
    except OutputNotWritable:
        raise
    except OSError as exc:
        if not _denied(exc):
            raise
        failed = Path(exc.filename) if isinstance(exc.filename, str) and exc.filename else Path(path)
        if failed.name.startswith(".") and ".tmp" in failed.name:  # report the file, not its temporary name
            failed = Path(path)
        raise OutputNotWritable(exc.errno or errno.EACCES, _message(failed, exc, output_dir_set)) from exc


def publish(
    line: str,
    write: Callable[[], T],
    path: str | Path,
    output_dir_set: bool = False,
    wrote: list[str | Path] | None = None,
) -> T:
    """Write a tool's files with ``write()``, then print ``[ssl_vision] wrote ...`` and ``line`` (the result JSON)
    as the last line of stdout.

    When ``write()`` fails, ``line`` is printed all the same (the computed result is never lost) and the error is
    raised after it: a permission / read-only error as :class:`OutputNotWritable`, which names ``path`` and the
    ``output_dir`` option, so the tool exits non-zero with a message that says what to do."""
    try:
        with explain_write_errors(path, output_dir_set):
            value = write()
    except BaseException:
        print(line, flush=True)
        raise
    print(f"[ssl_vision] wrote {', '.join(str(p) for p in (wrote or [path]))}")
    print(line, flush=True)
    return value


@contextmanager
def exit_on_unwritable_output() -> Iterator[None]:
    """For a tool's ``main``: :class:`OutputNotWritable` ends the process with its message on stderr and exit status
    1, without a traceback (the result JSON has already been printed by :func:`publish`)."""
    try:
        yield
    except OutputNotWritable as exc:
        raise SystemExit(f"[ssl_vision] error: {exc.strerror or exc}") from exc


def writable(folder: str | Path) -> bool:
    """Whether files can be created in ``folder`` (or, when it does not exist yet, in its nearest existing parent)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def warn_if_unwritable(path: str | Path, output_dir_set: bool = False) -> bool:
    """Before a long computation: say early that its result will be printed but not saved (returns writability)."""
    folder = Path(path).parent
    if writable(folder):
        return True
    hint = f"choose another {OPTION}=..." if output_dir_set else f"set {OPTION}=<a writable folder> to save it"
    print(
        f"[ssl_vision] note: {folder} is not writable: the result will be printed but cannot be saved there; {hint}",
        flush=True,
    )
    return False


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` minus the process umask (``0o644`` under umask 022)."""
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, process-wide, for a moment)
        for row in Path("/proc/self/status").read_text().splitlines():
            if row.startswith("Umask:"):
                return 0o666 & ~int(row.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors_atomic(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` to a temporary name beside ``path``, given the umask's mode (the library
    creates ``0o600`` files), then renamed onto ``path``: never half-written; the temporary file is removed on
    failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        open(tmp, "wb").close()  # a plain OSError (PermissionError in a read-only folder), not a library error
        save_file(dict(state), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_result_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """``payload`` as JSON at ``path`` (its folder created if missing), written atomically; an existing file is first
    kept under a stamped name, never overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep_previous(path)
    write_json_atomic(path, dict(payload))
    return path
