"""DINO: the objective's loss and centre update against the formula, teacher-temperature warm-up, head layout,
teacher (no gradient, no drop path, global crops only, EMA to exactly 1.0), last-layer freeze, per-parameter
clipping, ViT small crops. (Smoke runs, 1 vs 2 processes -- the centre is the global mean --, resume equality and the
non-finite guard: tests/objectives/test_contract.py; the loss function: tests/losses/test_dino.py.)"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.backbones import create_backbone
from ssl_vision.losses.dino import teacher_temperature
from ssl_vision.objectives import StepInfo, build_objective
from tests.losses.test_dino import dino_by_formula

# The end-to-end helpers (ssl_vision.launch, tests.test_pretrain) are imported inside the tests that use them: the
# gloo tests' worker processes import this module, and Lightning / Hydra would cost them seconds each.


def step_at(global_step=0, epoch=0, total_steps=100):
    return StepInfo(global_step=global_step, total_steps=total_steps, epoch=epoch, max_epochs=10)


def tiny_backbone():
    """Conv → global pool: accepts any crop size (multi-crop), no BN (so it is the same function on any process)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make(seed=0, **kw):
    backbone = tiny_backbone()
    torch.manual_seed(seed)
    args = dict(
        out_dim=7,
        hidden_dim=16,
        bottleneck_dim=5,
        warmup_teacher_temp_epochs=0,
        teacher_temp=0.04,
        freeze_last_layer=0,
        clip_grad=0.0,
    )
    args.update(kw)
    obj = build_objective("dino", 8, **args)
    obj.bind(backbone)
    return backbone, obj


def multicrop(n=4, seed=1, large=8, small=4, num_small=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, large, large, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, small, small, generator=g) for _ in range(num_small)
    ]


# ------------------------------------------------------------------------------------------ schedules


