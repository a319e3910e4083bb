"""Which checkpoint a run resumes from, and whether it fits the run that resumes it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ssl_vision.checkpoint_io import check_checkpoint_path, load_checkpoint
from ssl_vision.optim import check_same_optimizer


def find_resume_checkpoint(resume: str | None, search_root: Path, run_prefix: str) -> Path | None:
    """``resume=<path>``: that file (must exist); ``resume=auto``: the newest state of the run that was written last
    (None when there is none, so the run starts fresh).

    Runs named ``run_prefix`` live in ``<root>/<prefix>/<time>/`` (single runs) and in
    ``<root>/multirun/<time>/<job num>-<prefix>/`` (``-m``, submitit jobs; ``hydra.run`` / ``hydra.sweep`` in
    conf/pretrain.yaml): both count. The rule, in two steps:

    1. the run: the one whose newest checkpoint file (any ``*.ckpt`` in its ``checkpoints/`` but ``init.ckpt``) was
       modified last -- the run that was trained most recently, not the one with the most steps;
    2. the checkpoint within that run: the highest ``global_step`` over ``last*.ckpt`` (``last.ckpt``, and the
       ``last-v1.ckpt``... Lightning writes when a run was moved or resumed from a periodic checkpoint) and the
       periodic ``...step<N>.ckpt`` files; equal steps go to the file modified last. The step of a periodic file is
       read from its name, that of a ``last*.ckpt`` from the file (memory-mapped, so only the small header is read).
       ``init.ckpt`` (weights before the first step, not resumable) is never chosen; an unreadable file is skipped
       with a printed note.
    """
    if resume in (None, "", "null"):
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():  # a run directory or its checkpoints/: name the files in it
            try:
                check_checkpoint_path(path)
            except ValueError as exc:
                raise ValueError(f"resume={resume!r}: {exc}; or resume=auto for the newest state") from None
        if not path.is_file():
            raise FileNotFoundError(
                f"resume={resume!r}: no such checkpoint file; pass a path to a .ckpt or resume=auto"
            )
        return path
    root = Path(search_root)
    runs = {}
    for ckpt_dir in [*root.glob(f"{run_prefix}/*/checkpoints"), *root.glob(f"multirun/*/*-{run_prefix}/checkpoints")]:
        files = [p for p in ckpt_dir.glob("*.ckpt") if p.name != "init.ckpt" and p.is_file()]
        if files:
            runs[ckpt_dir] = files
    if not runs:
        return None
    newest_run = max(runs, key=lambda d: max(p.stat().st_mtime_ns for p in runs[d]))
    best, best_key = None, None
    for path in runs[newest_run]:
        step = checkpoint_step(path)
        if step is None:
            continue
        key = (step, path.stat().st_mtime_ns, path.name.startswith("last"))
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` a checkpoint holds: from a periodic file's name (``...-step0000012.ckpt``), else read from
    the file memory-mapped (``weights_only``: nothing is unpickled but plain data; tensors are not read). None, with a
    printed note, for a file that cannot be read."""
    path = Path(path)
    match = None if path.name.startswith("last") else _STEP_IN_NAME.search(path.stem)
    if match:
        return int(match.group(1))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception as exc:  # truncated, not a torch zip file, a pickle weights_only refuses, no global_step
        print(
            f"[ssl_vision] resume=auto: skipping {path}: cannot read its global_step ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        )
        return None


def check_resume_compatible(
    path: Path, method: str, backbone: dict[str, Any], data: dict[str, Any], optim: dict[str, Any] | None = None
) -> dict:
    """Read ``path`` safely (:func:`load_checkpoint`) and check it was written by a run of the same method, backbone
    (name, width, channels, patch size...) and input shape (``in_chans``, ``image_size``) as this one, and, given this
    run's ``optim`` (``method.optim``), with the same optimizer (its state means nothing to another one). Everything
    else about the optimizer and schedule may change: ``SSLModule`` rebuilds them from the current config.

    A mismatch would otherwise surface as a page of missing / unexpected ``state_dict`` keys from Lightning (or, worse,
    load into a differently shaped model); this says what the checkpoint holds and what would be right.
    Returns the loaded checkpoint.
    """
    ckpt = load_checkpoint(path)
    info = (ckpt.get("ssl_vision") or {}).get("run_info") if isinstance(ckpt, dict) else None
    if not info or "method" not in info or "state_dict" not in ckpt:
        raise ValueError(
            f"resume={str(path)!r} is not an ssl_vision pretraining checkpoint (no ssl_vision.run_info / "
            f"state_dict); resume from a checkpoints/last.ckpt written by tools/pretrain.py"
        )
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
        raise ValueError(
            f"resume={str(path)!r} was written by another kind of run: {'; '.join(problems)}. Resume it "
            f"with the same settings (method={info['method']} backbone={had_backbone.get('name')} ...), "
            f"start fresh with resume=null, or evaluate it with tools/knn_eval.py checkpoint=..."
        )
    if optim is not None and optim.get("name"):
        saved = ((ckpt.get("ssl_vision") or {}).get("optim") or {}).get("name")
        check_same_optimizer(saved, optim["name"], f"resume={str(path)!r}")
    return ckpt
