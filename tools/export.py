#!/usr/bin/env python
"""Export the backbone alone: ``python tools/export.py checkpoint=<path> [use_teacher=true] [out_dir=<folder>]``.

Writes ``<stem>.backbone.safetensors`` (the backbone's state_dict) and ``<stem>.backbone.json`` (how to build it:
``create_kwargs`` for ``create_backbone``, feature_dim, and the stock torchvision / timm model it loads into, if
any); see :mod:`ssl_vision.eval.export` for the one-liners. ``load_backbone`` and the eval tools read the export
back. Prints the sidecar JSON as the last line of stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssl_vision.eval.export import export_backbone  # noqa: E402


def run(cfg: DictConfig) -> dict:
    meta = export_backbone(cfg.checkpoint, cfg.out_dir, cfg.use_teacher)
    print(f"[ssl_vision] wrote {meta['weights_path']} and {meta['json_path']}")
    print(f"[ssl_vision] {meta['stock']['stock_note']}")
    print(json.dumps(meta), flush=True)
    return meta


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