def test_teacher_temperature_warmup_by_epoch():
    sched = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])  # DINO's teacher_temp_schedule
    for epoch in (0, 1, 15, 29, 30, 99):
        assert teacher_temperature(epoch, 0.04, 0.07, 30) == pytest.approx(sched[epoch], abs=1e-12)
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07 and teacher_temperature(0, 0.04, 0.07, 1) == 0.04
    _, obj = make(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    # indexed by epoch, not by step: the same epoch at very different steps gives the same τ_t
    assert obj.current_teacher_temp(step_at(0, epoch=1)) == obj.current_teacher_temp(step_at(99, epoch=1))
    assert obj.current_teacher_temp(step_at(99, epoch=1)) == pytest.approx(0.055)


# ------------------------------------------------------------------------------------------ head and teacher
def test_head_layout():
    torch.manual_seed(0)
    obj = build_objective("dino", 384, hidden_dim=2048, bottleneck_dim=256, out_dim=300)
    linears = [m for m in obj.head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in obj.head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in obj.head.mlp)
    assert abs(linears[1].weight.std().item() - 0.02) < 0.002 and linears[1].weight.abs().max() <= 2.0  # trunc N
    assert all(m.bias is not None and m.bias.abs().sum() == 0 for m in linears)
    last = obj.head.last_layer
    assert last.weight_v.shape == (300, 256) and not hasattr(last, "bias")
    assert (last.weight_g == 1).all() and not last.weight_g.requires_grad  # norm_last_layer=True
    torch.testing.assert_close(last.weight.norm(dim=1), torch.ones(300))  # unit rows: cosine prototypes
    x = torch.randn(3, 384)
    torch.testing.assert_close(obj.head.bottleneck(x).norm(dim=1), torch.ones(3))
    obj_free = build_objective("dino", 384, out_dim=300, norm_last_layer=False)
    assert obj_free.head.last_layer.weight_g.requires_grad


def test_teacher_gets_no_gradient_and_sees_only_global_crops():
    backbone, obj = make()
    seen = []
    obj.teacher_backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    out = obj(multicrop(n=4, num_small=3), backbone, step_at())
    out.loss.backward()
    assert seen == [(8, 3, 8, 8)]  # one pass on the 2 global crops (2N images), never the small ones
    teacher = [*obj.teacher_backbone.parameters(), *obj.teacher_head.parameters()]
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert all(p.grad is not None for p in backbone.parameters())
    assert obj.head.mlp[0].weight.grad is not None
    names = {n.split(".")[0] for n, p in obj.named_parameters() if p.requires_grad}
    assert names == {"head"}  # the teacher never reaches the optimizer


def test_teacher_has_no_drop_path_but_student_keeps_it():
    backbone, dim = create_backbone("vit_tiny", image_size=32, patch_size=8, drop_path_rate=0.1)
    obj = build_objective("dino", dim, out_dim=16)
    obj.bind(backbone)
    kinds = lambda m: [type(x).__name__ for x in m.modules()]  # noqa: E731
    assert kinds(backbone).count("DropPath") == 22  # 2 per block; block 0 has rate 0 (linear decay rule)
    assert "DropPath" not in kinds(obj.teacher_backbone)
    assert dict(backbone.named_parameters()).keys() == dict(obj.teacher_backbone.named_parameters()).keys()
    obj.teacher_backbone.train()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(obj.teacher_backbone(x), obj.teacher_backbone(x))  # deterministic in train mode


def test_ema_momentum_schedule_reaches_exactly_one():
    backbone, obj = make(momentum=0.996)
    assert obj.current_teacher_momentum(step_at(0, total_steps=50)) == 0.996
    assert obj.current_teacher_momentum(step_at(50, total_steps=50)) == 1.0
    with torch.no_grad():
        for p in [*backbone.parameters(), *obj.head.parameters()]:
            p.add_(1.0)  # student moved away from the teacher
    before = {k: v.clone() for k, v in obj.teacher_backbone.state_dict().items()}
    obj.after_optimizer_step(backbone, step_at(50, total_steps=50))  # the last step: m = 1, teacher frozen
    for k, v in obj.teacher_backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    obj.after_optimizer_step(backbone, step_at(25, total_steps=50))  # mid-way: m = 1 − 0.004·½(1 + cos(π/2))
    m = 1 - 0.004 * 0.5
    w_t, w_s = obj.teacher_backbone[0].weight, backbone[0].weight
    torch.testing.assert_close(w_t, m * before["0.weight"] + (1 - m) * w_s)


def test_last_layer_frozen_during_first_epochs_then_trained():
    backbone, obj = make(freeze_last_layer=1, norm_last_layer=False)
    opt = torch.optim.SGD([*backbone.parameters(), *obj.parameters()], lr=1.0)
    snap = []
    for i, epoch in enumerate([0, 0, 1, 1]):
        out = obj(multicrop(n=8, seed=i), backbone, step_at(i, epoch))
        opt.zero_grad()
        out.loss.backward()
        obj.before_optimizer_step(step_at(i, epoch))
        opt.step()
        obj.after_optimizer_step(backbone, step_at(i, epoch))
        snap.append(
            {
                "v": obj.head.last_layer.weight_v.detach().clone(),
                "g": obj.head.last_layer.weight_g.detach().clone(),
                "mlp": obj.head.mlp[0].weight.detach().clone(),
            }
        )
    assert torch.equal(snap[0]["v"], snap[1]["v"]) and torch.equal(snap[0]["g"], snap[1]["g"])  # epoch 0: frozen
    assert not torch.equal(snap[0]["mlp"], snap[1]["mlp"])  # while the rest of the student trains
    assert (snap[2]["v"] - snap[1]["v"]).abs().max() > 1e-6  # epoch 1: the last layer learns
    assert (snap[3]["g"] - snap[2]["g"]).abs().max() > 1e-6


def test_gradients_clipped_per_parameter():
    backbone, obj = make(clip_grad=3.0)
    out = obj(multicrop(), backbone, step_at())
    (out.loss * 1e4).backward()  # large gradients everywhere
    with torch.no_grad():
        obj.head.mlp[0].bias.grad.fill_(0.1)  # one tensor with a small gradient: a global clip would shrink it
    raw = {
        n: p.grad.norm().item()
        for n, p in [*backbone.named_parameters(), *obj.head.named_parameters()]
        if p.grad is not None
    }
    obj.before_optimizer_step(step_at())
    for name, p in [*backbone.named_parameters(), *obj.head.named_parameters()]:
        if p.grad is None:
            continue
        want = min(raw[name], 3.0)
        assert p.grad.norm().item() == pytest.approx(want, rel=1e-4), name
    assert any(v > 3.0 for v in raw.values())


def test_needs_two_same_size_global_crops():
    backbone, obj = make()
    with pytest.raises(ValueError, match="global crops"):
        obj(multicrop()[1:], backbone, step_at())  # global, small, small
    out = obj(multicrop(num_small=0), backbone, step_at())  # 2 crops (augment=simclr): 2 pairs
    assert torch.isfinite(out.loss)


def test_loss_equals_formula_on_multicrop():
    backbone, obj = make(student_temp=0.1, teacher_temp=0.05)
    with torch.no_grad():
        obj.center.copy_(torch.randn(1, 7) * 0.1)
    views = multicrop(num_small=3)
    center = obj.center.clone()
    out = obj(views, backbone, step_at())
    with torch.no_grad():
        student = torch.stack([obj.head(backbone(v)) for v in views])
        teacher = torch.stack([obj.teacher_head(obj.teacher_backbone(v)) for v in views[:2]])
    assert out.loss.item() == pytest.approx(dino_by_formula(student, teacher, center[0], 0.1, 0.05), rel=1e-4)
    # the centre moved after the loss: c ← 0.9·c + 0.1·mean of the raw teacher logits
    torch.testing.assert_close(obj.center, 0.9 * center + 0.1 * teacher.reshape(-1, 7).mean(0, keepdim=True))


# ------------------------------------------------------------------------------------------ ViT
def test_vit_small_crops_use_interpolated_position_embeddings():
    """timm ViTs are built with dynamic_img_size: a 16-px crop through a 32-px ViT (patch 8) equals a 16-px ViT
    whose position embeddings are the 4×4 grid resized bicubically to 2×2 (cls slot unchanged)."""
    vit, _ = create_backbone("vit_tiny", image_size=32, patch_size=8)
    small, _ = create_backbone("vit_tiny", image_size=16, patch_size=8)
    vit.eval(), small.eval()
    pos = vit.pos_embed.detach()  # (1, 1 + 16, 192)
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
    state = vit.state_dict()
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 4, -1)], 1)
    small.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit(x), small(x), rtol=1e-4, atol=1e-5)
    state["pos_embed"] = pos[:, :5]  # a naive crop of the table gives other features
    small.load_state_dict(state)
    assert not torch.allclose(vit(x), small(x), atol=1e-3)
