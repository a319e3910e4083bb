#!/usr/bin/env python
"""Self-supervised pretraining: ``python tools/pretrain.py method=simclr backbone=resnet18 data=fashion_mnist``.

Composes conf/pretrain.yaml with Hydra; writes checkpoints and results.json into the run directory and prints
the results as one JSON line, the last line of stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("WANDB_MODE", "offline")  # never wait on a login

from ssl_vision.config_schema import register as register_config_schema  # noqa: E402  (no torch either)
from ssl_vision.run_lock import register_resolvers  # noqa: E402  (stdlib + omegaconf only: no torch here)

register_resolvers()  # ${ssl_vision_unique_dir:...}: hydra.run.dir / hydra.sweep.dir in conf/pretrain.yaml
register_config_schema()  # the typed schema conf/method, augment and backbone files merge onto (config_schema.py)


@hydra.main(config_path="../conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    # imported here, not at the top: `--cfg job`, `--help` and a config error answer without loading torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ssl_vision.cli import fail
    from ssl_vision.config_checks import ConfigValueError
    from ssl_vision.launch import run_pretraining

    try:
        results = run_pretraining(cfg)
    except ConfigValueError as exc:  # a value the user can fix from the message: one line, exit 2
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep's launcher records the failed job and goes on with the others
        fail(str(exc))
    if results.pop("is_global_zero"):  # one JSON line per run, not one per process
        print(json.dumps(results), flush=True)
    return results.get("knn_top1")  # Hydra multirun sweepers can optimise this


if __name__ == "__main__":
    main()
