"""The collapse monitor (ssl_vision/nn/monitor.py) and which output each objective exposes to it."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from ssl_vision.nn.monitor import collapse_std, healthy_std
from ssl_vision.objectives import OBJECTIVES
from ssl_vision.objectives.base import ObjectiveOutput
from tests.conftest import FAST


def test_collapsed_features_read_zero():
    one_point = torch.randn(1, 128).expand(256, 128)  # every sample on the same point
    assert collapse_std(one_point).item() == pytest.approx(0.0, abs=1e-6)
    # a scaled copy of one direction is the same point after L2 normalisation
    scaled = torch.randn(1, 64) * torch.rand(512, 1).add(0.1)
    assert collapse_std(scaled).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dim", [16, 128, 2048])
def test_isotropic_gaussian_reads_one_over_sqrt_dim(dim):
    """SimSiam §4.1: each coordinate of z/‖z‖ for z ~ N(0, I_d) has std 1/√d (variance 1/d, by symmetry)."""
    g = torch.Generator().manual_seed(dim)
    z = torch.randn(4096, dim, generator=g)
    assert healthy_std(dim) == pytest.approx(1 / math.sqrt(dim))
    assert collapse_std(z).item() == pytest.approx(1 / math.sqrt(dim), rel=0.03)
    # an offset shared by all samples (partial collapse toward one direction) lowers it
    assert collapse_std(z + 3.0 * torch.ones(dim)).item() < 0.5 / math.sqrt(dim)  # ≈ 1/√(10 d)


def test_every_objective_names_a_monitored_output_or_none():
    fields = set(ObjectiveOutput.__dataclass_fields__)
    for name, cls in OBJECTIVES.items():
        assert cls.collapse_monitor is None or cls.collapse_monitor in fields, name
    assert OBJECTIVES["mae"].collapse_monitor is None  # reconstruction: no collapse mode the std would show
    for name in ("simclr", "moco_v2", "byol", "simsiam", "swav", "dino", "instdisc"):
        assert OBJECTIVES[name].collapse_monitor == "embedding", name


def _logged_columns(res: dict) -> set[str]:
    with open(Path(res["run_dir"]) / "logs" / "metrics.csv") as f:
        return set(next(csv.reader(f)))


def test_mae_logs_no_collapse_monitor_and_simclr_does(make_cfg, tmp_path):
    from ssl_vision.launch import run_pretraining

    mae = run_pretraining(
        make_cfg(
            [
                "method=mae",
                "backbone=vit_tiny",
                "backbone.patch_size=8",
                *FAST,
                "trainer.max_steps=1",
                "eval.final_eval=false",
                "trainer.limit_val_batches=0",
                "method.kwargs.decoder_dim=32",
                "method.kwargs.decoder_depth=1",
                "method.kwargs.decoder_heads=4",
            ],
            tmp_path / "mae",
        )
    )
    columns = _logged_columns(mae)
    assert "train/loss" in columns and "train/collapse_std" not in columns
    simclr = run_pretraining(
        make_cfg(
            [
                "method=simclr",
                "backbone=resnet18",
                "backbone.width=0.125",
                *FAST,
                "trainer.max_steps=1",
                "eval.final_eval=false",
                "trainer.limit_val_batches=0",
            ],
            tmp_path / "simclr",
        )
    )
    assert "train/collapse_std" in _logged_columns(simclr)
