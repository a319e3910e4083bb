"""SimSiam: the objective's loss vs its formula, head layout and paper defaults, frozen projector bias, fixed
predictor lr, collapse warning. (Smoke runs, 1 vs 2 processes, resume equality and the non-finite guard:
tests/objectives/test_contract.py; the loss function: tests/losses/test_regression.py.)"""

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_vision.launch import run_pretraining
from ssl_vision.objectives import StepInfo, build_objective
from tests.conftest import FAST
from tests.losses.test_regression import simsiam_by_formula
from tests.test_pretrain import _backbone_state

CONF = Path(__file__).resolve().parents[2] / "conf"
STEP = StepInfo(global_step=0, total_steps=10, epoch=0, max_epochs=1)
TINY = dict(proj_hidden_dim=16, proj_out_dim=12, pred_hidden_dim=4)
SMALL_HEADS = ["method.kwargs.proj_hidden_dim=32", "method.kwargs.proj_out_dim=32", "method.kwargs.pred_hidden_dim=8"]


def tiny_backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU())


def make(seed=0, **kw):
    backbone = tiny_backbone()
    torch.manual_seed(seed)
    return backbone, build_objective("simsiam", 8, **{**TINY, **kw})


# ------------------------------------------------------------------------------------------------ heads, config
def test_heads_layout_and_defaults_match_official(make_cfg):
    cfg = make_cfg(["method=simsiam", "backbone=resnet50"]).method  # conf/method/simsiam.yaml on its schema
    obj = build_objective("simsiam", 2048, **OmegaConf.to_container(cfg.kwargs, resolve=True))
    proj, pred = obj.projector, obj.predictor
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    lins = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(2048, 2048)] * 3
    assert lins[0].bias is None and lins[1].bias is None
    assert lins[2].bias is not None and not lins[2].bias.requires_grad and lins[2].weight.requires_grad
    assert not proj[-1].affine  # BN(affine=False) on the projector output
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no BN at the output
    assert (pred[0].in_features, pred[0].out_features, pred[0].bias) == (2048, 512, None)
    assert (pred[3].out_features, pred[3].bias is not None) == (2048, True)
    o = cfg.optim
    assert (o.name, o.base_lr, o.lr_scaling, o.weight_decay, o.momentum, o.warmup_epochs) == (
        "sgd",
        0.05,
        "linear",
        1e-4,
        0.9,
        0,
    )
    assert cfg.kwargs.fix_pred_lr is True and cfg.sync_batchnorm is True


def test_augment_alias_is_moco_v2(make_cfg):
    cfg = make_cfg(["method=simsiam"])
    moco = make_cfg(["augment=moco_v2"]).augment
    assert cfg.augment.name == "simsiam" and cfg.augment.views == moco.views


def test_two_layer_projector_and_bad_arguments():
    _, obj = make(proj_layers=2)
    assert [type(m) for m in obj.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    with pytest.raises(ValueError, match="at least 2 layers"):
        make(proj_layers=1)
    with pytest.raises(ValueError, match="collapse_warn_fraction"):
        make(collapse_warn_fraction=1.5)
    backbone, obj = make()
    with pytest.raises(ValueError, match="2 views"):
        obj([torch.randn(4, 3, 4, 4)], backbone, STEP)


def test_parameter_groups_fixed_predictor_and_no_frozen_bias():
    _, obj = make()
    groups = obj.parameter_groups(1e-4)
    frozen = obj.projector[-2].bias
    assert all(p is not frozen for g in groups for p in g["params"])
    pred_ids = {id(p) for p in obj.predictor.parameters()}
    for g in groups:
        is_pred = {id(p) for p in g["params"]} <= pred_ids
        assert g["fixed_lr"] is is_pred, g["name"]
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in obj.parameters() if p.requires_grad}
    backbone, obj = make()
    obj.eval()
    obj([torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)], backbone, STEP).loss.backward()
    assert obj.projector[-2].bias.grad is None and obj.projector[-2].weight.grad is not None  # no gradient at all
    _, obj = make(fix_pred_lr=False)
    assert not any(g["fixed_lr"] for g in obj.parameter_groups(1e-4))


# ------------------------------------------------------------------------------------------------ objective
def test_objective_loss_equals_formula():
    backbone, obj = make()
    obj.eval()  # BN with running stats: the heads are fixed per-sample functions we can recompute
    x1, x2 = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    out = obj([x1, x2], backbone, STEP)
    with torch.no_grad():
        z1, z2 = obj.projector(backbone(x1)), obj.projector(backbone(x2))
        p1, p2 = obj.predictor(z1), obj.predictor(z2)
    assert out.loss.item() == pytest.approx(simsiam_by_formula(p1, p2, z1, z2), rel=1e-5)
    assert out.features.shape == (4, 8) and out.embedding.shape == (4, 12)
    n = nn.functional.normalize(z1, dim=1)
    assert out.logs["z_std"].item() == pytest.approx(n.std(dim=0).mean().item(), rel=1e-5)


