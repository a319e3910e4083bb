"""Read a frozen backbone back from a checkpoint, and write result files beside it.

Two inputs are understood:

* a **training checkpoint** (``.ckpt`` written by :func:`ssl_vision.launch.run_pretraining`): the checkpoint
  records how to rebuild its backbone and where its weights are (:func:`model_record`, written by
  ``SSLModule.on_save_checkpoint`` and into ``init.ckpt``): ``checkpoint["ssl_vision"]["backbone"]``, the
  :func:`~ssl_vision.backbones.create_backbone` keyword arguments, ``["backbone_prefix"]`` (``backbone.``) and
  ``["teacher_prefix"]``, the ``state_dict`` prefix of the objective's EMA copy of the backbone (DINO's teacher,
  BYOL's target, MoCo's key / momentum encoder; null for methods without one), which ``use_teacher`` reads (DINO
  evaluates its teacher, docs/reference.md §10.1). Checkpoints written before the record existed are read as
  before: the backbone from ``["run_info"]`` (its ``backbone`` config and ``data`` in_chans / image_size) and the
  teacher from the first of ``TEACHER_PREFIXES`` present;
* an **exported backbone** (``<stem>.backbone.safetensors`` + ``<stem>.backbone.json``, see
  :mod:`ssl_vision.eval.export`).

Nothing here unpickles arbitrary objects: torch files go through ``torch.load(weights_only=True)``
(:func:`ssl_vision.checkpoint_io.load_checkpoint`), exports are safetensors + JSON. A file that would need a full
unpickler (and could therefore run code) is refused with a ``ValueError`` that says so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ssl_vision.backbones import create_backbone
from ssl_vision.checkpoint_io import check_checkpoint_path, describe_nonfinite, first_nonfinite, load_checkpoint
from ssl_vision.run_record import keep_previous, write_json_atomic

__all__ = [
    "load_backbone",
    "create_kwargs",
    "model_record",
    "beside",
    "write_json_keeping_old",
    "STUDENT_PREFIX",
    "TEACHER_PREFIXES",
    "EXPORT_FORMAT",
]

#: where SSLModule keeps the trained backbone in its state_dict
STUDENT_PREFIX = "backbone."
#: momentum / teacher copies of the backbone kept by objectives, in the order they are looked for in a checkpoint
#: without the record of :func:`model_record` (written before it existed)
TEACHER_PREFIXES = (
    "objective.teacher_backbone.",
    "objective.momentum_backbone.",
    "objective.target_backbone.",
    "objective.key_backbone.",
)
#: backbone-config keys passed on to create_backbone (besides name, in_chans, image_size from the data)
_BACKBONE_KEYS = (
    "width",
    "channels",
    "small_stem",
    "zero_init_residual",
    "patch_size",
    "drop_path_rate",
    "timm_kwargs",
)
#: the ``format`` field of an export's JSON sidecar
EXPORT_FORMAT = "ssl_vision.backbone/1"


# ---------------------------------------------------------------------------------------------- file helpers
def beside(path: str | Path, suffix: str) -> Path:
    """``runs/x/last.ckpt`` + ``.knn.json`` -> ``runs/x/last.knn.json`` (the checkpoint's stem plus ``suffix``)."""
    path = Path(path)
    return path.with_name(path.stem + suffix)


def write_json_keeping_old(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically; an existing file is first kept under a stamped name."""
    keep_previous(Path(path))
    write_json_atomic(Path(path), payload)
    return Path(path)


# ------------------------------------------------------------------------------------------------ building
def create_kwargs(backbone_cfg: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``create_backbone`` keyword arguments (including ``name``) from a backbone config and the data's
    ``in_chans`` / ``image_size``, exactly as :func:`ssl_vision.launch.build_module` builds it."""
    kw: dict[str, Any] = {
        "name": backbone_cfg["name"],
        "in_chans": int(data["in_chans"]),
        "image_size": int(data["image_size"]),
    }
    for key in _BACKBONE_KEYS:
        if key in backbone_cfg:
            value = backbone_cfg[key]
            if key == "timm_kwargs" and not value:  # none: the record stays what it was before the key existed
                continue
            kw[key] = list(value) if isinstance(value, (list, tuple)) else value
    return kw


def model_record(backbone_kwargs: dict[str, Any] | None, objective: nn.Module | None) -> dict[str, Any]:
    """The ``checkpoint["ssl_vision"]`` entries that say how to rebuild the backbone and where its weights are:
    ``backbone`` (``create_backbone`` kwargs, or absent when unknown), ``backbone_prefix`` and ``teacher_prefix``
    (``objective.<the EMA teacher's backbone copy>.``, from the objective's
    :class:`~ssl_vision.nn.momentum.EMATeacher`; None for an objective without one)."""
    ema = getattr(objective, "ema", None)
    copy_name = getattr(ema, "backbone_copy", None)
    record: dict[str, Any] = {
        "backbone_prefix": STUDENT_PREFIX,
        "teacher_prefix": f"objective.{copy_name}." if copy_name else None,
    }
    if backbone_kwargs is not None:
        record["backbone"] = dict(backbone_kwargs)
    return record


def _check_expected(name: str, expect_backbone: str | None, path: Path) -> None:
    if expect_backbone is not None and name != expect_backbone:
        raise ValueError(
            f"{path}: the checkpoint holds a {name!r} backbone, but {expect_backbone!r} was expected "
            f"(expect_backbone={expect_backbone!r} vs checkpoint backbone {name!r})"
        )


#: how many mismatching tensors a shape error lists (one line each)
_MAX_LISTED = 5


def _shape_mismatches(
    model: nn.Module, state: dict[str, torch.Tensor], kw: dict[str, Any], path: Path, source: str
) -> str | None:
    """One line per tensor whose stored shape differs from the rebuilt model's (at most ``_MAX_LISTED``), instead of
    torch's page of "size mismatch" lines; None when every shared key fits."""
    own = model.state_dict()
    bad = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if not bad:
        return None
    lines = [f"  {k}: stored {a}, built {b}" for k, a, b in bad[:_MAX_LISTED]]
    if len(bad) > _MAX_LISTED:
        lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
    config = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return (
        f"{path}: {len(bad)} of {len(state)} stored tensors do not fit the backbone that {source} describes "
        f"({config}):\n" + "\n".join(lines) + "\nThe weights were saved from another construction (backbone "
        f"width / channels / patch_size, or the data's in_chans / image_size): fix {source} to the values the "
        f"weights were trained with, or give the checkpoint that belongs to it"
    )


def _build(
    kw: dict[str, Any], state: dict[str, torch.Tensor], path: Path, source: str = "the checkpoint's backbone config"
) -> tuple[nn.Module, int]:
    """Rebuild the backbone and load ``state`` strictly; a key or shape mismatch is a clear error (the mismatching
    tensors listed with both shapes and the config they were built from), not a silent skip."""
    model, dim = create_backbone(**kw)
    mismatch = _shape_mismatches(model, state, kw, path, source)
    if mismatch:
        raise ValueError(mismatch)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: the stored weights do not fit {kw['name']} built with {kw}: "
            f"missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
    model.eval().requires_grad_(False)
    return model, dim


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _pick_weights(
    state: dict[str, torch.Tensor], use_teacher: bool, path: Path, extra: dict[str, Any] | None = None
) -> tuple[dict, str, str]:
    """-> (backbone state, "student" | "teacher", the state_dict prefix it came from). ``extra`` is
    ``checkpoint["ssl_vision"]``: its :func:`model_record` prefixes when present, else the older fallback."""
    extra = extra or {}
    student = extra.get("backbone_prefix") or STUDENT_PREFIX
    if use_teacher and "teacher_prefix" in extra:  # the checkpoint says where its teacher is (or that it has none)
        prefix = extra["teacher_prefix"]
        if prefix:
            sub = _sub_state(state, prefix)
            if not sub:
                raise ValueError(
                    f"{path}: the checkpoint records its teacher backbone under '{prefix}*' but its "
                    f"state_dict holds no such keys: the file is damaged or was edited; evaluate the "
                    f"student (use_teacher=false) or another checkpoint of the run"
                )
            return sub, "teacher", prefix
        warnings.warn(
            f"use_teacher=true but {path} was trained by a method without an EMA teacher "
            f"({(extra.get('run_info') or {}).get('method')}); evaluating the student backbone instead",
            stacklevel=3,
        )
    elif use_teacher:
        for prefix in TEACHER_PREFIXES:
            sub = _sub_state(state, prefix)
            if sub:
                return sub, "teacher", prefix
        warnings.warn(
            f"use_teacher=true but {path} holds no teacher/momentum backbone (looked for "
            f"{', '.join(p + '*' for p in TEACHER_PREFIXES)}); evaluating the student backbone instead",
            stacklevel=3,
        )
    sub = _sub_state(state, student)
    if not sub:
        raise ValueError(f"{path}: state_dict has no '{student}*' keys; is this an ssl_vision checkpoint?")
    return sub, "student", student


# ------------------------------------------------------------------------------------------------- readers
def _from_training_checkpoint(path: Path, expect_backbone: str | None, use_teacher: bool):
    ckpt = load_checkpoint(path)  # weights_only=True; raises ValueError for anything that needs unpickling
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"{path}: not a Lightning checkpoint (no 'state_dict'); expected a .ckpt written by "
            f"tools/pretrain.py or a .backbone.safetensors written by tools/export.py"
        )
    extra = ckpt.get("ssl_vision") or {}
    run_info = extra.get("run_info") or {}
    recorded = extra.get("backbone")
    if isinstance(recorded, dict) and "name" in recorded:  # the record of how the backbone was built
        kw = dict(recorded)
        source = "checkpoint['ssl_vision']['backbone']"
    elif "backbone" in run_info and "data" in run_info:  # written before the record: rebuilt from the run config
        kw = create_kwargs(run_info["backbone"], run_info["data"])
        source = "the checkpoint's backbone config"
    else:
        raise ValueError(
            f"{path}: no checkpoint['ssl_vision']['backbone'] (create_backbone arguments) nor "
            f"['run_info'] with 'backbone' and 'data'; it was not written by ssl_vision's "
            f"run_pretraining, so the backbone cannot be rebuilt"
        )
    _check_expected(kw["name"], expect_backbone, path)
    state, weights, prefix = _pick_weights(ckpt["state_dict"], use_teacher, path, extra)
    model, dim = _build(kw, state, path, source=source)
    data = dict(
        (run_info.get("config") or {}).get("data")
        or run_info.get("data")
        or {"in_chans": kw.get("in_chans"), "image_size": kw.get("image_size")}
    )  # the full config when stored
    info = {
        "path": str(path),
        "format": "checkpoint",
        "method": run_info.get("method"),
        "backbone": kw["name"],
        "create_kwargs": kw,
        "feature_dim": dim,
        "weights": weights,
        "weights_prefix": prefix,
        "data": data,
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
        "seed": run_info.get("config", {}).get("seed"),
    }  # the run's seed: its data subsets (the online kNN bank)
    return model, dim, info


def _from_export(path: Path, expect_backbone: str | None, use_teacher: bool):
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{path}: the sidecar {sidecar.name} (how to build the backbone) is missing; "
            f"re-run tools/export.py on the training checkpoint"
        )
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{sidecar}: the export's sidecar is not valid JSON ({exc}); it should be the "
            f"{EXPORT_FORMAT} JSON that tools/export.py writes beside {path.name}: re-run tools/export.py "
            f"on the training checkpoint"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"{sidecar}: format {found!r} is not {EXPORT_FORMAT!r}; expected the sidecar that tools/export.py writes"
        )
    if not isinstance(meta.get("create_kwargs"), dict) or "name" not in meta["create_kwargs"]:
        raise ValueError(
            f"{sidecar}: no 'create_kwargs' with a backbone 'name' (how to rebuild the backbone); "
            f"re-run tools/export.py on the training checkpoint"
        )
    kw = dict(meta["create_kwargs"])
    _check_expected(kw["name"], expect_backbone, path)
    if use_teacher and meta.get("weights") != "teacher":
        warnings.warn(
            f"use_teacher=true but {path} holds the {meta.get('weights')} backbone (an export holds one "
            f"backbone; export with use_teacher=true to get the teacher); using it",
            stacklevel=3,
        )
    try:
        weights = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(
            f"{path}: cannot read the safetensors weights ({exc}): the file is truncated or not a "
            f"safetensors file (size {path.stat().st_size} bytes); re-run tools/export.py on the "
            f"training checkpoint, or copy the file again"
        ) from exc
    model, dim = _build(kw, weights, path, source=f"the sidecar {sidecar.name} (create_kwargs)")
    if dim != meta.get("feature_dim", dim):
        raise ValueError(f"{sidecar}: feature_dim {meta['feature_dim']} but the rebuilt backbone gives {dim}")
    info = {
        "path": str(path),
        "format": "export",
        "method": meta.get("method"),
        "backbone": kw["name"],
        "create_kwargs": kw,
        "feature_dim": dim,
        "weights": meta.get("weights"),
        "weights_prefix": meta.get("weights_prefix"),
        "data": dict(meta.get("data") or {}),
        "global_step": meta.get("global_step"),
        "epoch": meta.get("epoch"),
    }
    return model, dim, info


