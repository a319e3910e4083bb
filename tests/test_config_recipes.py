"""Recipes keyed by (method, backbone family) and the typed config schema.

* ``method=moco_v3 backbone=vit_b`` (no experiment) trains with MoCo v3's ViT recipe, not the ResNet-50 one it used to
  get (LARS, lr 0.6, tau 1.0, 2-layer projector, predictor without last BN): the values are the paper's
  (facebookresearch/moco-v3 CONFIG.md; docs/reference.md §3) and those experiment=moco_v3_vit had before;
* DINO with a ResNet gets DINO's ResNet-50 recipe (README command / dino_resnet50 args.json; docs/reference.md §8);
* every (method, backbone) pair in conf/ composes, with recipe.name = <method>/<family> exactly when the recipe file
  exists; a pair without one says so in the first line of the run;
* a view is addressed by name from the command line (``augment.views.local.count=6`` reaches the built
  augmentation) and a misspelt view / optim field is refused naming the key.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from ssl_vision.config_checks import ConfigValueError, check_pretrain_config
from ssl_vision.launch import build_datamodule, run_pretraining
from tests.conftest import CONF, FAST
from tests.config_snapshot import FIXTURE

ROOT = Path(CONF).parent
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml"))
FAMILY = {
    "resnet18": "resnet",
    "resnet50": "resnet",
    "vit_b": "vit",
    "vit_s": "vit",
    "vit_small": "vit",
    "vit_tiny": "vit",
}

#: MoCo v3 ViT-B (CONFIG.md, docs/reference.md §3 table "ViT-S, ViT-B")
MOCO_V3_VIT = {
    "optim": {"name": "adamw", "base_lr": 1.5e-4, "weight_decay": 0.1, "warmup_epochs": 40, "betas": [0.9, 0.999]},
    "kwargs": {"temperature": 0.2, "proj_layers": 3, "pred_last_bn": True, "momentum": 0.99},
}
#: MoCo v3 ResNet-50 (CONFIG.md 100 epochs)
MOCO_V3_RESNET = {
    "optim": {"name": "lars", "base_lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10},
    "kwargs": {"temperature": 1.0, "proj_layers": 2, "pred_last_bn": False},
}


def _compose_many(overrides_list: list[list[str]]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return [compose("pretrain", overrides=ov) for ov in overrides_list]
    finally:
        GlobalHydra.instance().clear()


def _compose(overrides: list[str]):
    return _compose_many([overrides])[0]


def _has(node, values: dict) -> None:
    for key, want in values.items():
        got = node[key]
        got = list(got) if not isinstance(got, (str, int, float, bool)) else got
        assert got == pytest.approx(want), f"{key}: {got} != {want}"


# ----------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("backbone", ["vit_b", "vit_s", "vit_tiny"])
def test_moco_v3_with_a_vit_composes_the_vit_recipe(backbone):
    cfg = _compose(["method=moco_v3", f"backbone={backbone}"])
    assert (cfg.recipe.name, cfg.family.name) == ("moco_v3/vit", "vit") and "ViT-B" in cfg.recipe.source
    _has(cfg.method.optim, MOCO_V3_VIT["optim"])
    _has(cfg.method.kwargs, MOCO_V3_VIT["kwargs"])


def test_moco_v3_vit_recipe_equals_what_the_experiment_had():
    """The user's own command composes the method block experiment=moco_v3_vit composed before (golden fixture)."""
    old = json.loads(FIXTURE.read_text())["experiment=moco_v3_vit"]["method"]
    cfg = _compose(["method=moco_v3", "backbone=vit_b"])
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.method.kwargs, resolve=True) == old["kwargs"]
    optim = OmegaConf.to_container(cfg.method.optim, resolve=True)
    assert (
        optim == {**old["optim"], "weight_decay_end": optim["weight_decay_end"]} and optim["weight_decay_end"] is None
    )
    exp = _compose(["experiment=moco_v3_vit"])
    assert exp.recipe.name == "moco_v3/vit" and exp.method == cfg.method and exp.trainer.max_epochs == 300


