"""Export the trained backbone alone: ``<stem>.backbone.safetensors`` + ``<stem>.backbone.json``.

The safetensors file holds the backbone's ``state_dict`` (no optimizer, heads, queues or code: loading it can
never run code). The JSON sidecar says how to build the module it fits:

* ``create_kwargs`` -- ``ssl_vision.backbones.create_backbone(**create_kwargs)`` rebuilds it exactly;
* ``feature_dim``, ``method``, ``weights`` (student | teacher), ``data`` (the pretraining data config);
* ``stock`` -- the torchvision / timm model with the same construction, if there is one, and whether the
  weights load into it (``loads_into_stock``; ``stock_note`` says why not).

Loading into a stock model by name::

    # torchvision ResNet (full width, 7x7 stem, 3 channels: stock.loads_into_stock is true)
    model = torchvision.models.resnet18(); model.fc = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file("last.backbone.safetensors"), strict=True)

    # timm ViT: the JSON's stock.kwargs carry img_size / patch_size / in_chans / num_classes=0
    model = timm.create_model(meta["stock"]["model"], **meta["stock"]["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("last.backbone.safetensors"), strict=True)

    # anything (always works): our factory with the JSON's kwargs, or load_backbone(path)
    model, dim = ssl_vision.backbones.create_backbone(**meta["create_kwargs"])

Our small-image ResNets (3x3 stride-1 stem, no max-pool: images <= 64 px) and width-scaled ResNets
(``width != 1`` or explicit ``channels``) or 1-channel ResNets have different layer shapes: they load only into
the same construction (``create_backbone(**create_kwargs)``); the JSON says so in ``stock_note``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ssl_vision.backbones import SMALL_STEM_MAX_SIZE, TORCHVISION_RESNETS, VIT_ALIASES
from ssl_vision.eval.checkpoints import EXPORT_FORMAT, load_backbone
from ssl_vision.run_record import keep_previous
from ssl_vision.eval.outputs import explain_write_errors, output_path, save_safetensors_atomic
from ssl_vision.run_record import mtime_stamp, write_json_atomic

__all__ = ["export_backbone", "stock_model", "backbone_sidecar", "write_backbone_files"]

_STOCK_WIDTHS = [64, 128, 256, 512]


def _resnet_stock(kw: dict[str, Any]) -> dict[str, Any]:
    name = kw["name"]
    small = kw.get("small_stem", "auto")
    small = kw["image_size"] <= SMALL_STEM_MAX_SIZE if small == "auto" else bool(small)
    channels = kw.get("channels")
    default_width = (channels is None and float(kw.get("width", 1.0)) == 1.0) or list(channels or []) == _STOCK_WIDTHS
    why = []
    if small:
        why.append(
            f"small-image stem (3x3 stride-1 conv, no max-pool; image_size {kw['image_size']} <= "
            f"{SMALL_STEM_MAX_SIZE} or small_stem=true)"
        )
    if not default_width:
        why.append(f"scaled stage widths (width={kw.get('width')}, channels={channels})")
    if kw["in_chans"] != 3:
        why.append(f"in_chans={kw['in_chans']}")
    note = (
        "loads into torchvision.models.{0}() with fc=Identity, strict=True".format(name)
        if not why
        else "does NOT load into torchvision.models.{0}(): {1}; build it with create_backbone(**create_kwargs) "
        "(same construction) instead".format(name, "; ".join(why))
    )
    return {
        "library": "torchvision",
        "model": name,
        "kwargs": {},
        "replace": {"fc": "torch.nn.Identity()"},
        "loads_into_stock": not why,
        "stock_note": note,
    }


def _timm_stock(kw: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    timm_name = VIT_ALIASES.get(kw["name"], kw["name"].removeprefix("timm:"))
    # backbone.timm_kwargs (e.g. depth) are part of the construction the stock model must repeat
    kwargs: dict[str, Any] = {**dict(kw.get("timm_kwargs") or {}), "num_classes": 0, "in_chans": kw["in_chans"]}
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:  # a ViT: image and patch size were adapted to the data
        kwargs.update(img_size=kw["image_size"], patch_size=int(patch[0]), dynamic_img_size=True)
    return {
        "library": "timm",
        "model": timm_name,
        "kwargs": kwargs,
        "replace": {},
        "loads_into_stock": True,
        "stock_note": f"loads into timm.create_model({timm_name!r}, **stock.kwargs), strict=True",
    }


def stock_model(create_kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Which torchvision / timm model (name + constructor kwargs) the backbone's weights fit, and whether they do."""
    if create_kwargs["name"] in TORCHVISION_RESNETS:
        return _resnet_stock(create_kwargs)
    return _timm_stock(create_kwargs, model)


