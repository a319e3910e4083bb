"""SwAV: Sinkhorn and swapped prediction against their formulas, prototype normalisation and freeze, the queue,
1 process == 2 processes (gloo), one-step smoke runs (ResNet / ViT × 2 crops / multi-crop) and resume equality."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.losses.swav import sinkhorn_knopp, swapped_prediction
from ssl_vision.objectives import StepInfo, build_objective
from tests.conftest import FAST
from tests.distributed_harness import average_grads, run_on_processes

# The end-to-end helpers (ssl_vision.launch, tests.test_pretrain) are imported inside the tests that use them: the
# gloo tests' worker processes import this module, and Lightning / Hydra would cost them seconds each.


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
    return ([torch.randn(n, 3, large, large, generator=g) for _ in range(2)]
            + [torch.randn(n, 3, small, small, generator=g) for _ in range(num_small)])


# ------------------------------------------------------------------------------------------ formulas (references)
def sinkhorn_by_formula(scores, eps, iters):
    """docs/reference.md §5 on one process, in float64: Q = exp(S/ε)ᵀ; Q /= ΣQ; iters × (rows /= sum, /K; cols /= sum, /B)."""
    q = torch.exp(scores.double() / eps).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def swapped_by_formula(scores, codes, assigned, tau):
    """(1/|A|) Σ_s (1/(V−1)) Σ_{t≠s} (1/N) Σ_b −Σ_k q_{s,b,k} log softmax(x_{t,b}/τ)_k, with Python loops."""
    v_count, n, k_count = scores.shape
    total = 0.0
    for a, s in enumerate(assigned):
        sub = 0.0
        for t in range(v_count):
            if t == s:
                continue
            for b in range(n):
                x = [float(scores[t, b, k]) / tau for k in range(k_count)]
                log_z = math.log(sum(math.exp(v) for v in x))
                sub += -sum(float(codes[a, b, k]) * (x[k] - log_z) for k in range(k_count)) / n
        total += sub / (v_count - 1)
    return total / len(assigned)


def unit_scores(n, k, seed=0):
    """Cosine similarities between random unit embeddings and unit prototypes, as SwAV feeds Sinkhorn."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 6, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 6, generator=g), dim=1)
    return z @ c.t()


# ------------------------------------------------------------------------------------------ pure losses
def test_sinkhorn_matches_formula_and_marginals():
    scores = unit_scores(12, 5)
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert q.dtype == torch.float32 and q.shape == (12, 5)
    torch.testing.assert_close(q.double(), sinkhorn_by_formula(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))               # each sample's code sums to 1
    # each prototype gets B/K samples: approximately after 3 iterations (the last step is the per-sample one),
    # exactly in the limit
    q_many = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(q_many.sum(dim=0), torch.full((5,), 12 / 5), rtol=1e-4, atol=1e-4)  # exact in the limit


def test_sinkhorn_is_float32_and_finite_for_half_input():
    scores = unit_scores(8, 4).half()  # exp(1/0.05) overflows fp16: the function must compute in float32
    q = sinkhorn_knopp(scores, epsilon=0.05)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()


def test_sinkhorn_bad_arguments():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        sinkhorn_knopp(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.randn(3, 4), epsilon=0.0)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_swapped_prediction_matches_formula(tau):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 5, generator=g)                      # V=4 crops, N=3, K=5
    codes = torch.softmax(torch.randn(2, 3, 5, generator=g), -1)    # codes of crops 0 and 1
    got = swapped_prediction(scores, codes, [0, 1], tau)
    assert got.item() == pytest.approx(swapped_by_formula(scores, codes, [0, 1], tau), rel=1e-5)
    # hand-made: 2 crops, K=2, one-hot code for crop 0 on prototype 0, crop 1 predicts with scores (0, 0):
    # −log softmax(0, 0)_0 = ln 2, and crop 1's code predicted from crop 0 scores (1, 0)/τ=1 with code (0, 1):
    # −log(e^0 / (e^1 + e^0)) = ln(1 + e). Mean over the two assigned crops.
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert swapped_prediction(s, q, [0, 1], 1.0).item() == pytest.approx((math.log(2) + math.log(1 + math.e)) / 2)


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
        scores = torch.stack([zv @ c.t() for zv in z])                          # (V, N, K) cosines
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
    assert not torch.allclose(proj[1], proj[0])                          # while the rest trains
    assert (protos[2] - protos[1]).abs().max() > 1e-4                    # trained from step 2 on
    assert (protos[3] - protos[2]).abs().max() > 1e-4


