"""Multi-crop as an option for SimCLR, BYOL and MoCo v3 (solo-learn's formulations): the objectives' losses against
formulas written out here, the target/keys only on global crops, and a one-step run of each method with
``augment=multicrop``. (1 vs 2 processes with multi-crop, SimCLR's gathered positives included:
tests/objectives/test_contract.py; the multi-positive loss: tests/losses/test_contrastive.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.objectives import StepInfo, build_objective
from tests.conftest import FAST
from tests.losses.test_contrastive import multi_positive_by_formula

STEP = StepInfo(global_step=0, total_steps=10, epoch=0, max_epochs=1)
HEADS = {
    "simclr": dict(temperature=0.2, proj_hidden_dim=16, proj_out_dim=6),
    "byol": dict(proj_hidden_dim=16, proj_out_dim=6, pred_hidden_dim=16),
    "moco_v3": dict(temperature=0.2, proj_hidden_dim=16, proj_out_dim=6, pred_hidden_dim=16),
}


def tiny_backbone():
    torch.manual_seed(0)  # pooling first: accepts every crop size
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 8), nn.ReLU())


def make(method, seed=0):
    backbone = tiny_backbone()
    torch.manual_seed(seed)
    obj = build_objective(method, 8, **HEADS[method])
    obj.bind(backbone)
    return backbone, obj


def crops(n=4, n_global=2, n_local=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=g) for _ in range(n_global)] + [
        torch.randn(n, 3, 4, 4, generator=g) for _ in range(n_local)
    ]


def test_simclr_multicrop_loss_equals_formula():
    backbone, obj = make("simclr")
    obj.eval()  # BN with running stats: per-sample projections we can recompute crop by crop
    views = crops()
    out = obj(views, backbone, STEP)
    with torch.no_grad():
        z = torch.stack([obj.projector(backbone(x)) for x in views])
    assert out.loss.item() == pytest.approx(multi_positive_by_formula(z, 0.2), rel=1e-5)


def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape[-2:])))
    return calls


def test_byol_multicrop_target_on_global_crops_and_loss_over_other_crops():
    backbone, obj = make("byol")
    obj.eval()
    views = crops()
    target_calls = _count_calls(obj.target_backbone)
    out = obj(views, backbone, STEP)
    assert target_calls == [(8, 8), (8, 8)]  # the target sees the 2 global crops only
    with torch.no_grad():
        p = [obj.predictor(obj.projector(backbone(x))) for x in views]
        t = [obj.target_projector(obj.target_backbone(x)) for x in views[:2]]
    expected = sum(
        (2 - 2 * F.cosine_similarity(p[v], t[g], dim=1)).mean().item() for g in range(2) for v in range(5) if v != g
    )  # 2 × 4 = 8 pairs
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_moco_v3_multicrop_keys_from_global_crops_and_loss_over_other_crops():
    backbone, obj = make("moco_v3")
    obj.eval()
    views = crops()
    key_calls = _count_calls(obj.momentum_backbone)
    out = obj(views, backbone, STEP)
    assert key_calls == [(8, 8), (8, 8)]
    tau = 0.2
    with torch.no_grad():
        q = [F.normalize(obj.predictor(obj.projector(backbone(x))), dim=1) for x in views]
        k = [F.normalize(obj.momentum_projector(obj.momentum_backbone(x)), dim=1) for x in views[:2]]
    expected = 0.0
    for g in range(2):
        for v in range(5):
            if v != g:
                logits = q[v] @ k[g].T / tau
                expected += 2 * tau * -(logits.diag() - logits.logsumexp(dim=1)).mean().item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method,backbone", [("simclr", "resnet18"), ("byol", "resnet18"), ("moco_v3", "vit_tiny")])
def test_one_step_with_multicrop_preset(make_cfg, method, backbone):
    from ssl_vision.launch import run_pretraining

    extra = ["backbone.width=0.125"] if backbone == "resnet18" else ["backbone.patch_size=8"]
    cfg = make_cfg(
        [f"method={method}", f"backbone={backbone}", *extra, "augment=multicrop", *FAST, "trainer.max_steps=1"]
    )
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and math.isfinite(res["train_loss"])
