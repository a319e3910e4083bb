"""SimCLR objective: head layout, loss on known input. (Smoke runs, 1 vs 2 processes, resume equality and the
non-finite guard: tests/objectives/test_contract.py; NT-Xent itself: tests/losses/test_contrastive.py.)"""

import pytest
import torch
from torch import nn

from ssl_vision.objectives import StepInfo, build_objective
from tests.losses.test_contrastive import nt_xent_by_formula

STEP = StepInfo(global_step=0, total_steps=10, epoch=0, max_epochs=1)


def tiny_backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU())


def make(seed=0):
    backbone = tiny_backbone()
    torch.manual_seed(seed)
    obj = build_objective("simclr", 8, temperature=0.2, proj_hidden_dim=16, proj_out_dim=6, proj_layers=3)
    return backbone, obj


def test_projector_layout_matches_simclr_v2():
    _, obj = make()
    linears = [m for m in obj.projector if isinstance(m, nn.Linear)]
    bns = [m for m in obj.projector if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == 3 and len(bns) == 3
    assert all(lin.bias is None for lin in linears)  # BN follows every Linear
    assert not bns[-1].bias.requires_grad  # last BN: scale γ but no shift β (center=False)
    assert bns[-1].weight.requires_grad
    assert not isinstance(obj.projector[-1], nn.ReLU)
    assert abs(linears[0].weight.std().item() - 0.01) < 0.003  # N(0, 0.01) init


def test_loss_equals_formula_on_projected_views():
    backbone, obj = make()
    obj.eval()  # BN with running stats: the projection is a fixed per-sample function we can recompute
    x_a, x_b = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    out = obj([x_a, x_b], backbone, STEP)
    with torch.no_grad():
        z_a, z_b = obj.projector(backbone(x_a)), obj.projector(backbone(x_b))
    assert out.loss.item() == pytest.approx(nt_xent_by_formula(z_a, z_b, 0.2), rel=1e-5)
    assert out.features.shape == (4, 8) and out.embedding.shape == (4, 6)


def test_needs_two_views():
    backbone, obj = make()
    with pytest.raises(ValueError, match="2 views"):
        obj([torch.randn(4, 3, 4, 4)], backbone, STEP)