def test_queue_fills_is_used_only_when_full_and_feeds_sinkhorn():
    backbone, obj = make(queue_length=8, queue_start_epoch=1)
    obj.eval()
    batches = [multicrop(n=4, seed=s) for s in range(4)]
    obj(batches[0], backbone, step_at(0, epoch=0))
    assert int(obj.queue_fill) == 0 and obj.queue.abs().sum() == 0      # before queue_start_epoch: untouched
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
        codes = torch.stack([sinkhorn_by_formula(torch.cat([queue_before[s] @ c.t(), scores[s]]), 0.05, 3)[-4:]
                             for s in (0, 1)])
    assert out_c.loss.item() == pytest.approx(swapped_by_formula(scores, codes, [0, 1], 0.1), rel=1e-4)
    torch.testing.assert_close(obj.queue[0, :4], z[0], rtol=1e-5, atol=1e-6)  # and the newest batch went in


def test_queue_length_must_divide_by_global_batch():
    backbone, obj = make(queue_length=6, queue_start_epoch=0)
    with pytest.raises(ValueError, match=r"queue_length=6 must be a multiple of the global batch B = 4"):
        obj(multicrop(n=4), backbone, step_at())


def _rank_fn(rank, world, batches):
    backbone, obj = make(queue_length=8, queue_start_epoch=0)
    # per-process BN vs SyncBN is torch's business (no CPU SyncBN); running stats make the projector identical
    # on every process, so this checks our communication: Sinkhorn's all-reduces, B_global and the queue.
    obj.eval()
    n = batches[0][0].shape[0] // world
    losses = []
    for i, views in enumerate(batches):
        local = [v[rank * n:(rank + 1) * n] for v in views]
        for p in [*backbone.parameters(), *obj.parameters()]:
            p.grad = None
        out = obj(local, backbone, step_at(i))
        out.loss.backward()
        loss = out.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(loss / world)
        in_use = out.logs["queue_in_use"]
    grads = average_grads(backbone)
    grads.update({f"obj.{k}": v for k, v in average_grads(obj).items()})
    # the pure Sinkhorn on this process's half of a score matrix, with the sums all-reduced
    half = SINKHORN_SCORES.shape[0] // world
    codes = sinkhorn_knopp(SINKHORN_SCORES[rank * half:(rank + 1) * half], 0.05, 3, dist.all_reduce_sum,
                           dist.world_size())
    return {"losses": losses, "grads": grads, "in_use": in_use, "codes": codes}


SINKHORN_SCORES = unit_scores(8, 5, seed=3)


