"""SSLModule wiring: optimizer groups and lr scaling, the online probe's isolation, collapse monitor, faults."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from ssl_vision.launch import run_pretraining
from ssl_vision.module import collapse_std
from tests.conftest import FAST

BASE = ["method=simclr", "backbone=resnet18", "backbone.width=0.125", *FAST]


class Capture(L.Callback):
    """Records the optimizer groups and the parameters before/after the first optimizer step."""

    def on_train_start(self, trainer, module):
        self.groups = [dict(g, params=[id(p) for p in g["params"]]) for g in trainer.optimizers[0].param_groups]
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.frozen = {n for n, p in module.named_parameters() if not p.requires_grad}

    def on_train_end(self, trainer, module):  # runs are one step long here
        self.after = {n: p.detach().clone() for n, p in module.named_parameters()}


def test_lr_scaled_by_true_global_batch_and_no_decay_on_1d(make_cfg):
    cap = Capture()
    cfg = make_cfg(
        [
            *BASE,
            "trainer.max_steps=1",
            "trainer.accumulate_grad_batches=2",
            "method.optim.name=sgd",
            "method.optim.base_lr=0.5",
            "method.optim.warmup_epochs=0",
            "method.optim.final_factor=1.0",
            "method.optim.weight_decay=0.01",
        ]
    )
    run_pretraining(cfg, extra_callbacks=[cap])
    for g in cap.groups:
        # global batch = 16 per device × 1 device × 2 accumulation = 32 -> 0.5 × 32/256
        assert g["lr"] == pytest.approx(0.5 * 32 / 256)
        names = [cap.names[i] for i in g["params"]]
        assert not any(n.startswith("online_probe") for n in names), "the probe has its own optimizer"
        dims = {cap.before[n].ndim for n in names}
        assert (g["weight_decay"] == 0.0) == (dims <= {1}), (g["weight_decay"], names[:3])
    assert cap.frozen == {"objective.projector.7.bias"}  # SimCLR's last BN shift β is frozen...
    grouped = {cap.names[i] for g in cap.groups for i in g["params"]}
    assert not cap.frozen & grouped  # ...and never reaches the optimizer


def test_online_probe_trains_without_touching_backbone(make_cfg):
    """With the SSL learning rate at 0 the backbone parameters stay put while the probe learns."""
    cap = Capture()
    cfg = make_cfg(
        [
            *BASE,
            "trainer.max_steps=1",
            "method.optim.name=sgd",
            "method.optim.base_lr=0.0",
            "method.optim.weight_decay=0.0",
            "eval.probe_lr=0.5",
        ]
    )
    run_pretraining(cfg, extra_callbacks=[cap])
    for n, before in cap.before.items():
        if n.startswith("backbone."):
            torch.testing.assert_close(cap.after[n], before, rtol=0, atol=0, msg=n)
    assert not torch.equal(cap.after["online_probe.weight"], cap.before["online_probe.weight"])


def test_collapse_std_formula():
    e = 256
    collapsed = torch.ones(64, e) + 1e-9 * torch.randn(64, e)
    assert collapse_std(collapsed).item() < 1e-6
    spread = torch.randn(4096, e)
    assert collapse_std(spread).item() == pytest.approx(1 / math.sqrt(e), rel=0.05)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(make_cfg, monkeypatch, tmp_path):
    from ssl_vision.objectives.simclr import SimCLR

    cfg = make_cfg([*BASE, "trainer.max_epochs=3"], tmp_path / "nan")
    real_forward = SimCLR.forward

    def poisoned(self, views, backbone, step):
        out = real_forward(self, views, backbone, step)
        if step.global_step >= 5:  # after the first epoch's checkpoint (4 steps per epoch)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="global step 5"):
        run_pretraining(cfg)
    good = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 4


def test_wandb_logger_runs_offline_without_login(make_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    res = run_pretraining(make_cfg([*BASE, "trainer.max_steps=1", "logger=wandb"], tmp_path / "wb"))
    assert res["steps"] == 1
    assert list((tmp_path / "wb").rglob("offline-run-*")), "wandb must write an offline run"


def test_schedule_needs_a_length(make_cfg):
    cfg = make_cfg([*BASE, "trainer.max_epochs=-1", "trainer.max_time=00:00:00:05"])
    with pytest.raises(ValueError, match="set trainer.max_epochs or trainer.max_steps"):
        run_pretraining(cfg)


@pytest.mark.parametrize("clip", [False, True])
def test_lars_trust_clip_reaches_the_optimizer(make_cfg, clip):
    cap = Capture()
    cfg = make_cfg(
        [
            *BASE,
            "trainer.max_steps=1",
            "method.optim.name=lars",
            f"method.optim.trust_clip={clip}",
            "method.optim.trust_coefficient=0.02",
        ]
    )
    run_pretraining(cfg, extra_callbacks=[cap])
    assert cap.groups and all(g["trust_clip"] is clip and g["trust_coefficient"] == 0.02 for g in cap.groups)
