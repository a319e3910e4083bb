"""BYOL: the objective's loss vs its formula, head layout and paper defaults, target network (EMA schedule to
exactly 1, parameters only, no predictor, no gradient), per-view BN, the config's LARS, a mid-epoch resume.
(Smoke runs, 1 vs 2 processes, resume equality and the non-finite guard: tests/objectives/test_contract.py; the loss
function: tests/losses/test_regression.py.)"""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_vision.launch import run_pretraining
from ssl_vision.objectives import StepInfo, build_objective
from ssl_vision.optim import LARS
from tests.conftest import FAST
from tests.losses.test_regression import byol_by_formula
from tests.test_pretrain import _backbone_state

CONF = Path(__file__).resolve().parents[2] / "conf"
STEP = StepInfo(global_step=0, total_steps=10, epoch=0, max_epochs=1)
TINY = dict(proj_hidden_dim=16, proj_out_dim=6, pred_hidden_dim=12, momentum=0.9)
SMALL_HEADS = ["method.kwargs.proj_hidden_dim=32", "method.kwargs.pred_hidden_dim=32", "method.kwargs.proj_out_dim=16"]


def tiny_backbone(bn: bool = False):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(3 * 4 * 4, 8)]
    layers += [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(*layers, nn.ReLU())


def make(seed=0, bn=False):
    backbone = tiny_backbone(bn)
    torch.manual_seed(seed)
    obj = build_objective("byol", 8, **TINY)
    obj.bind(backbone)
    return backbone, obj


def perturb_target(obj):
    """Make the target differ from the online network, so a test can tell which one the code used."""
    with torch.no_grad():
        for p in [*obj.target_backbone.parameters(), *obj.target_projector.parameters()]:
            p.add_(0.3 * torch.randn_like(p))


# ------------------------------------------------------------------------------------------------ heads, config
def test_heads_layout_and_defaults_match_official_config(make_cfg):
    cfg = make_cfg(["method=byol", "backbone=resnet50"]).method  # conf/method/byol.yaml on its schema (OptimSpec)
    obj = build_objective("byol", 2048, **OmegaConf.to_container(cfg.kwargs, resolve=True))
    for head, dims in ((obj.projector, (2048, 4096, 256)), (obj.predictor, (256, 4096, 256))):
        lin1, bn, act, lin2 = head
        assert isinstance(bn, nn.BatchNorm1d) and isinstance(act, nn.ReLU) and len(head) == 4
        assert (lin1.in_features, lin1.out_features, lin2.out_features) == dims
        assert lin1.bias is not None and lin2.bias is None  # haiku MLP: bias before BN, none at the output
        assert bn.momentum == pytest.approx(0.1) and bn.eps == pytest.approx(1e-5)  # decay 0.9, eps 1e-5
    # 300-epoch preset of deepmind-research/byol configs/byol.py
    o = cfg.optim
    assert (o.name, o.base_lr, o.lr_scaling, o.weight_decay, o.momentum, o.trust_coefficient, o.warmup_epochs) == (
        "lars",
        0.3,
        "linear",
        1e-6,
        0.9,
        0.001,
        10,
    )
    assert cfg.kwargs.momentum == 0.99 and cfg.kwargs.momentum_end == 1.0 and cfg.sync_batchnorm is True


def test_rejects_bad_momentum_and_missing_views():
    with pytest.raises(ValueError, match="method.kwargs.momentum must be"):
        build_objective("byol", 8, **{**TINY, "momentum": 1.5})
    backbone, obj = make()
    with pytest.raises(ValueError, match="2 views"):
        obj([torch.randn(4, 3, 4, 4)], backbone, STEP)
    unbound = build_objective("byol", 8, **TINY)
    with pytest.raises(RuntimeError, match="bind"):
        unbound([torch.randn(4, 3, 4, 4)] * 2, backbone, STEP)


# ------------------------------------------------------------------------------------------------ objective
def test_objective_loss_equals_formula_with_target_outputs():
    backbone, obj = make()
    perturb_target(obj)
    obj.eval()  # BN with running stats: each head is a fixed per-sample function we can recompute
    x1, x2 = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    out = obj([x1, x2], backbone, STEP)
    with torch.no_grad():
        p1, p2 = obj.predictor(obj.projector(backbone(x1))), obj.predictor(obj.projector(backbone(x2)))
        t1, t2 = obj.target_projector(obj.target_backbone(x1)), obj.target_projector(obj.target_backbone(x2))
    assert out.loss.item() == pytest.approx(byol_by_formula(p1, p2, t1, t2), rel=1e-5)
    assert out.features.shape == (4, 8) and out.embedding.shape == (4, 6)
    torch.testing.assert_close(out.features, backbone(x1))  # probe reads backbone features of the first view


def test_each_view_has_its_own_bn_statistics():
    """Train-mode BN: the loss must equal forwarding each view separately, not the two views concatenated."""
    backbone, obj = make(bn=True)
    perturb_target(obj)
    backbone.train(), obj.train()
    x1, x2 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4) + 1.0
    out = obj([x1, x2], backbone, STEP)
    with torch.no_grad():  # train-mode BN outputs depend only on the batch passed in, not on running stats
        on = lambda x: obj.predictor(obj.projector(backbone(x)))
        tg = lambda x: obj.target_projector(obj.target_backbone(x))
        separate = byol_by_formula(on(x1), on(x2), tg(x1), tg(x2))
        both = torch.cat([x1, x2])
        p1, p2 = on(both).chunk(2)
        t1, t2 = tg(both).chunk(2)
        mixed = byol_by_formula(p1, p2, t1, t2)
    assert out.loss.item() == pytest.approx(separate, rel=1e-5)
    assert abs(separate - mixed) > 1e-3  # the check above can tell the two apart