def test_two_processes_equal_one_process():
    """(1) Sinkhorn on 2 processes, each with half the rows, equals Sinkhorn on the concatenated batch.
    (2) Same global batch (8 samples, 2 global + 2 local crops) for 3 steps with a queue of 8 rows in use at the
    third: loss and gradients equal on 1 and 2 processes. With local Sinkhorn sums, or a per-rank B, they differ.
    (One spawn for both: starting gloo workers is the slow part of this file.)"""
    full_codes = sinkhorn_knopp(SINKHORN_SCORES, 0.05, 3)
    # the equipartition really is global: Sinkhorn on a half alone gives other codes
    assert not torch.allclose(sinkhorn_knopp(SINKHORN_SCORES[:4], 0.05, 3), full_codes[:4], atol=1e-3)
    batches = [multicrop(n=8, seed=s) for s in range(3)]
    backbone, obj = make(queue_length=8, queue_start_epoch=0)
    obj.eval()
    ref_losses = []
    for i, views in enumerate(batches):
        for p in [*backbone.parameters(), *obj.parameters()]:
            p.grad = None
        out = obj(views, backbone, step_at(i))
        out.loss.backward()
        ref_losses.append(out.loss.detach())
    assert out.logs["queue_in_use"] == 1
    ref = {n: p.grad for n, p in backbone.named_parameters()}
    ref.update({f"obj.{n}": p.grad for n, p in obj.named_parameters() if p.grad is not None})
    results = run_on_processes(_rank_fn, 2, batches)
    torch.testing.assert_close(torch.cat([r["codes"] for r in results]), full_codes, rtol=1e-5, atol=1e-7)
    for r in results:
        assert r["in_use"] == 1
        for got, want in zip(r["losses"], ref_losses):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(ref)
        for name, grad in ref.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ end to end
SMOKE = [
    ("resnet18", ["backbone.width=0.125"], "simclr"),
    ("resnet18", ["backbone.width=0.125"], "swav"),
    ("vit_tiny", ["backbone.patch_size=8"], "simclr"),
    # multi-crop ViT: 16-px local crops (14 px = 0.43·32 is not a multiple of the 8-px patch); dynamic_img_size
    # interpolates the position embeddings for the smaller grid
    ("vit_tiny", ["backbone.patch_size=8", "augment.views.1.size_ratio=0.5"], "swav"),
]


@pytest.mark.parametrize("backbone,extra,augment", SMOKE, ids=[f"{b}-{a}" for b, _, a in SMOKE])
def test_one_step_smoke(make_cfg, backbone, extra, augment):
    from ssl_vision.launch import run_pretraining

    cfg = make_cfg(["method=swav", f"backbone={backbone}", f"augment={augment}", *extra, *FAST,
                    "trainer.max_steps=1"])
    assert len(cfg.augment.views) == (1 if augment == "simclr" else 2)
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["train_loss"] is not None and math.isfinite(res["train_loss"])


def test_resume_equals_uninterrupted(make_cfg, tmp_path):
    """8 steps straight == 4, resume, 4 (multi-crop), with the queue filling (from step 1) and used (from step 3)
    and the prototypes frozen for the first 3 steps: every weight and the queue state match.
    16-px images and no blur only to keep it short (torchvision's blur dominates a CPU step at this size)."""
    from ssl_vision.launch import run_pretraining
    from tests.test_pretrain import StopAfter, _backbone_state

    common = ["method=swav", "backbone=resnet18", "backbone.width=0.125", *FAST, "data.image_size=16",
              "augment.views.0.blur_p=0", "augment.views.1.blur_p=0", "trainer.max_epochs=2",
              "eval.final_eval=false", "checkpoint.save_top_k=-1", "method.kwargs.queue_length=32",
              "method.kwargs.queue_start_epoch=0", "method.kwargs.freeze_prototypes_niters=3"]
    straight = run_pretraining(make_cfg(common, tmp_path / "straight"))
    half = run_pretraining(make_cfg(common, tmp_path / "half"), extra_callbacks=[StopAfter(4)])
    resumed = run_pretraining(make_cfg([*common, f"resume={half['checkpoint']}"], tmp_path / "other"))
    assert straight["steps"] == resumed["steps"] == 8 and half["steps"] == 4
    a, _ = _backbone_state(straight["checkpoint"])
    b, _ = _backbone_state(resumed["checkpoint"])
    assert a.keys() == b.keys() and {"objective.queue", "objective.queue_fill"} <= a.keys()
    assert int(a["objective.queue_fill"]) == 32 and a["objective.queue"].abs().sum() > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
