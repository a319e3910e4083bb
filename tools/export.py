#!/usr/bin/env python
"""Export the backbone alone: ``python tools/export.py checkpoint=<path> [use_teacher=true] [output_dir=<folder>]``.

Writes ``<stem>.backbone.safetensors`` (the backbone's state_dict) and ``<stem>.backbone.json`` (how to build it:
``create_kwargs`` for ``create_backbone``, feature_dim, and the stock torchvision / timm model it loads into, if
any); see :mod:`ssl_vision.eval.export` for the one-liners. ``load_backbone`` and the eval tools read the export
back. Writes beside the checkpoint unless ``output_dir=<folder>`` (``out_dir``, its older name, still works). Prints
the sidecar JSON as the last line of stdout, also when the files cannot be written (a read-only checkpoint
directory), before the error that says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssl_vision.cli import CHECKPOINT_EXAMPLE, require  # noqa: E402
from ssl_vision.eval.checkpoints import load_backbone  # noqa: E402
from ssl_vision.eval.export import backbone_sidecar, write_backbone_files  # noqa: E402
from ssl_vision.eval.outputs import exit_on_unwritable_output, output_path, publish  # noqa: E402


def _output_dir(cfg: DictConfig) -> str | None:
    """``output_dir``, or its older name ``out_dir``; both set to different folders is an error."""
    new, old = cfg.get("output_dir"), cfg.get("out_dir")
    if new is not None and old is not None and str(new) != str(old):
        raise ValueError(
            f"output_dir={new!r} and out_dir={old!r} are both set; out_dir is the older name of "
            f"output_dir: set only output_dir"
        )
    return new if new is not None else old


def run(cfg: DictConfig) -> dict:
    """Export; prints the sidecar JSON last, also when the files cannot be written (then the error follows)."""
    output_dir = _output_dir(cfg)
    ckpt = Path(cfg.checkpoint)
    model, dim, info = load_backbone(ckpt, use_teacher=cfg.use_teacher)
    target = output_path(ckpt, ".backbone.safetensors", output_dir)
    planned = {
        **backbone_sidecar(model, dim, info, ckpt),
        "weights_path": str(target.resolve()),
        "json_path": str(target.with_suffix(".json").resolve()),
    }
    print(f"[ssl_vision] {planned['stock']['stock_note']}")
    return publish(
        json.dumps(planned),
        lambda: write_backbone_files(target, model, dim, info, ckpt),
        target,
        output_dir is not None,
        wrote=[planned["weights_path"], planned["json_path"]],
    )


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    require(cfg, "checkpoint", "the pretraining checkpoint whose backbone to export", CHECKPOINT_EXAMPLE)
    with exit_on_unwritable_output():
        run(cfg)


if __name__ == "__main__":
    main()
