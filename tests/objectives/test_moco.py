"""MoCo v1/v2/v3: the objectives' losses vs formulas, queue arithmetic, momentum encoder, shuffle-BN (also over 2
processes, in train mode), ViT stabilisers, the experiment configs. (Smoke runs, 1 vs 2 processes, resume equality and
the non-finite guard: tests/objectives/test_contract.py; the loss functions: tests/losses/test_infonce.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.backbones import create_backbone
from ssl_vision.nn.memory import KeyQueue
from ssl_vision.nn.vit import sincos_2d_pos_embed
from ssl_vision.objectives import StepInfo, build_objective
from tests.distributed_harness import average_grads, run_on_processes
from tests.losses.test_infonce import ctr_by_formula, info_nce_by_formula


def step(t: int = 0, total: int = 10) -> StepInfo:
    return StepInfo(global_step=t, total_steps=total, epoch=0, max_epochs=1)


def conv_backbone(seed: int = 0) -> nn.Module:
    """Tiny CNN *with* BatchNorm, so shuffle-BN and BN-buffer handling are visible. (N, 3, 4, 4) -> (N, 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def moco(name="moco_v2", seed=0, backbone=None, **kw):
    backbone = backbone or conv_backbone()
    torch.manual_seed(seed)
    args = (
        dict(embed_dim=5, proj_hidden_dim=7, queue_size=32, shuffle_bn_splits=2)
        if name != "moco_v3"
        else dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9, temperature=0.2)
    )
    args.update(kw)
    obj = build_objective(name, 6, **args)
    obj.bind(backbone)
    return backbone, obj


# ------------------------------------------------------------------------------------------------------ queue
def test_queue_init_and_enqueue_arithmetic():
    torch.manual_seed(0)
    qu = KeyQueue(dim=3, size=8)
    torch.testing.assert_close(qu.queue.norm(dim=0), torch.ones(8))  # normalised random columns
    assert int(qu.ptr) == 0
    a, b, c = (F.normalize(torch.randn(4, 3), dim=1) for _ in range(3))
    qu.enqueue(a)
    torch.testing.assert_close(qu.queue[:, 0:4], a.T)  # the newest keys sit where the pointer was
    assert int(qu.ptr) == 4
    qu.enqueue(b)
    torch.testing.assert_close(qu.queue[:, 4:8], b.T)
    assert int(qu.ptr) == 0  # wrapped around
    qu.enqueue(c)
    torch.testing.assert_close(qu.queue[:, 0:4], c.T)  # the oldest batch is overwritten
    torch.testing.assert_close(qu.queue[:, 4:8], b.T)
    assert int(qu.ptr) == 4


def test_queue_negatives_are_a_copy():
    qu = KeyQueue(dim=3, size=4)
    neg = qu.negatives()
    before = neg.clone()
    qu.enqueue(torch.ones(4, 3))
    torch.testing.assert_close(neg, before)  # the in-place write does not reach tensors already used in logits


def test_queue_size_not_multiple_of_batch_is_clear_error():
    qu = KeyQueue(dim=3, size=10)
    with pytest.raises(ValueError, match=r"K=10 .*global batch B=4.*queue_size.*\(e\.g\. 8 or 12\)"):
        qu.enqueue(torch.randn(4, 3))
    backbone, obj = moco(queue_size=20)  # through the objective: per-process batch 8 does not divide 20
    with pytest.raises(ValueError, match="K=20"):
        obj([torch.randn(8, 3, 4, 4)] * 2, backbone, step())


# ------------------------------------------------------------------------------------------------------ MoCo v1/v2
def test_heads_v1_linear_v2_mlp_without_bn():
    _, v1 = moco("moco_v1", head="linear")
    _, v2 = moco("moco_v2", head="mlp")
    assert isinstance(v1.head, nn.Linear) and v1.head.bias is not None and v1.head.out_features == 5
    layers = [type(m) for m in v2.head]
    assert layers == [nn.Linear, nn.ReLU, nn.Linear]  # Linear(D, 2048) -> ReLU -> Linear(2048, 128)
    assert v2.head[0].out_features == 7 and v2.head[2].out_features == 5