def test_target_has_no_predictor_and_gets_no_gradient():
    backbone, obj = make()
    n_target = sum(p.numel() for p in [*obj.target_backbone.parameters(), *obj.target_projector.parameters()])
    n_online_no_pred = sum(p.numel() for p in [*backbone.parameters(), *obj.projector.parameters()])
    assert n_target == n_online_no_pred
    assert not any("predictor" in name for name, _ in obj.named_modules() if name.startswith("target"))
    target_params = [*obj.target_backbone.parameters(), *obj.target_projector.parameters()]
    assert all(not p.requires_grad for p in target_params)
    out = obj([torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)], backbone, STEP)
    out.loss.backward()
    assert all(p.grad is None for p in target_params)
    assert all(p.grad is not None for p in obj.predictor.parameters())
    in_optimizer = {id(p) for g in obj.parameter_groups(1e-6) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in target_params}
    assert {id(p) for p in [*obj.projector.parameters(), *obj.predictor.parameters()]} == in_optimizer
    assert any(k.startswith("target_backbone.") for k in obj.state_dict())  # checkpoints hold the target


def test_ema_update_parameters_only_with_cosine_tau():
    backbone, obj = make(bn=True)
    with torch.no_grad():  # online moves away from the target; the BN running stats differ too
        for p in [*backbone.parameters(), *obj.projector.parameters()]:
            p.add_(1.0)
        backbone[2].running_mean.fill_(5.0)
        obj.projector[1].running_var.fill_(7.0)
    old = {k: v.clone() for k, v in obj.state_dict().items() if k.startswith("target")}
    k, total, tau0 = 3, 10, 0.9
    tau = 1 - (1 - tau0) * 0.5 * (1 + math.cos(math.pi * k / total))  # BYOL's schedule written out
    obj.after_optimizer_step(backbone, StepInfo(global_step=k, total_steps=total, epoch=0, max_epochs=1))
    assert obj.last_momentum == pytest.approx(tau, rel=1e-12)
    online = {
        **{f"target_backbone.{n}": p for n, p in backbone.named_parameters()},
        **{f"target_projector.{n}": p for n, p in obj.projector.named_parameters()},
    }
    new = obj.state_dict()
    for name, before in old.items():
        if name in online:  # parameters: θ_t ← τ·θ_t + (1 − τ)·θ_o
            torch.testing.assert_close(new[name], tau * before + (1 - tau) * online[name].detach())
        else:  # BN running stats and counters: the target's own, untouched
            assert torch.equal(new[name], before), name
    assert any(n.endswith("running_mean") for n in old) and any(n.endswith("num_batches_tracked") for n in old)


def test_last_update_uses_tau_one_and_leaves_target_unchanged():
    backbone, obj = make()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in obj.target_backbone.state_dict().items()}
    obj.after_optimizer_step(backbone, StepInfo(global_step=7, total_steps=7, epoch=0, max_epochs=1))
    assert obj.last_momentum == 1.0  # exactly, not 0.9999999999999999
    for k, v in obj.target_backbone.state_dict().items():
        assert torch.equal(v, before[k])


class RecordMomentum(L.Callback):
    """τ of each EMA update: read at the next batch start (the module hook runs after callbacks) and at the end."""

    def __init__(self):
        self.taus, self.total = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.objective.last_momentum is not None and batch_idx % trainer.accumulate_grad_batches == 0:
            self.taus.append(pl_module.objective.last_momentum)

    def on_train_end(self, trainer, pl_module):
        self.taus.append(pl_module.objective.last_momentum)
        self.total = pl_module.total_steps()


def byol_schedule(k, total, tau0=0.99):
    """τ_k = 1 − (1 − τ0)·½(1 + cos(π·k/K)) (BYOL, docs/reference.md §0.1)."""
    return 1 - (1 - tau0) * 0.5 * (1 + math.cos(math.pi * k / total))


