"""Every named recipe in ``conf/experiment/`` composes and trains one step with its own method, backbone, head
sizes, optimizer and views (on synthetic images of the recipe's own size and channels, so no data set is needed;
``trainer=cpu`` for the GPU recipes, since CI has no GPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ssl_vision.launch import run_pretraining
from tests.conftest import FAST

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


def test_all_recipes_are_listed():
    assert {
        "fmnist_simclr",
        "fmnist_swav",
        "fmnist_swav_multicrop",
        "fmnist_dino_multicrop",
        "fmnist_mae",
        "cifar_dino",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_runs_one_step(make_cfg, experiment):
    recipe = make_cfg([f"experiment={experiment}"])
    # ImageNet recipes (224 px, ViT-B) at 64 px: the same model and heads, a CPU-sized step (84 s -> seconds)
    size, chans = min(recipe.data.image_size, 64), recipe.data.in_chans
    cfg = make_cfg(
        [
            f"experiment={experiment}",
            *FAST,
            "trainer=cpu",
            f"data.image_size={size}",
            f"data.in_chans={chans}",
            f"data.mean={[0.5] * chans}",
            f"data.std={[0.25] * chans}",
            "data.num_workers=0",
            "data.train_subset=null",
            "data.knn_train_subset=null",
            "data.synthetic_size=32",
            "trainer.max_steps=1",
            "eval.knn_at_init=false",
            "checkpoint.save_top_k=0",
        ]
    )  # last.ckpt only
    # the recipe's own choices survive the test overrides
    assert (cfg.method.name, cfg.backbone.name) == (recipe.method.name, recipe.backbone.name)
    assert cfg.method.kwargs == recipe.method.kwargs and cfg.augment.views == recipe.augment.views
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["method"] == recipe.method.name
    assert math.isfinite(res["train_loss"]) and 0 <= res["knn_top1"] <= 100