def load_backbone(
    path: str | Path, expect_backbone: str | None = None, use_teacher: bool = False
) -> tuple[nn.Module, int, dict[str, Any]]:
    """Rebuild a trained backbone from a training checkpoint or an export.

    Args:
        path: a ``.ckpt`` (any torch file loadable with ``weights_only=True``), or an exported
            ``.backbone.safetensors`` (or its ``.backbone.json`` sidecar).
        expect_backbone: when given, the stored backbone name must equal it (e.g. ``"resnet18"``).
        use_teacher: take the teacher / momentum backbone (where the checkpoint's ``teacher_prefix`` says; in
            older checkpoints the first of ``TEACHER_PREFIXES`` present) instead of ``backbone.*``; falls back to the
            student with a warning when the method keeps none.

    Returns:
        ``(backbone, feature_dim, info)``: the module maps (B, C, H, W) to (B, feature_dim), on CPU, in
        ``eval()`` mode with ``requires_grad`` off (frozen). ``info`` holds ``path``, ``format``
        (checkpoint | export), ``method``, ``backbone``, ``create_kwargs``, ``feature_dim``, ``weights``
        (student | teacher), ``weights_prefix``, ``data`` (the pretraining data config), ``global_step``, ``epoch``.
    """
    path = check_checkpoint_path(
        path
    )  # missing -> FileNotFoundError; a directory -> ValueError listing its .ckpt files
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"{path} (the weights beside the sidecar JSON) does not exist")
    if path.suffix == ".safetensors":
        model, dim, info = _from_export(path, expect_backbone, use_teacher)
    else:
        model, dim, info = _from_training_checkpoint(path, expect_backbone, use_teacher)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:  # a diverged run's weights: every feature would be NaN and every tool's number meaningless
        raise ValueError(
            f"{path}: the {info.get('weights') or 'stored'} backbone's weights are not finite, first in "
            f"{describe_nonfinite(bad[0], bad[1])} (global step {info.get('global_step')}): the run had "
            f"diverged when this was written. Evaluate an earlier checkpoint of the run instead "
            f"(ls {path.parent})"
        )
    return model, dim, info
