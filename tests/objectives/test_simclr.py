"""SimCLR objective: head layout, loss on known input, and 1 process == 2 processes (gloo)."""

import pytest
import torch
from torch import nn

from ssl_vision.objectives import StepInfo, build_objective
from tests.distributed_harness import average_grads, run_on_processes
from tests.test_losses import nt_xent_by_formula

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
    assert all(lin.bias is None for lin in linears)          # BN follows every Linear
    assert not bns[-1].bias.requires_grad                    # last BN: scale γ but no shift β (center=False)
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


def _rank_fn(rank, world, x_a, x_b):
    backbone, obj = make()
    obj.eval()  # per-process BN is torch's business (SyncBN on GPU); this checks our gather and loss plumbing
    n = x_a.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    out = obj([x_a[sl], x_b[sl]], backbone, STEP)
    out.loss.backward()
    loss = out.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    grads = average_grads(backbone)
    grads.update({f"proj.{k}": v for k, v in average_grads(obj).items()})
    return {"loss": loss / world, "grads": grads}


def test_two_processes_equal_one_process():
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    backbone, obj = make()
    obj.eval()
    out = obj([x_a, x_b], backbone, STEP)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in backbone.named_parameters()}
    ref_grads.update({f"proj.{n}": p.grad for n, p in obj.named_parameters() if p.grad is not None})
    results = run_on_processes(_rank_fn, 2, x_a, x_b)
    for r in results:
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(ref_grads)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
