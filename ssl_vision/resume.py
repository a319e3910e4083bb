"""Which checkpoint a run resumes from, and whether it fits the run that resumes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssl_vision.checkpoint_io import load_checkpoint


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
