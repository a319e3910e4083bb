"""End-to-end fine-tuning (docs/reference.md §10.3): MAE's layer-wise lr decay ratios, mixup / cutmix soft targets, real
steps on a tiny ViT and a tiny ResNet that change the weights (and only the copy), and the tool entry point."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ssl_vision.backbones import create_backbone
from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.eval.finetune import (
    build_finetune_model,
    build_mixup,
    build_optimizer,
    finetune_backbone,
    lr_at,
    make_finetune_spec,
    set_lr,
)
from tests.eval.test_features import DATA, TINY_BACKBONE_CFG, tiny_backbone, write_checkpoint
from tests.eval.test_tools import compose_cfg, load_tool

ROOT = Path(__file__).resolve().parents[2]
RECIPE = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/linear.yaml").finetuning)
VIT_KW = {"name": "vit_tiny", "in_chans": 3, "image_size": 16, "patch_size": 4}
#: timm's own test ViT (6 blocks, width 64): the same VisionTransformer class as vit_tiny, ~20x fewer weights
TEST_VIT_CFG = {**TINY_BACKBONE_CFG, "name": "test_vit", "width": 1.0, "patch_size": 4}


def spec():
    """The config's recipe, shrunk: one epoch of batch 8 (16 train images -> 2 steps), no warmup (lr 0 at step 0)."""
    return make_finetune_spec({**RECIPE, "warmup_epochs": 0}, lr=1e-3, epochs=1, batch_size=8)