def test_moco_loss_equals_formula_and_keys_are_enqueued():
    # A backbone without BN: the keys do not depend on the BN grouping, so we can recompute them by hand.
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.ReLU())
    _, obj = moco("moco_v1", backbone=backbone, head="linear", temperature=0.07)
    g = torch.Generator().manual_seed(2)
    x_q, x_k = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    queue_before = obj.queue.queue.clone()
    out = obj([x_q, x_k], backbone, step())
    with torch.no_grad():
        q = obj.head(backbone(x_q))
        k = F.normalize(obj.key_head(obj.key_backbone(x_k)), dim=1)
    assert out.loss.item() == pytest.approx(info_nce_by_formula(q, k, queue_before, 0.07), rel=1e-5)
    torch.testing.assert_close(obj.queue.queue[:, :8], k.T, rtol=1e-5, atol=1e-6)  # written after the logits
    torch.testing.assert_close(obj.queue.queue[:, 8:], queue_before[:, 8:])
    assert int(obj.queue.ptr) == 8
    assert out.features.shape == (8, 6) and out.embedding.shape == (8, 5)


def test_symmetric_loss_enqueues_both_views():
    backbone, obj = moco(symmetric=True)
    obj([torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)], backbone, step())
    assert int(obj.queue.ptr) == 16


def _keys_by_hand(obj, x, groups):
    """Reference: the key encoder run separately on each BN group (a list of sample-index tensors), train mode."""
    kb, kh = copy.deepcopy(obj.key_backbone), copy.deepcopy(obj.key_head)
    out = torch.empty(x.shape[0], 5)
    with torch.no_grad():
        for idx in groups:
            out[idx] = F.normalize(kh(kb(x[idx])), dim=1)
    return out


def test_shuffle_bn_groups_are_shuffled_sub_batches():
    """What shuffle-BN must do, checked on one process with 4 BN groups of 4 over a batch of 16.

    With shuffling, the key of sample i equals the key encoder run (train-mode BN) on exactly the sub-batch the
    permutation assigned i to, and not on the contiguous chunk i sits in: so i's key is normalised with statistics of
    a batch whose composition differs from its query's (the whole local batch, unshuffled) and from its neighbours'.
    Without shuffling it equals BN over the original contiguous chunk. The permutation is a function of the step
    (same step -> same permutation: resumes reproduce it; next step -> a new one).
    """
    backbone, obj = moco(shuffle_bn_splits=4)
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    contiguous = list(torch.arange(16).view(4, 4))
    k, k_all, perm = obj.keys(x, step(5))
    assert sorted(perm.tolist()) == list(range(16))
    shuffled_groups = list(perm.view(4, 4))
    assert {frozenset(g.tolist()) for g in shuffled_groups} != {frozenset(g.tolist()) for g in contiguous}
    torch.testing.assert_close(k, _keys_by_hand(obj, x, shuffled_groups), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_all, k)  # one process: the global batch is local
    assert not torch.allclose(k, _keys_by_hand(obj, x, contiguous), atol=1e-4)  # the grouping is visible in the keys
    assert torch.equal(obj.keys(x, step(5))[2], perm) and not torch.equal(obj.keys(x, step(6))[2], perm)

    backbone, plain = moco(shuffle_bn_splits=4, shuffle_bn=False)
    k_plain, _, no_perm = plain.keys(x, step(5))
    assert no_perm is None
    torch.testing.assert_close(k_plain, _keys_by_hand(plain, x, contiguous), rtol=1e-5, atol=1e-6)


def test_shuffle_bn_split_must_divide_batch():
    backbone, obj = moco(shuffle_bn_splits=3)
    with pytest.raises(ValueError, match="batch of 8 cannot be cut into 3"):
        obj([torch.randn(8, 3, 4, 4)] * 2, backbone, step())


def test_v1_v2_key_encoder_ema_once_per_step_parameters_only():
    backbone, obj = moco("moco_v1", momentum=0.9)
    obj.eval()  # the key encoder's BN keeps its running statistics: only the EMA could change them
    x = [torch.randn(8, 3, 4, 4)] * 2
    key_before = {n: p.clone() for n, p in obj.key_backbone.named_parameters()}
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)  # "an optimizer step"
        backbone[1].running_mean.fill_(5.0)
    out = obj(x, backbone, step(1))
    assert out.logs["ema_momentum"].item() == pytest.approx(0.9)
    online = dict(backbone.named_parameters())
    for n, p in obj.key_backbone.named_parameters():
        torch.testing.assert_close(p, 0.9 * key_before[n] + 0.1 * online[n])
    assert torch.all(obj.key_backbone[1].running_mean == 0)  # BN buffers are not averaged
    after_first = {n: p.clone() for n, p in obj.key_backbone.named_parameters()}
    obj(x, backbone, step(1))  # another micro-batch of the same step
    for n, p in obj.key_backbone.named_parameters():
        torch.testing.assert_close(p, after_first[n])