def test_moco_v3_with_a_resnet_keeps_the_resnet_recipe():
    cfg = _compose(["method=moco_v3", "backbone=resnet50"])
    assert cfg.recipe.name == "moco_v3/resnet"
    _has(cfg.method.optim, MOCO_V3_RESNET["optim"])
    _has(cfg.method.kwargs, MOCO_V3_RESNET["kwargs"])


def test_dino_with_a_resnet_composes_dinos_resnet_recipe():
    """dino_resnet50 (facebookresearch/dino README): --optimizer sgd --lr 0.03 --weight_decay 1e-4
    --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14, teacher_temp 0.04 constant."""
    cfg = _compose(["method=dino", "backbone=resnet50"])
    assert cfg.recipe.name == "dino/resnet"
    _has(cfg.method.optim, {"name": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 10})
    assert cfg.method.optim.weight_decay_end is None  # constant, as --weight_decay_end 1e-4 = --weight_decay
    assert cfg.method.optim.final_factor * 0.03 == pytest.approx(1e-6, rel=0.02)  # min_lr 1e-6 at B = 256
    _has(
        cfg.method.kwargs,
        {"teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "norm_last_layer": True, "use_bn_in_head": False},
    )
    views = cfg.augment.views
    assert list(views) == ["global1", "global2", "local"] and views.local.count == 8
    assert [list(views[v].scale) for v in views] == [[0.14, 1.0], [0.14, 1.0], [0.05, 0.14]]
    vit = _compose(["method=dino", "backbone=vit_s"])  # the ViT recipe keeps DINO's ViT crops and AdamW
    assert vit.recipe.name == "dino/vit" and vit.method.optim.name == "adamw"
    assert [list(vit.augment.views[v].scale) for v in vit.augment.views] == [[0.4, 1.0], [0.4, 1.0], [0.05, 0.4]]


def test_dino_resnet_crops_do_not_leak_into_another_preset():
    """The ResNet crop scales belong to DINO's views: with augment=byol the two BYOL views are all there is."""
    cfg = _compose(["method=dino", "backbone=resnet50", "augment=byol"])
    assert list(cfg.augment.views) == ["view1", "view2"]
    assert [list(v.scale) for v in cfg.augment.views.values()] == [[0.08, 1.0], [0.08, 1.0]]


def test_every_method_backbone_pair_composes_with_its_recipe_or_none():
    """Every method with one backbone of each family, and every backbone file with one method (the backbone files
    of a family differ only in their name: the family decides the recipe)."""
    pairs = sorted({(m, b) for m in METHODS for b in ("resnet18", "vit_tiny")} | {("simclr", b) for b in BACKBONES})
    cfgs = _compose_many([[f"method={m}", f"backbone={b}"] for m, b in pairs])
    seen = set()
    for (m, b), cfg in zip(pairs, cfgs):
        family = FAMILY[b]
        assert cfg.family.name == family, (m, b)
        has_recipe = (ROOT / "conf" / "recipe" / m / f"{family}.yaml").is_file()
        assert cfg.recipe.name == (f"{m}/{family}" if has_recipe else None), (m, b)
        assert (cfg.recipe.source is not None) == has_recipe
        check_pretrain_config(cfg)
        seen.add((m, family, has_recipe))
    # every method has its paper recipe for its paper's backbone family
    assert {(m, f) for m, f, r in seen if r} >= {(m, "resnet") for m in METHODS if m != "mae"} | {
        ("dino", "vit"),
        ("mae", "vit"),
        ("moco_v3", "vit"),
    }


def test_family_can_be_named_for_another_backbone():
    """``backbone.name=timm:<name>`` keeps the file's family; ``family=vit`` picks the ViT recipes for it."""
    cfg = _compose(["method=moco_v3", "backbone=resnet50", "backbone.name=timm:vit_small_patch16_224", "family=vit"])
    assert cfg.recipe.name == "moco_v3/vit" and cfg.method.optim.name == "adamw"


def test_cfg_job_shows_the_recipe_and_its_source():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pretrain.py"), "method=moco_v3", "backbone=vit_b", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "recipe:\n  name: moco_v3/vit\n  source: 'MoCo v3" in out.stdout and "CONFIG.md ViT-B 300" in out.stdout
    assert "name: adamw" in out.stdout and "temperature: 0.2" in out.stdout


# ------------------------------------------------------------------------------------------- views by name, typos
def test_a_view_count_set_by_name_reaches_the_built_augmentation(make_cfg):
    cfg = make_cfg(["method=dino", "backbone=resnet18", *FAST, "augment.views.local.count=6"])
    assert cfg.augment.views.local.count == 6
    dm = build_datamodule(cfg)
    sizes = [t.transforms[1].size for t in dm.train_transform.transforms]  # RandomResizedCrop of each view
    side = cfg.data.image_size
    local = round(side * cfg.augment.views.local.size_ratio)
    assert len(dm.train_transform) == 1 + 1 + 6 and sizes == [(side, side)] * 2 + [(local, local)] * 6


@pytest.mark.parametrize(
    "override,key",
    [
        ("augment.views.global1.blurp=0.1", "blurp"),  # a misspelt field of an existing view
        ("augment.views.global1.count=abc", "count"),  # a value of the wrong type
        ("augment.views.globl1.count=3", "globl1"),  # a misspelt view name
        ("method.optim.base_lrr=0.1", "base_lrr"),  # a misspelt optimizer field
        ("method.optim.warmup_epochs=soon", "warmup_epochs"),
        ("backbone.drop_path=0.1", "drop_path"),
        ("method.kwargs.temprature=0.1", "temprature"),  # kwargs stay closed too
    ],
)
def test_a_typo_is_refused_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        _compose(["method=dino", override])
    text = f"{err.value} {err.value.__cause__}"
    assert key in text


def test_a_view_with_count_zero_is_refused_by_name(make_cfg):
    cfg = make_cfg(["method=dino", *FAST, "augment.views.local.count=0"])
    with pytest.raises(ConfigValueError, match=r"augment\.views\.local\.count must be a positive integer"):
        check_pretrain_config(cfg)


def test_views_out_of_size_order_are_refused_naming_them(make_cfg):
    cfg = make_cfg(["method=dino", *FAST, "augment.views.global2.size_ratio=0.25"])
    with pytest.raises(ValueError, match=r"augment.views must be ordered large -> small.*global2: 8 px, local: 14 px"):
        build_datamodule(cfg)


# ------------------------------------------------------------------------------------------------ one step each
TINY = {
    "moco_v3": ["method.kwargs.proj_hidden_dim=16", "method.kwargs.proj_out_dim=8", "method.kwargs.pred_hidden_dim=16"],
    "dino": [
        "method.kwargs.out_dim=32",
        "method.kwargs.hidden_dim=16",
        "method.kwargs.bottleneck_dim=8",
        "augment.views.local.size_ratio=0.5",
    ],
    "simclr": ["method.kwargs.proj_hidden_dim=16", "method.kwargs.proj_out_dim=8"],
    "mae": ["method.kwargs.decoder_dim=16", "method.kwargs.decoder_depth=1", "method.kwargs.decoder_heads=2"],
}
STEP = [
    ("moco_v3", "vit_tiny", "recipe moco_v3/vit: MoCo v3"),
    ("dino", "resnet18", "recipe dino/resnet: DINO"),
    (
        "simclr",
        "vit_tiny",
        "no paper recipe for (simclr, vit): the defaults of conf/method/simclr.yaml apply "
        "(paper recipes of simclr: simclr/resnet)",
    ),
    ("mae", "vit_tiny", "recipe mae/vit: MAE"),
]


@pytest.mark.parametrize("method,backbone,line", STEP, ids=[f"{m}-{b}" for m, b, _ in STEP])
def test_recipe_pairs_train_one_step_and_say_their_recipe_first(make_cfg, capsys, method, backbone, line):
    size = ["backbone.width=0.125"] if backbone == "resnet18" else ["backbone.patch_size=8"]
    cfg = make_cfg(
        [
            f"method={method}",
            f"backbone={backbone}",
            *size,
            *TINY[method],
            *FAST,
            "data.image_size=16",
            "trainer.max_steps=1",
            "eval.final_eval=false",
            "checkpoint.save_top_k=0",
            "data.synthetic_size=32",
            "trainer.limit_val_batches=0",
        ]
    )
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and math.isfinite(res["train_loss"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "recipe" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"[ssl_vision] {line}"), lines


VIT_COMPARISON = ["fmnist_vit_simclr", "fmnist_vit_moco_v3", "fmnist_vit_dino", "fmnist_vit_mae"]


def test_the_vit_comparison_shares_encoder_data_and_budget():
    """The README's four-method comparison is fair only if the four experiments train the same encoder on the same
    images for the same number of steps and evaluate alike: everything outside method/augment must agree."""
    cfgs = dict(zip(VIT_COMPARISON, _compose_many([[f"experiment={e}"] for e in VIT_COMPARISON])))
    methods = {e: c.method.name for e, c in cfgs.items()}
    assert sorted(methods.values()) == ["dino", "mae", "moco_v3", "simclr"], methods
    first = cfgs[VIT_COMPARISON[0]]
    assert first.backbone.name == "vit_tiny" and first.backbone.patch_size == 7
    assert dict(first.backbone.timm_kwargs) == {"depth": 4}
    for name, cfg in cfgs.items():
        for part in ("backbone", "data", "trainer", "eval", "seed"):
            assert cfg[part] == first[part], f"{name}: {part} differs from {VIT_COMPARISON[0]}"


def test_backbone_timm_kwargs_reach_the_timm_model():
    """backbone.timm_kwargs.depth=4 builds a 4-block ViT (the comparison's encoder), and the checkpoint's
    create_backbone record carries it so the evaluation tools rebuild the same encoder."""
    from ssl_vision.backbones import create_backbone
    from ssl_vision.eval.checkpoints import create_kwargs
    from ssl_vision.launch import build_module

    cfg = _compose(["experiment=fmnist_vit_simclr"])
    module = build_module(cfg)
    assert len(module.backbone.blocks) == 4
    kw = create_kwargs(dict(cfg.backbone), dict(cfg.data))
    assert kw["timm_kwargs"] == {"depth": 4}
    rebuilt, _ = create_backbone(**kw)
    assert len(rebuilt.blocks) == 4
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.backbone.state_dict().items()
    }


def test_export_of_a_shallower_vit_loads_into_the_stock_timm_model(tmp_path):
    """An encoder built with backbone.timm_kwargs (depth 4) is exported with those kwargs in stock.kwargs, so the
    documented timm.create_model(stock.model, **stock.kwargs) rebuilds it and the weights load strictly."""
    import timm

    from ssl_vision.eval.checkpoints import create_kwargs
    from ssl_vision.eval.export import stock_model
    from ssl_vision.launch import build_module

    cfg = _compose(["experiment=fmnist_vit_mae"])
    backbone = build_module(cfg).backbone
    stock = stock_model(create_kwargs(dict(cfg.backbone), dict(cfg.data)), backbone)
    assert stock["kwargs"]["depth"] == 4 and stock["loads_into_stock"]
    model = timm.create_model(stock["model"], **stock["kwargs"])
    assert len(model.blocks) == 4
    model.load_state_dict(backbone.state_dict(), strict=True)