def mae_layer_id(name: str, num_layers: int) -> int:
    """MAE util/lr_decay.py get_layer_id_for_vit (BEiT): stem 0, block i -> i + 1, the rest num_layers + 1.

    One known difference of timm's grouping, kept (we use timm's, as asked): timm gives the final ``norm`` the
    last block's layer id (lr scale ``decay``), where MAE gives it num_layers + 1 (lr scale 1)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return num_layers  # timm: with the last block
    return num_layers + 1


def test_recipe_defaults_and_overrides():
    s = make_finetune_spec(RECIPE)
    assert s.lr == pytest.approx(5e-4 * 1024 / 256) and s.layer_decay == 0.65 and s.drop_path == 0.1
    assert (s.mixup, s.cutmix, s.smoothing, s.weight_decay, s.warmup_epochs) == (0.8, 1.0, 0.1, 0.05, 5)
    small = make_finetune_spec(RECIPE, epochs=10, batch_size=64)
    assert small.lr == pytest.approx(5e-4 * 64 / 256) and small.epochs == 10
    assert make_finetune_spec(RECIPE, lr=0.01, batch_size=64).lr == 0.01
    with pytest.raises(ValueError, match="warmup_epochs=5 exceeds epochs=2"):
        make_finetune_spec(RECIPE, epochs=2)
    with pytest.raises(ValueError, match="batch_size must be even"):
        make_finetune_spec(RECIPE, batch_size=7)
    with pytest.raises(ValueError, match=r"unknown finetuning keys \['bogus'\]"):
        make_finetune_spec({**RECIPE, "bogus": 1})


def test_warmup_then_cosine_to_min_lr_as_mae_lr_sched():
    s = make_finetune_spec(RECIPE, epochs=10, batch_size=256)  # warmup 5 epochs, lr 5e-4, min_lr 1e-6
    for step in range(0, 10 * 7, 3):  # 7 steps per epoch
        epoch = step / 7  # MAE util/lr_sched.py adjust_learning_rate, with the fractional epoch
        if epoch < 5:
            ref = s.lr * epoch / 5
        else:
            ref = s.min_lr + (s.lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / (10 - 5)))
        assert lr_at(s, step, 7) == pytest.approx(ref, rel=1e-9, abs=1e-15), step


@pytest.fixture(scope="module")
def vit_classifier():
    backbone, _ = create_backbone(**VIT_KW)
    return build_finetune_model(backbone, VIT_KW, 10, drop_path=0.1)


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_layer_decay_gives_mae_per_block_lr_ratios(decay, vit_classifier):
    model, vit = vit_classifier
    assert vit
    opt = build_optimizer(model, make_finetune_spec({**RECIPE, "layer_decay": decay}), vit)
    set_lr(opt, 1.0)  # so that a group's lr is its scale
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    num_layers = len(model.blocks)
    assert num_layers == 12
    names = dict(model.named_parameters())
    assert set(lr_of) == {id(p) for p in names.values()}  # every parameter is optimised
    for name, p in names.items():
        expected = decay ** (num_layers + 1 - mae_layer_id(name, num_layers))
        assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
        no_wd = p.ndim == 1 or name in ("pos_embed", "cls_token")
        assert wd_of[id(p)] == (0.0 if no_wd else 0.05), name
    assert lr_of[id(names["head.weight"])] == 1.0
    ratio = lr_of[id(names["blocks.3.attn.qkv.weight"])] / lr_of[id(names["blocks.4.attn.qkv.weight"])]
    assert ratio == pytest.approx(decay)

    resnet, _ = tiny_backbone()
    rmodel, rvit = build_finetune_model(
        resnet, {"name": "resnet18", "in_chans": 3, "image_size": 16, "width": 0.125}, 10, drop_path=0.1
    )
    assert not rvit
    ropt = build_optimizer(rmodel, make_finetune_spec({**RECIPE, "layer_decay": decay}), rvit)
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in ropt.param_groups)  # ResNets: no layer decay


def smoothed(y: torch.Tensor, c: int, s: float) -> torch.Tensor:
    return torch.full((len(y), c), s / c).scatter_(1, y[:, None], 1 - s + s / c)


@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_targets_are_convex_smoothed_labels_summing_to_one(alphas):
    s = make_finetune_spec({**RECIPE, "mixup": alphas[0], "cutmix": alphas[1]})
    mix = build_mixup(s, num_classes=10)
    np.random.seed(1)
    for trial in range(4):
        x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
        xm, t = mix(x.clone(), y)
        assert t.shape == (8, 10)
        torch.testing.assert_close(t.sum(1), torch.ones(8))
        # recover lambda from one row (y_i != y_flip_i) and rebuild every target from the definition
        lam = float((t[0, 0] - 0.1 / 10) / (1 - 0.1))
        ref = lam * smoothed(y, 10, 0.1) + (1 - lam) * smoothed(y.flip(0), 10, 0.1)
        torch.testing.assert_close(t, ref, rtol=0, atol=1e-6)
        assert -1e-6 <= lam <= 1 + 1e-6  # cutmix may clip the box to nothing: lam = 1
        mixed = lam * x + (1 - lam) * x.flip(0)
        pasted = (xm == x) | (xm == x.flip(0))
        if torch.allclose(xm, mixed, atol=1e-6) and alphas[0] > 0:
            continue  # mixup: a convex blend of the batch and its flip
        assert alphas[1] > 0 and bool(pasted.all())  # cutmix: every pixel from one of the two images
        area = 1 - float((xm == x.flip(0)).float().mean() - (x == x.flip(0)).float().mean())
        assert area == pytest.approx(lam, abs=1e-6)  # lambda corrected to the pasted box area


@pytest.mark.parametrize("arch", ["vit", "resnet18"])
def test_two_steps_change_the_weights_of_a_copy(arch, tmp_path):
    if arch == "vit":
        torch.manual_seed(0)
        model, _ = create_backbone(**{**VIT_KW, "name": "test_vit"})
        ckpt = write_checkpoint(tmp_path / "last.ckpt", model, backbone_cfg=TEST_VIT_CFG)
    else:
        ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    backbone, _, info = load_backbone(ckpt)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    res, tuned = finetune_backbone(
        backbone, info["create_kwargs"], DATA, spec(), eval_batch_size=32, device="cpu", train_subset=16
    )
    assert res["steps"] == 2 and res["epochs"] == 1 and res["rule"] == "last" and res["mixup"]
    assert (res["train_samples"], res["test_samples"], res["num_classes"]) == (16, 24, 4)
    assert 0 <= res["top1"] <= 100 and res["top1"] <= res["top5"] and np.isfinite(res["train_loss"])
    for k, v in backbone.state_dict().items():  # the loaded backbone itself is left alone
        assert torch.equal(v, before[k]), k
    tuned_state = (tuned if arch == "vit" else tuned.backbone).state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(tuned_state[k], v)]
    trainable = [k for k, v in before.items() if v.is_floating_point()]
    assert changed == trainable  # every weight (and BN running statistic) moved
    if arch == "vit":
        assert (res["layer_decay"], res["drop_path"]) == (0.65, 0.1)
        assert tuned.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm: linear in depth up to 0.1
        assert tuned.get_classifier().out_features == 4
    else:
        assert (res["layer_decay"], res["drop_path"]) == (None, None) and tuned.head.out_features == 4
        again, _ = finetune_backbone(
            backbone, info["create_kwargs"], DATA, spec(), eval_batch_size=32, device="cpu", train_subset=16
        )
        assert again["train_loss"] == res["train_loss"] and again["top1"] == res["top1"]  # seeded


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_linear_probe_tool_finetune_true(arch, tmp_path):
    if arch == "vit":
        torch.manual_seed(0)
        model, _ = create_backbone(**{**VIT_KW, "name": "test_vit"})
        ckpt = write_checkpoint(tmp_path / "last.ckpt", model, backbone_cfg=TEST_VIT_CFG)
    else:
        ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    probe = load_tool("linear_probe")
    base = [
        f"checkpoint={ckpt}",
        "finetune=true",
        "epochs=1",
        "batch_size=8",
        "train_subset=16",
        "finetuning.warmup_epochs=0",
        "num_workers=0",
        "extract_batch_size=32",
        "device=cpu",
    ]
    res = probe.run(compose_cfg("linear", base))
    assert json.loads((tmp_path / "last.finetune.json").read_text()) == res
    assert res["mode"] == "finetune" and res["steps"] == 2
    assert res["backbone"] == ("test_vit" if arch == "vit" else "resnet18")
    assert res["lr"] == pytest.approx(5e-4 * 8 / 256) and res["spec"]["weight_decay"] == 0.05
    assert not (tmp_path / "last.linear.json").exists()
    # the fine-tuned weights are saved in the export format: the evaluation tools read them like any backbone
    from safetensors.torch import load_file

    from ssl_vision.eval.checkpoints import load_backbone

    saved = res["saved"]
    tuned, dim, tuned_info = load_backbone(saved["backbone"])
    original, _, _ = load_backbone(ckpt)
    assert tuned_info["format"] == "export" and tuned_info["weights"] == "finetuned"
    assert tuned.state_dict().keys() == original.state_dict().keys()
    assert any(not torch.equal(tuned.state_dict()[k], v) for k, v in original.state_dict().items())  # 2 steps moved it
    head = load_file(saved["head"])
    assert head["weight"].shape == (res["num_classes"], dim) and head["bias"].shape == (res["num_classes"],)
    with pytest.raises(ValueError, match=re.escape("report_best_on_test / train_augment are linear-probe options")):
        probe.evaluate(compose_cfg("linear", [*base, "report_best_on_test=true"]))
