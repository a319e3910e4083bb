"""SwAV: the objective's loss against the formulas (multi-crop, 2 crops, with the queue in Sinkhorn), prototype
normalisation and freeze, the queue. (Smoke runs, 1 vs 2 processes -- Sinkhorn over the global batch and queue --,
resume equality and the non-finite guard: tests/objectives/test_contract.py; Sinkhorn and the swapped prediction:
tests/losses/test_swav.py.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.objectives import StepInfo, build_objective
from tests.losses.test_swav import sinkhorn_by_formula, swapped_by_formula


def step_at(global_step=0, epoch=0):
    return StepInfo(global_step=global_step, total_steps=100, epoch=epoch, max_epochs=10)


def tiny_backbone():
    """Conv → global pool: accepts any crop size (multi-crop), no BN (so it is the same function on any process)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make(seed=0, **kw):
    backbone = tiny_backbone()
    torch.manual_seed(seed)
    args = dict(num_prototypes=5, proj_hidden_dim=16, proj_out_dim=4, freeze_prototypes_niters=0)
    args.update(kw)
    return backbone, build_objective("swav", 8, **args)


def multicrop(n=4, seed=1, large=8, small=4, num_small=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, large, large, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, small, small, generator=g) for _ in range(num_small)
    ]


# ------------------------------------------------------------------------------------------ the objective
def test_head_layout():
    _, obj = make()
    kinds = [type(m) for m in obj.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert obj.projector[0].in_features == 8 and obj.projector[-1].out_features == 4
    assert obj.prototypes.bias is None and obj.prototypes.weight.shape == (5, 4)
    assert obj.num_views is None  # multi-crop: the module hands over every view


def test_fewer_prototypes_than_dimensions_warns():
    with pytest.warns(UserWarning, match="fewer prototypes"):
        build_objective("swav", 8, num_prototypes=4, proj_hidden_dim=16, proj_out_dim=6)


def test_loss_equals_formula_on_multicrop_and_prototypes_are_normalised():
    backbone, obj = make(temperature=0.2)
    obj.eval()  # BN with running stats: each crop's projection is a fixed per-sample function we can recompute
    with torch.no_grad():
        obj.prototypes.weight.mul_(3.0)  # not unit: the forward must normalise them first
    views = multicrop()
    out = obj(views, backbone, step_at())
    c = obj.prototypes.weight.detach()
    torch.testing.assert_close(c.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        z = [F.normalize(obj.projector(backbone(v)), dim=1) for v in views]
        scores = torch.stack([zv @ c.t() for zv in z])  # (V, N, K) cosines
        codes = torch.stack([sinkhorn_by_formula(scores[s], 0.05, 3) for s in (0, 1)])  # global crops only
    assert out.loss.item() == pytest.approx(swapped_by_formula(scores, codes, [0, 1], 0.2), rel=1e-4)
    assert out.features.shape == (4, 8) and out.embedding.shape == (4, 4)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(4))


def test_two_crops_and_bad_view_counts():
    backbone, obj = make()
    out = obj(multicrop(num_small=0), backbone, step_at())  # augment=simclr: 2 crops, each predicts the other
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="augment=swav"):
        obj(multicrop(num_small=0)[:1], backbone, step_at())


def test_prototypes_frozen_then_trained():
    backbone, obj = make(freeze_prototypes_niters=2)
    opt = torch.optim.SGD([*backbone.parameters(), *obj.parameters()], lr=0.5)
    views = multicrop(n=8)
    protos, proj = [], []
    for i in range(4):
        out = obj(views, backbone, step_at(i))
        opt.zero_grad()
        out.loss.backward()
        assert obj.prototypes.weight.grad is not None
        obj.before_optimizer_step(step_at(i))
        assert (obj.prototypes.weight.grad is None) == (i < 2)
        opt.step()
        protos.append(obj.prototypes.weight.detach().clone())
        proj.append(obj.projector[0].weight.detach().clone())
    torch.testing.assert_close(protos[1], protos[0], rtol=0, atol=1e-6)  # frozen (re-normalising is idempotent)
    assert not torch.allclose(proj[1], proj[0])  # while the rest trains
    assert (protos[2] - protos[1]).abs().max() > 1e-4  # trained from step 2 on
    assert (protos[3] - protos[2]).abs().max() > 1e-4


def test_queue_fills_is_used_only_when_full_and_feeds_sinkhorn():
    backbone, obj = make(queue_length=8, queue_start_epoch=1)
    obj.eval()
    batches = [multicrop(n=4, seed=s) for s in range(4)]
    obj(batches[0], backbone, step_at(0, epoch=0))
    assert int(obj.queue_fill) == 0 and obj.queue.abs().sum() == 0  # before queue_start_epoch: untouched
    out_a = obj(batches[1], backbone, step_at(1, epoch=1))
    out_b = obj(batches[2], backbone, step_at(2, epoch=1))
    assert out_a.logs["queue_in_use"] == 0 and out_b.logs["queue_in_use"] == 0  # not full before batch 2's write
    assert int(obj.queue_fill) == 8
    c = obj.prototypes.weight.detach()
    with torch.no_grad():
        emb = {s: [F.normalize(obj.projector(backbone(v)), dim=1) for v in batches[s][:2]] for s in (1, 2, 3)}
    for crop in (0, 1):  # newest first: batch 2 then batch 1
        torch.testing.assert_close(obj.queue[crop], torch.cat([emb[2][crop], emb[1][crop]]), rtol=1e-5, atol=1e-6)
    queue_before = obj.queue.clone()
    out_c = obj(batches[3], backbone, step_at(3, epoch=1))
    assert out_c.logs["queue_in_use"] == 1
    with torch.no_grad():
        z = [F.normalize(obj.projector(backbone(v)), dim=1) for v in batches[3]]
        scores = torch.stack([zv @ c.t() for zv in z])
        # codes from Sinkhorn over [queue rows scored with the current prototypes; batch], keeping the batch rows
        codes = torch.stack(
            [sinkhorn_by_formula(torch.cat([queue_before[s] @ c.t(), scores[s]]), 0.05, 3)[-4:] for s in (0, 1)]
        )
    assert out_c.loss.item() == pytest.approx(swapped_by_formula(scores, codes, [0, 1], 0.1), rel=1e-4)
    torch.testing.assert_close(obj.queue[0, :4], z[0], rtol=1e-5, atol=1e-6)  # and the newest batch went in


def test_queue_length_must_divide_by_global_batch():
    backbone, obj = make(queue_length=6, queue_start_epoch=0)
    with pytest.raises(ValueError, match=r"queue_length=6 must be a multiple of the global batch B = 4"):
        obj(multicrop(n=4), backbone, step_at())