def test_ema_counts_optimizer_steps_under_gradient_accumulation(make_cfg):
    """Through SSLModule: one EMA update per optimizer step, K = optimizer steps (4 batches / accumulate 2 = 2)."""
    cfg = make_cfg(
        [
            "method=byol",
            "backbone=resnet18",
            "backbone.width=0.125",
            *FAST,
            *SMALL_HEADS,
            "trainer.accumulate_grad_batches=2",
            "eval.final_eval=false",
        ]
    )
    rec = RecordMomentum()
    res = run_pretraining(cfg, extra_callbacks=[rec])
    assert res["steps"] == 2 and rec.total == 2
    assert rec.taus == [pytest.approx(byol_schedule(1, 2), rel=1e-12), 1.0]


# ------------------------------------------------------------------------------------------------ end to end
class CheckOptimizer(L.Callback):
    """The config's LARS with biases and norms (1-D) excluded from weight decay and adaptation; no target inside."""

    checked = False

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        assert isinstance(opt, LARS)
        for g in opt.param_groups:
            one_d = {p.ndim <= 1 for p in g["params"]}
            assert len(one_d) == 1
            assert g["lars_exclude"] is one_d.pop() and (g["weight_decay"] == 0) is g["lars_exclude"]
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad} - {
            id(p) for p in pl_module.online_probe.parameters()
        }
        assert in_opt == trainable and not in_opt & {id(p) for p in pl_module.objective.target_backbone.parameters()}
        self.checked = True


def test_one_step_with_lars_and_the_target_outside_the_optimizer(make_cfg):
    cfg = make_cfg(["method=byol", "backbone=resnet18", "backbone.width=0.125", *FAST, "trainer.max_steps=1"])
    assert cfg.augment.name == "byol"  # the method's own (asymmetric) preset
    opt = CheckOptimizer()
    res = run_pretraining(cfg, extra_callbacks=[opt])
    assert opt.checked
    assert res["steps"] == 1 and res["images_seen"] == 16
    assert 0.0 <= res["train_loss"] <= 8.0
    assert 0.0 <= res["knn_top1"] <= 100.0


def test_ema_schedule_over_a_run_ends_at_one_and_the_target_is_checkpointed(make_cfg, tmp_path):
    """τ of each EMA update follows the schedule over the run's K optimizer steps, ending at exactly 1.0; the
    checkpoint holds the whole target (BN statistics and projector included). Resume equality, target included:
    tests/objectives/test_contract.py."""
    common = [
        "method=byol",
        "backbone=resnet18",
        "backbone.width=0.125",
        *FAST,
        *SMALL_HEADS,
        "trainer.max_epochs=2",
        "eval.final_eval=false",
    ]
    rec = RecordMomentum()
    straight = run_pretraining(make_cfg(common, tmp_path / "straight"), extra_callbacks=[rec])
    assert rec.total == 8 and rec.taus == pytest.approx([byol_schedule(k, 8) for k in range(1, 9)], rel=1e-12)
    assert rec.taus[-1] == 1.0  # exactly
    assert straight["steps"] == 8
    a, _ = _backbone_state(straight["checkpoint"])
    target_keys = [k for k in a if k.startswith("objective.target_")]
    assert any(".running_mean" in k for k in target_keys)
    assert any(k.startswith("objective.target_projector") for k in target_keys)
    # the target is real state (an EMA lagging the online network), not a copy that could be rebuilt
    assert not torch.allclose(a["objective.target_projector.0.weight"], a["objective.projector.0.weight"])


def test_resume_from_a_mid_epoch_checkpoint_equals_uninterrupted(make_cfg, tmp_path):
    """A checkpoint written inside an epoch (``checkpoint.every_n_steps=3``; 4 steps per epoch here) already holds
    that step's EMA update of the target and the online probe's step: resuming from it gives every weight of the
    uninterrupted run, target network and probe included. (Were both updates to run after the checkpoint callback,
    a resumed run would lag by one target update.)"""
    common = [
        "method=byol",
        "backbone=resnet18",
        "backbone.width=0.125",
        *FAST,
        *SMALL_HEADS,
        "trainer.max_epochs=2",
        "eval.final_eval=false",
        "checkpoint.every_n_steps=3",
        "checkpoint.save_top_k=-1",
    ]
    straight = run_pretraining(make_cfg(common, tmp_path / "straight"))
    assert straight["steps"] == 8
    mid = sorted(Path(straight["checkpoint"]).parent.glob("epoch000-step0000003.ckpt"))
    assert len(mid) == 1, sorted(p.name for p in Path(straight["checkpoint"]).parent.iterdir())
    resumed = run_pretraining(make_cfg([*common, f"resume={mid[0]}"], tmp_path / "other"))
    assert resumed["steps"] == 8
    _, a = _backbone_state(straight["checkpoint"])  # the whole state_dict, online probe included
    _, b = _backbone_state(resumed["checkpoint"])
    assert a.keys() == b.keys() and any(k.startswith("online_probe.") for k in a)
    assert any(k.startswith("objective.target_backbone.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
