"""Run directories: unique names, and a lock that says a run is still alive in one.

Only the standard library and omegaconf are imported here: ``tools/pretrain.py`` registers the resolver before
Hydra composes the config, and ``--cfg job`` / ``--help`` must answer without loading torch.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from omegaconf import OmegaConf

#: the resolver conf/pretrain.yaml names ``hydra.run.dir`` / ``hydra.sweep.dir`` with
RESOLVER = "ssl_vision_unique_dir"
LOCK_NAME = ".lock"


def unique_dir(parent: str, pattern: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """Create and return a new directory ``<parent>/<time>`` (``time.strftime(pattern)``), or ``<time>-1``,
    ``<time>-2``... when that name is taken: two runs started in the same second never share a directory.

    The directory is created here with an exclusive ``mkdir`` (atomic, also on network file systems), so two processes
    racing for one name cannot both get it; Hydra then finds it existing and writes ``.hydra/`` into it. As a resolver
    (``${ssl_vision_unique_dir:<parent>,<pattern>}``) it is cached per config like Hydra's ``now``, so every later
    read of ``hydra.run.dir`` in the same job (and in a multirun's jobs, whose configs carry the cache) gives the same
    path.
    """
    parent_path = Path(parent)
    parent_path.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(pattern)
    name, n = stamp, 0
    while True:
        try:
            (parent_path / name).mkdir()
            return str(parent_path / name)
        except FileExistsError:
            n += 1
            name = f"{stamp}-{n}"


def register_resolvers() -> None:
    """Register ``${ssl_vision_unique_dir:...}`` (idempotent); call before Hydra composes conf/pretrain.yaml."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, unique_dir, use_cache=True)


def is_global_zero_process() -> bool:
    """Whether this process is global rank 0, from the launchers' environment (before any process group exists).

    True unless one of ``RANK`` (torchrun), ``SLURM_PROCID`` (SLURM, one task per device), ``LOCAL_RANK`` /
    ``NODE_RANK`` (Lightning's own launcher sets these in the processes it starts) names another rank: global rank
    0 is rank 0 under every one of them.
    """
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value not in (None, "") and value.strip() != "0":
            return False
    return True


class RunDirInUseError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on ``<run_dir>/.lock`` held while a run writes into ``run_dir``.

    A POSIX record lock (``fcntl.lockf``): the kernel drops it when the holding process ends, however it ends
    (SIGKILL, crash, node reboot for NFS lock managers), so a killed run never leaves a stale lock behind and the file
    itself may stay. Unlike ``flock``, a POSIX lock is not inherited by forked children, so data-loader workers that
    outlive a killed run by a few seconds do not keep it locked. The file holds the holder's pid, host, start time and
    command line, for the message another run gets. Not re-entrant within one process (a second ``acquire`` in the
    holder succeeds): the lock is for telling *other* processes apart.

    Where the file system has no locks (``ENOLCK`` / ``EOPNOTSUPP``) the run proceeds with a warning.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirInUseError(
                    f"run directory {self.path.parent} is in use by a live run ({describe_holder(holder)}; lock file "
                    f"{self.path}). Two runs writing one directory would overwrite each other's checkpoints/last.ckpt "
                    f"and results. Wait for that run to end (or stop it) and then "
                    f"resume it with resume=auto or resume={self.path.parent / 'checkpoints'}/<checkpoint>; or start "
                    f"a separate run with resume=null."
                ) from None
            os.close(fd)
            warnings.warn(
                f"cannot lock {self.path} ({exc}): this file system has no locks, so a second run resuming "
                f"into {self.path.parent} while this one is alive will not be refused",
                stacklevel=2,
            )
            return self
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # no stale pid for the next reader; the file itself stays (unlinking would race)
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    where = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("started"):
        where += f", started {holder['started']}"
    if holder.get("argv"):
        where += f": {' '.join(map(str, holder['argv']))[:300]}"
    return where