# ------------------------------------------------------------------------------------------------------ MoCo v3
def test_v3_heads_follow_the_paper_bn_layout():
    _, obj = moco("moco_v3")
    proj, pred = list(obj.projector), list(obj.predictor)
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert all(m.bias is None for m in proj + pred if isinstance(m, nn.Linear))
    assert not proj[-1].affine  # last BN without affine
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # ResNet: no last BN
    _, vit_like = moco("moco_v3", proj_layers=3, pred_last_bn=True)
    assert len([m for m in vit_like.projector if isinstance(m, nn.Linear)]) == 3
    assert isinstance(vit_like.predictor[-1], nn.BatchNorm1d) and not vit_like.predictor[-1].affine


def test_v3_loss_equals_formula():
    backbone, obj = moco("moco_v3")
    backbone.eval(), obj.eval()  # BN with running stats: every branch is a fixed per-sample function
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    out = obj([x1, x2], backbone, step())
    with torch.no_grad():
        q1, q2 = (obj.predictor(obj.projector(backbone(x))) for x in (x1, x2))
        k1, k2 = (obj.momentum_projector(obj.momentum_backbone(x)) for x in (x1, x2))
    expected = ctr_by_formula(q1, k2, 0.2, 0) + ctr_by_formula(q2, k1, 0.2, 0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_v3_momentum_encoder_is_backbone_plus_projector_not_predictor():
    backbone, obj = moco("moco_v3")
    frozen = {n for n, p in obj.named_parameters() if not p.requires_grad}
    assert frozen == {f"momentum_backbone.{n}" for n, _ in backbone.named_parameters()} | {
        f"momentum_projector.{n}" for n, _ in obj.projector.named_parameters()
    }
    assert not any(n.startswith("momentum_predictor") for n, _ in obj.named_modules())
    in_optimizer = {id(p) for g in obj.parameter_groups(1e-6) for p in g["params"]}
    assert in_optimizer == {id(p) for p in [*obj.projector.parameters(), *obj.predictor.parameters()]}


def test_v3_momentum_schedule_from_m0_to_exactly_one_through_the_objective():
    """m_t = 1 − (1 − m0)·½(1 + cos(π t/(T−1))) at the start of step t: m0 first, exactly 1.0 at the last step T−1.
    The update is an EMA of parameters; BN buffers of the momentum encoder stay its own."""
    total, m0 = 5, 0.9
    backbone, obj = moco("moco_v3", momentum=m0)
    obj.eval()
    x = [torch.randn(4, 3, 4, 4)] * 2
    assert obj(x, backbone, step(0, total)).logs["ema_momentum"].item() == m0
    for t in range(1, total):
        before = {n: p.clone() for n, p in obj.momentum_projector.named_parameters()}
        with torch.no_grad():
            for p in obj.projector.parameters():
                p.add_(0.5)  # "an optimizer step"
            backbone[1].running_var.fill_(7.0)
        m = obj(x, backbone, step(t, total)).logs["ema_momentum"].item()
        expected = 1 - (1 - m0) * 0.5 * (1 + math.cos(math.pi * t / (total - 1)))
        assert m == pytest.approx(expected, abs=1e-12)
        online = dict(obj.projector.named_parameters())
        for n, p in obj.momentum_projector.named_parameters():
            torch.testing.assert_close(p, m * before[n] + (1 - m) * online[n])
    assert m == 1.0  # exactly, at the last optimizer step
    assert torch.all(obj.momentum_backbone[1].running_var == 1.0)  # never averaged with the online 7.0


def sincos_by_formula(h, w, dim):
    """MAE's get_2d_sincos_pos_embed written out: [sin(x ω), cos(x ω), sin(y ω), cos(y ω)], ω_k = 10000^(−k/(dim/4))."""
    out = torch.zeros(1 + h * w, dim, dtype=torch.float64)  # row 0: the cls slot, zeros
    quarter = dim // 4
    for row in range(h):
        for col in range(w):
            for k in range(quarter):
                om = 1.0 / 10000 ** (k / quarter)
                tok = 1 + row * w + col
                out[tok, k], out[tok, quarter + k] = math.sin(col * om), math.cos(col * om)
                out[tok, 2 * quarter + k], out[tok, 3 * quarter + k] = math.sin(row * om), math.cos(row * om)
    return out.float()


def test_sincos_pos_embed_formula():
    torch.testing.assert_close(sincos_2d_pos_embed(2, 3, 8, num_prefix_tokens=1), sincos_by_formula(2, 3, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(2, 2, 6)


def test_v3_vit_stabilisers_in_bind():
    vit, dim = create_backbone("vit_tiny", image_size=32, patch_size=8)
    _, obj = moco("moco_v3", backbone=vit)
    torch.testing.assert_close(vit.pos_embed[0], sincos_by_formula(4, 4, dim))
    proj = vit.patch_embed.proj
    assert not vit.pos_embed.requires_grad and not proj.weight.requires_grad and not proj.bias.requires_grad
    bound = math.sqrt(6 / (3 * 8 * 8 + dim))  # xavier of the (C·p·p -> D) projection
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    assert torch.all(proj.bias == 0) and vit.cls_token.abs().max() < 1e-4
    qkv = vit.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (2 * dim))  # Q, K, V each as a (D -> D) matrix
    torch.testing.assert_close(obj.momentum_backbone.pos_embed, vit.pos_embed)  # copied after the changes
    from ssl_vision.optim import param_groups

    optimised = {id(p) for g in param_groups(vit.named_parameters(), 0.1) for p in g["params"]}
    assert id(vit.pos_embed) not in optimised and id(proj.weight) not in optimised


# ----------------------------------------------------------------------------------------------- 1 vs 2 processes
def _rank_fn(rank, world, x1, x2):
    """Each process takes its slice of the global batch. v3: all BN in eval mode (per-process BN vs SyncBN is
    torch's business; this checks our key gather, label offset and loss). v2: the *query* backbone in eval mode for
    the same reason, but the key encoder in train mode: its BN groups come from the cross-process shuffle, which must
    give the same keys as one process cutting the same shuffled batch into 2 BN groups."""
    n = x1.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    res = {}
    for name in ("moco_v2",):
        backbone, obj = moco(name)
        backbone.eval()
        obj.eval() if name == "moco_v3" else obj.train()
        out = obj([x1[sl], x2[sl]], backbone, step())
        out.loss.backward()
        loss = out.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        grads = average_grads(backbone)
        grads.update({f"obj.{k}": v for k, v in average_grads(obj).items()})
        queue = obj.queue.queue.clone() if name != "moco_v3" else None
        res[name] = {"loss": loss / world, "grads": grads, "queue": queue}
    return res


def test_two_processes_equal_one_process():
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    expected = {}
    for name in ("moco_v2",):
        backbone, obj = moco(name)
        backbone.eval()
        obj.eval() if name == "moco_v3" else obj.train()
        if name == "moco_v2":  # anchor the reference itself: keys = key encoder on the 2 shuffled BN groups of 4
            perm = copy.deepcopy(obj).keys(x2, step())[2]
            keys_by_hand = _keys_by_hand(obj, x2, list(perm.view(2, 4)))
        out = obj([x1, x2], backbone, step())
        out.loss.backward()
        if name == "moco_v2":
            torch.testing.assert_close(obj.queue.queue[:, :8].T, keys_by_hand, rtol=1e-5, atol=1e-6)
        grads = {n: p.grad for n, p in backbone.named_parameters()}
        grads.update({f"obj.{n}": p.grad for n, p in obj.named_parameters() if p.grad is not None})
        expected[name] = {
            "loss": out.loss.detach(),
            "grads": grads,
            "queue": obj.queue.queue.clone() if name != "moco_v3" else None,
        }
    results = run_on_processes(_rank_fn, 2, x1, x2)
    for name, exp in expected.items():
        for r in results:
            got = r[name]
            torch.testing.assert_close(got["loss"], exp["loss"], rtol=1e-5, atol=1e-6, msg=name)
            assert set(got["grads"]) == set(exp["grads"])
            for pname, grad in exp["grads"].items():
                torch.testing.assert_close(got["grads"][pname], grad, rtol=1e-4, atol=1e-6, msg=f"{name} {pname}")
    # every process holds the identical queue after the step, and it is the one-process queue
    torch.testing.assert_close(results[0]["moco_v2"]["queue"], results[1]["moco_v2"]["queue"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["moco_v2"]["queue"], expected["moco_v2"]["queue"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "experiment", [f"{d}_moco_v{v}" for d in ("fmnist", "cifar") for v in (1, 2, 3)] + ["moco_v3_vit"]
)
def test_experiment_configs_compose(make_cfg, experiment):
    cfg = make_cfg([f"experiment={experiment}"])
    assert cfg.method.name.startswith("moco_v")
    assert cfg.augment.name in ("moco_v1", "moco_v2", "moco_v3")