def test_each_view_has_its_own_bn_statistics():
    backbone, obj = make()
    obj.train()
    x1, x2 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4) + 1.0
    out = obj([x1, x2], backbone, STEP)
    with torch.no_grad():
        z1, z2 = obj.projector(backbone(x1)), obj.projector(backbone(x2))
        separate = simsiam_by_formula(obj.predictor(z1), obj.predictor(z2), z1, z2)
        z1m, z2m = obj.projector(backbone(torch.cat([x1, x2]))).chunk(2)
        p1m, p2m = obj.predictor(torch.cat([z1m, z2m])).chunk(2)
        mixed = simsiam_by_formula(p1m, p2m, z1m, z2m)
    assert out.loss.item() == pytest.approx(separate, rel=1e-5)
    assert abs(separate - mixed) > 1e-3


def _collapse_warnings(obj, backbone, x, epoch, steps=1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(steps):
            obj([x, x.clone()], backbone, StepInfo(global_step=k, total_steps=10, epoch=epoch, max_epochs=2))
    return [w for w in caught if "collapsed" in str(w.message)]


def test_collapse_warning_fires_once_on_collapsed_input_after_first_epoch():
    backbone, obj = make()
    obj.train()
    same = torch.randn(1, 3, 4, 4).expand(6, -1, -1, -1).contiguous()  # every sample identical: z has zero spread
    assert _collapse_warnings(obj, backbone, same, epoch=0) == []  # first epoch: not judged yet
    fired = _collapse_warnings(obj, backbone, same, epoch=1, steps=3)
    assert len(fired) == 1  # once
    assert "1/√12" in str(fired[0].message)
    out = obj([same, same], backbone, STEP)
    assert out.logs["z_std"].item() < 0.1 / math.sqrt(12)


def test_no_collapse_warning_on_healthy_input():
    backbone, obj = make()
    obj.train()
    x = torch.randn(16, 3, 4, 4)
    assert _collapse_warnings(obj, backbone, x, epoch=1) == []
    out = obj([x, x], backbone, STEP)
    assert out.logs["z_std"].item() > 0.5 / math.sqrt(12)


# ------------------------------------------------------------------------------------------------ optimizer in a run
class RecordGroups(L.Callback):
    """lr of every optimizer group at each batch start; the frozen bias before and after; optimizer membership."""

    def __init__(self):
        self.lrs: list[dict[str, float]] = []
        self.bias_before = self.bias_after = None
        self.frozen_in_optimizer = None

    def on_train_start(self, trainer, pl_module):
        bias = pl_module.objective.projector[-2].bias
        self.bias_before = bias.detach().clone()
        self.frozen_in_optimizer = any(p is bias for g in trainer.optimizers[0].param_groups for p in g["params"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append({f"{g['name']}/{g['lars_exclude']}": g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_end(self, trainer, pl_module):
        self.bias_after = pl_module.objective.projector[-2].bias.detach().clone()


def test_predictor_lr_fixed_while_encoder_follows_warmup_cosine(make_cfg):
    cfg = make_cfg(
        [
            "method=simsiam",
            "backbone=resnet18",
            "backbone.width=0.125",
            *FAST,
            *SMALL_HEADS,
            "trainer.max_epochs=2",
            "method.optim.warmup_epochs=0.5",
            "eval.final_eval=false",
        ]
    )
    rec = RecordGroups()
    res = run_pretraining(cfg, extra_callbacks=[rec])
    total, warmup = 8, 2  # 4 steps per epoch × 2; 0.5 epoch of warmup
    base = 0.05 * 16 / 256  # linear scaling rule
    assert res["steps"] == total and len(rec.lrs) == total

    def encoder_lr(t):  # linear warmup from 0, then half cosine to 0 (docs/reference.md §0.1), written out
        if t < warmup:
            return base * t / warmup
        return 0.5 * base * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    for t, lrs in enumerate(rec.lrs):
        assert {k.split("/")[0] for k in lrs} == {"backbone", "projector", "predictor"}
        for key, lr in lrs.items():
            want = base if key.startswith("predictor") else encoder_lr(t)
            assert lr == pytest.approx(want, rel=1e-9, abs=1e-12), (t, key)
    # the frozen bias never reaches the optimizer and never moves, while the weights around it do
    assert rec.frozen_in_optimizer is False
    assert torch.equal(rec.bias_before, rec.bias_after)
    ckpt, _ = _backbone_state(res["checkpoint"])
    assert torch.equal(ckpt["objective.projector.6.bias"], rec.bias_before)
