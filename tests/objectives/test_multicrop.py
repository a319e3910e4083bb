"""Multi-crop as an option for SimCLR, BYOL and MoCo v3 (solo-learn's formulations): losses against formulas
written out here, the target/keys only on global crops, 1 process == 2 processes (SimCLR's gathered positives),
and a one-step run of each method with ``augment=multicrop``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.losses import multi_positive_nt_xent, nt_xent
from ssl_vision.objectives import StepInfo, build_objective
from tests.conftest import FAST
from tests.distributed_harness import average_grads, run_on_processes

STEP = StepInfo(global_step=0, total_steps=10, epoch=0, max_epochs=1)
HEADS = {"simclr": dict(temperature=0.2, proj_hidden_dim=16, proj_out_dim=6),
         "byol": dict(proj_hidden_dim=16, proj_out_dim=6, pred_hidden_dim=16),
         "moco_v3": dict(temperature=0.2, proj_hidden_dim=16, proj_out_dim=6, pred_hidden_dim=16)}


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
    return ([torch.randn(n, 3, 8, 8, generator=g) for _ in range(n_global)]
            + [torch.randn(n, 3, 4, 4, generator=g) for _ in range(n_local)])


def multi_positive_by_formula(z: torch.Tensor, tau: float) -> float:
    """−log(Σ_pos exp(s/τ) / Σ_{all but self} exp(s/τ)), one anchor at a time, mean over anchors. z: (V, N, D)."""
    v_count, n, _ = z.shape
    z = F.normalize(z.double(), dim=-1)
    total = 0.0
    for v in range(v_count):
        for i in range(n):
            pos = sum(math.exp(float(z[v, i] @ z[w, i]) / tau) for w in range(v_count) if w != v)
            den = sum(math.exp(float(z[v, i] @ z[w, j]) / tau)
                      for w in range(v_count) for j in range(n) if (w, j) != (v, i))
            total += -math.log(pos / den)
    return total / (v_count * n)


@pytest.mark.parametrize("views", [2, 3, 5])
def test_multi_positive_nt_xent_matches_formula(views):
    z = torch.randn(views, 6, 5, generator=torch.Generator().manual_seed(views))
    assert multi_positive_nt_xent(z, 0.3).item() == pytest.approx(multi_positive_by_formula(z, 0.3), rel=1e-5)


def test_multi_positive_with_two_views_is_nt_xent_and_rank_offset_selects_the_local_rows():
    z_all = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0))   # (V, B, D), B = 2 ranks × 4
    assert multi_positive_nt_xent(z_all, 0.2).item() == pytest.approx(nt_xent(z_all[0], z_all[1], 0.2).item(),
                                                                      rel=1e-5)
    # rank 1's anchors are samples 4..7 of the gathered batch; its loss is nt_xent's with the same offset
    local = z_all[:, 4:]
    assert multi_positive_nt_xent(local, 0.2, z_all, offset=4).item() == pytest.approx(
        nt_xent(local[0], local[1], 0.2, z_all[0], z_all[1], offset=4).item(), rel=1e-5)


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
    assert target_calls == [(8, 8), (8, 8)]                    # the target sees the 2 global crops only
    with torch.no_grad():
        p = [obj.predictor(obj.projector(backbone(x))) for x in views]
        t = [obj.target_projector(obj.target_backbone(x)) for x in views[:2]]
    expected = sum((2 - 2 * F.cosine_similarity(p[v], t[g], dim=1)).mean().item()
                   for g in range(2) for v in range(5) if v != g)   # 2 × 4 = 8 pairs
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


def _simclr_rank_fn(rank, world, views):
    backbone, obj = make("simclr")
    obj.eval()
    n = views[0].shape[0] // world
    out = obj([x[rank * n:(rank + 1) * n] for x in views], backbone, STEP)
    out.loss.backward()
    loss = out.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    grads = average_grads(backbone)
    grads.update({f"proj.{k}": v for k, v in average_grads(obj).items()})
    return {"loss": loss / world, "grads": grads}


def test_simclr_multicrop_two_processes_equal_one_process():
    views = crops(n=8)
    backbone, obj = make("simclr")
    obj.eval()
    out = obj(views, backbone, STEP)
    out.loss.backward()
    ref = {n: p.grad for n, p in backbone.named_parameters()}
    ref.update({f"proj.{n}": p.grad for n, p in obj.named_parameters() if p.grad is not None})
    for r in run_on_processes(_simclr_rank_fn, 2, views):
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(ref)
        for name, grad in ref.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,backbone", [("simclr", "resnet18"), ("byol", "resnet18"), ("moco_v3", "vit_tiny")])
def test_one_step_with_multicrop_preset(make_cfg, method, backbone):
    from ssl_vision.launch import run_pretraining

    extra = ["backbone.width=0.125"] if backbone == "resnet18" else ["backbone.patch_size=8"]
    cfg = make_cfg([f"method={method}", f"backbone={backbone}", *extra, "augment=multicrop", *FAST,
                    "trainer.max_steps=1"])
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and math.isfinite(res["train_loss"])
