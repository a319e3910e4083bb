"""ssl_vision.optim against the formulas of docs/reference.md §0.1 / §0.2, written out here independently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_vision.optim import (
    LARS,
    WarmupCosineLR,
    build_optimizer,
    clip_grad_per_param,
    cosine_between,
    linear_scaled_lr,
    momentum_schedule,
    param_groups,
    warmup_cosine,
)


# ---------------------------------------------------------------------------------------------- LARS
def ref_lars(w, g, u, lr, mu, wd, eta, exclude=False):
    """docs/reference.md §0.2 written out: returns (new w, new u)."""
    if exclude:
        gp, r = g, 1.0
    else:
        gp = g + wd * w
        wn, gn = float(torch.sqrt((w * w).sum())), float(torch.sqrt((gp * gp).sum()))
        r = eta * wn / gn if wn > 0 and gn > 0 else 1.0
    u = mu * u + r * gp
    return w - lr * u, u


def test_lars_hand_computed_single_step():
    # ‖w‖ = 5, ‖g‖ = 1, no decay: r = 0.001·5/1 = 0.005, u = r·g, w ← w − 1·u.
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    w.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    LARS([w], lr=1.0, momentum=0.9).step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]], dtype=torch.float64))


def test_lars_two_steps_with_excluded_group():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, dtype=torch.float64))
    lr, mu, wd, eta = 0.5, 0.9, 0.1, 0.02
    opt = LARS(
        [
            {"params": [W], "weight_decay": wd},
            # lars_exclude wins over a non-zero weight decay: plain momentum SGD, no decay.
            {"params": [b], "weight_decay": 0.3, "lars_exclude": True},
        ],
        lr=lr,
        momentum=mu,
        trust_coefficient=eta,
    )
    w_ref, b_ref = W.detach().clone(), b.detach().clone()
    uw, ub = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for _ in range(2):
        gW, gb = torch.randn_like(w_ref), torch.randn_like(b_ref)
        W.grad, b.grad = gW.clone(), gb.clone()
        opt.step()
        w_ref, uw = ref_lars(w_ref, gW, uw, lr, mu, wd, eta)
        b_ref, ub = ref_lars(b_ref, gb, ub, lr, mu, 0.0, eta, exclude=True)
        torch.testing.assert_close(W.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)


def test_lars_excluded_group_matches_torch_sgd():
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(5, dtype=torch.float64))
    c = nn.Parameter(a.detach().clone())
    lars = LARS([{"params": [a], "lars_exclude": True}], lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([c], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        a.grad, c.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), c.detach())


def test_lars_zero_norms_give_trust_ratio_one():
    lr, mu, wd = 0.1, 0.9, 0.5
    # ‖w‖ = 0: r = 1, so the step is lr·g' = lr·g (λ·0 = 0).
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    g = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    w.grad = g.clone()
    LARS([w], lr=lr, momentum=mu, weight_decay=wd).step()
    torch.testing.assert_close(w.detach(), -lr * g)
    # ‖g'‖ = 0 (g = −λw): r = 1 and u = 0, so w does not move and nothing is NaN.
    v = nn.Parameter(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    v.grad = -wd * v.detach().clone()
    LARS([v], lr=lr, momentum=mu, weight_decay=wd).step()
    torch.testing.assert_close(v.detach(), torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def test_lars_nesterov_and_trust_clip():
    torch.manual_seed(2)
    lr, mu, wd, eta = 0.01, 0.9, 0.0, 0.02
    w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    w0 = w.detach().clone()
    g1, g2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    opt = LARS([w], lr=lr, momentum=mu, weight_decay=wd, trust_coefficient=eta, nesterov=True, trust_clip=True)
    ref, u = w0, torch.zeros_like(w0)
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
        r = eta * float(ref.norm()) / float(g.norm())
        scale = min(r / lr, 1.0)  # LARC clip: local lr = min(r, lr)
        d = scale * g
        u = mu * u + d
        ref = ref - lr * (d + mu * u)
        torch.testing.assert_close(w.detach(), ref)


def test_lars_rejects_bad_arguments():
    p = [nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(p, lr=0.1, trust_coefficient=0.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, lr=0.1, momentum=1.5)


# ------------------------------------------------------------------------------------- param groups
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-d, e.g. a logit scale


def test_param_groups_split_and_skip_frozen():
    net = _Net()
    groups = param_groups(net.named_parameters(), weight_decay=0.05, lr_scale=0.5, fixed_lr=True, name="head")
    assert len(groups) == 2
    by_exclude = {g["lars_exclude"]: g for g in groups}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(by_exclude[False]["params"]) == ids([net.conv.weight, net.fc.weight])
    assert ids(by_exclude[True]["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias, net.scale])
    assert by_exclude[False]["weight_decay"] == 0.05 and by_exclude[True]["weight_decay"] == 0.0
    for g in groups:
        assert g["lr_scale"] == 0.5 and g["fixed_lr"] is True and g["name"] == "head"
    all_ids = set().union(*(ids(g["params"]) for g in groups))
    assert not all_ids & ids(net.frozen.parameters())


def test_param_groups_drop_empty_groups():
    only_bias = [("b", nn.Parameter(torch.zeros(3)))]
    groups = param_groups(only_bias, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["lars_exclude"] is True
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert param_groups(frozen.named_parameters(), weight_decay=0.1) == []


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_scales_lr(name, cls):
    net = _Net()
    groups = param_groups(net.fc.named_parameters(), 1e-4) + param_groups(
        net.conv.named_parameters(), 1e-4, lr_scale=0.1
    )
    opt = build_optimizer(name, groups, lr=2.0)
    assert isinstance(opt, cls)
    assert [g["lr"] for g in opt.param_groups] == [2.0, 2.0, 0.2, 0.2]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0, 1e-4, 0.0]
    net.fc.weight.grad = torch.ones_like(net.fc.weight)
    opt.step()  # extra group keys are harmless


def test_build_optimizer_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="sgd.*lars.*adamw"):
        build_optimizer("adam", param_groups(nn.Linear(2, 2).named_parameters(), 0.0), lr=0.1)


# ------------------------------------------------------------------------------------------ schedules
def test_warmup_cosine_values():
    kw = dict(total_steps=110, warmup_steps=10, base=1.0, start=0.1, final=0.01)
    assert warmup_cosine(0, **kw) == 0.1
    assert warmup_cosine(5, **kw) == pytest.approx(0.55)
    assert warmup_cosine(10, **kw) == 1.0
    # cosine midpoint: t = 50 of T = 100 -> final + ½(base − final)(1 + cos(π/2))
    assert warmup_cosine(60, **kw) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi / 2)))
    assert warmup_cosine(35, **kw) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 25 / 100)))
    assert warmup_cosine(110, **kw) == 0.01
    assert warmup_cosine(500, **kw) == 0.01
    assert warmup_cosine(0, 10, 0, base=3.0) == 3.0  # no warmup
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 11, base=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(0, 0, 0, base=1.0)


def test_cosine_between_endpoints_exact():
    for v0, v_end, total in [(0.996, 1.0, 1000), (0.04, 0.4, 37), (0.99, 1.0, 7), (1e-3, 0.0, 3)]:
        assert cosine_between(0, total, v0, v_end) == v0
        assert cosine_between(total, total, v0, v_end) == v_end
        assert cosine_between(total + 5, total, v0, v_end) == v_end
        mid = cosine_between(total // 2, total, v0, v_end)
        assert mid == pytest.approx(v_end + 0.5 * (v0 - v_end) * (1 + math.cos(math.pi * (total // 2) / total)))
    assert momentum_schedule(100, 100, 0.996) == 1.0
    assert momentum_schedule(0, 100, 0.996) == 0.996
    assert momentum_schedule(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5 * (1 + math.cos(math.pi / 2)))


def _two_group_optimizer() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    backbone, predictor = nn.Linear(3, 3), nn.Linear(3, 3)
    groups = param_groups(backbone.named_parameters(), 1e-4, name="backbone")
    groups += param_groups(predictor.named_parameters(), 1e-4, fixed_lr=True, name="predictor")
    return build_optimizer("sgd", groups, lr=0.4)


def test_warmup_cosine_lr_fixed_group_and_curve():
    opt = _two_group_optimizer()
    total, warm = 20, 4
    sched = WarmupCosineLR(opt, total_steps=total, warmup_steps=warm, warmup_start_factor=0.1, final_factor=0.01)
    for step in range(total):
        expected = warmup_cosine(step, total, warm, 0.4, start=0.04, final=0.004)
        for g in opt.param_groups:
            want = 0.4 if g["fixed_lr"] else expected
            assert g["lr"] == pytest.approx(want), (step, g["name"])
        opt.step()
        sched.step()


def test_warmup_cosine_lr_state_dict_round_trip():
    total, warm = 30, 5
    opt = _two_group_optimizer()
    sched = WarmupCosineLR(opt, total, warm)
    for _ in range(7):
        opt.step()
        sched.step()
    opt_sd, sched_sd = opt.state_dict(), sched.state_dict()

    opt2 = _two_group_optimizer()
    sched2 = WarmupCosineLR(opt2, total, warm)  # scheduler first, then load (torch's documented order)
    opt2.load_state_dict(opt_sd)
    sched2.load_state_dict(sched_sd)
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    lrs, lrs2 = [g["lr"] for g in opt.param_groups], [g["lr"] for g in opt2.param_groups]
    assert lrs == lrs2
    assert lrs[0] == pytest.approx(warmup_cosine(8, total, warm, 0.4))
    assert lrs[-1] == 0.4  # fixed predictor


def test_linear_scaled_lr():
    assert linear_scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert linear_scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert linear_scaled_lr(0.3, 512, reference=128) == pytest.approx(1.2)
    assert linear_scaled_lr(0.075, 4096, rule="sqrt") == pytest.approx(4.8)
    assert linear_scaled_lr(0.3, 4096, rule="none") == 0.3
    with pytest.raises(ValueError, match="linear.*sqrt.*none"):
        linear_scaled_lr(0.1, 256, rule="log")
    with pytest.raises(ValueError, match="global_batch"):
        linear_scaled_lr(0.1, 0)


def test_clip_grad_per_param_matches_per_tensor_clip_grad_norm():
    torch.manual_seed(0)
    big, small, none = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(2))
    big.grad = torch.randn(4, 5) * 10
    small.grad = torch.randn(7) * 1e-3
    ref_big, ref_small = big.grad.clone(), small.grad.clone()
    for ref in (ref_big, ref_small):  # torch's global clip applied to one tensor at a time
        holder = nn.Parameter(torch.zeros_like(ref))
        holder.grad = ref
        torch.nn.utils.clip_grad_norm_([holder], max_norm=3.0)
    clip_grad_per_param([big, small, none], max_norm=3.0)
    torch.testing.assert_close(big.grad, ref_big)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(small.grad, ref_small)
    assert none.grad is None