def export_backbone(
    checkpoint: str | Path, output_dir: str | Path | None = None, use_teacher: bool = False
) -> dict[str, Any]:
    """Write ``<stem>.backbone.safetensors`` and ``<stem>.backbone.json`` for a training checkpoint.

    Args:
        checkpoint: a ``.ckpt`` from pretraining (read with ``weights_only=True``).
        output_dir: where to write (default: beside the checkpoint); created if missing.
        use_teacher: export the teacher / momentum backbone (DINO) instead of the student.

    Returns the sidecar dict plus ``weights_path`` / ``json_path``. Existing export files are kept under a
    stamped name, never overwritten silently. Both files are written to temporary names and renamed; a folder
    that cannot be written raises :class:`~ssl_vision.eval.outputs.OutputNotWritable` naming ``output_dir``.
    """
    checkpoint = Path(checkpoint)
    model, dim, info = load_backbone(checkpoint, use_teacher=use_teacher)
    target = output_path(checkpoint, ".backbone.safetensors", output_dir)
    with explain_write_errors(target, output_dir is not None):
        return write_backbone_files(target, model, dim, info, checkpoint)


def backbone_sidecar(
    model: nn.Module, dim: int, info: dict[str, Any], checkpoint: Path, **extra: Any
) -> dict[str, Any]:
    """The export's JSON sidecar (see the module docstring) for ``model``; ``extra`` is added to it."""
    return {
        "format": EXPORT_FORMAT,
        "backbone": info["backbone"],
        "create_kwargs": info["create_kwargs"],
        "feature_dim": dim,
        "method": info["method"],
        "weights": info["weights"],
        "weights_prefix": info["weights_prefix"],
        "stock": stock_model(info["create_kwargs"], model),
        "data": info["data"],
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "global_step": info["global_step"],
        "epoch": info["epoch"],
        **extra,
    }


def write_backbone_files(
    target: Path, model: nn.Module, dim: int, info: dict[str, Any], checkpoint: Path, **extra: Any
) -> dict[str, Any]:
    """``target`` (safetensors, the backbone's state_dict) and its ``.json`` sidecar in the export format, which
    :func:`~ssl_vision.eval.checkpoints.load_backbone` and every evaluation tool read. ``extra`` goes into the
    sidecar. Existing files are kept under a stamped name; both are written to temporary names and renamed, with
    the mode of any new file (0644 under umask 022); ``target``'s folder is created if missing."""
    target = Path(target)
    sidecar = target.with_suffix(".json")
    meta = backbone_sidecar(model, dim, info, checkpoint, **extra)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (target, sidecar) if p.exists()]
    if existing:  # the old pair is kept under one stamp (the weights' time): the two files may differ by a second
        stamp = mtime_stamp(existing[0])
        for old in existing:
            keep_previous(old, stamp)
    save_safetensors_atomic(state, target, metadata={"format": "pt", "ssl_vision": EXPORT_FORMAT})
    write_json_atomic(sidecar, meta)  # written last: a sidecar means the weights beside it are complete
    return {**meta, "weights_path": str(target.resolve()), "json_path": str(sidecar.resolve())}
