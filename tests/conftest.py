"""Shared fixtures: compose the real Hydra config in-process, as tools/pretrain.py would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ssl_vision.config_schema import register as register_config_schema

register_config_schema()  # schema/method, schema/augment, ...: conf/*.yaml merge onto them

CONF = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)

#: overrides that make any method run a few steps in seconds on the CPU
FAST = [
    "data=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "eval.knn_k=[5]",
    "logger=csv",
]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(overrides, run_dir=None)``: the composed pretrain config with Hydra's runtime set, as in a real
    run."""

    def _make(overrides: list[str], run_dir: Path | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(
                "pretrain",
                overrides=[f"paths.output_root={tmp_path / 'outputs'}", *overrides],
                return_hydra_config=True,
            )
        out = run_dir or tmp_path / "run"
        out.mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _make
    GlobalHydra.instance().clear()
