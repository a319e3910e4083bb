"""The EMA teacher (ssl_vision/nn/momentum.py): one component, one schedule, the same keys in every momentum method.

Each method's teacher is driven through the objective's own hook for a few steps and compared with the EMA computed
here from the papers' formulas (docs/reference.md §0.1): BYOL τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 after step k of
K, DINO the same cosine from m to 1, MoCo v3 the cosine m → 1 over the forwards 1 … T−1 (``--moco-m-cos``, ending at
exactly 1), MoCo v1/v2 a constant m at every forward but the first.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_vision.nn.momentum import EMATeacher, ema_momentum
from ssl_vision.objectives import StepInfo, build_objective

EMA_METHODS = ("moco_v1", "moco_v2", "moco_v3", "byol", "dino")
TINY = {
    "moco_v1": dict(head="linear", embed_dim=5, queue_size=32, shuffle_bn_splits=2),
    "moco_v2": dict(embed_dim=5, proj_hidden_dim=7, queue_size=32, shuffle_bn_splits=2),
    "moco_v3": dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9, temperature=0.2),
    "byol": dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9),
    "dino": dict(out_dim=10, hidden_dim=12, bottleneck_dim=4, head_layers=2),
}
#: (teacher attribute, online attribute) of each method; "backbone" is the module's backbone
PAIRS = {
    "moco_v1": [("key_backbone", "backbone"), ("key_head", "head")],
    "moco_v2": [("key_backbone", "backbone"), ("key_head", "head")],
    "moco_v3": [("momentum_backbone", "backbone"), ("momentum_projector", "projector")],
    "byol": [("target_backbone", "backbone"), ("target_projector", "projector")],
    "dino": [("teacher_backbone", "backbone"), ("teacher_head", "head")],
}


def conv_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def cosine_to(m0: float, m_end: float, t: int, total: int) -> float:
    """m_end − (m_end − m0)·(cos(π t / total) + 1)/2, exactly m_end at t = total (the papers' formula)."""
    return m_end if t >= total else m_end - (m_end - m0) * (math.cos(math.pi * t / total) + 1) / 2


def expected_momenta(method: str, m0: float, m_end: float | None, total: int) -> dict[int, float]:
    """{optimizer steps taken when the update happens: momentum} for a run of ``total`` steps."""
    if method in ("byol", "dino"):  # after every optimizer step k = 1 … K
        return {k: m0 if m_end is None else cosine_to(m0, m_end, k, total) for k in range(1, total + 1)}
    # MoCo: at the first forward of steps 1 … T−1 (none at step 0: the copy is still the online network)
    return {t: m0 if m_end is None else cosine_to(m0, m_end, t, total - 1) for t in range(1, total)}


def online_of(obj, backbone, name):
    return backbone if name == "backbone" else getattr(obj, name)


@pytest.mark.parametrize(
    "method,m0,m_end",
    [
        ("moco_v1", 0.9, None),
        ("moco_v2", 0.9, None),
        ("moco_v2", 0.8, 0.99),
        ("moco_v3", 0.9, 1.0),
        ("byol", 0.9, 1.0),
        ("dino", 0.9, 1.0),
        ("byol", 0.7, None),
    ],
)
def test_each_teacher_follows_the_papers_ema(method, m0, m_end):
    total = 6
    backbone = conv_backbone()
    torch.manual_seed(1)
    obj = build_objective(method, 6, **TINY[method], momentum=m0, momentum_end=m_end)
    obj.bind(backbone)
    # the reference: every teacher parameter in float64, updated here by the formula
    ref = {t: {n: p.detach().double().clone() for n, p in getattr(obj, t).named_parameters()} for t, _ in PAIRS[method]}
    momenta = expected_momenta(method, m0, m_end, total)
    g = torch.Generator().manual_seed(2)
    for k in range(1, total + 1):
        with torch.no_grad():  # "optimizer step" k − 1 moves every trainable online parameter
            for p in [*backbone.parameters(), *obj.parameters()]:
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        info = StepInfo(global_step=k, total_steps=total, epoch=0, max_epochs=1)  # k optimizer steps taken
        if method.startswith("moco"):
            if k == total:
                break  # a run of T steps has forwards 0 … T−1
            views = [torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)]
            obj(views, backbone, info)  # the update happens at the start of the forward of step k
            obj(views, backbone, info)  # a second micro-batch of the same step: no second update
        else:
            obj.after_optimizer_step(backbone, info)
        m = momenta[k]
        for t, o in PAIRS[method]:
            for n, p in online_of(obj, backbone, o).named_parameters():
                ref[t][n] = m * ref[t][n] + (1 - m) * p.detach().double()
        for t, _ in PAIRS[method]:
            for n, p in getattr(obj, t).named_parameters():
                torch.testing.assert_close(
                    p.detach().double(), ref[t][n], rtol=0, atol=1e-6, msg=f"{method} {t}.{n} after step {k}"
                )
                assert not p.requires_grad
    assert momenta[max(momenta)] == (m0 if m_end is None else m_end)  # the last update uses exactly momentum_end


def test_the_one_schedule_function():
    assert ema_momentum(0, 10, 0.99, 1.0) == 0.99
    assert ema_momentum(10, 10, 0.99, 1.0) == 1.0 and ema_momentum(12, 10, 0.99, 1.0) == 1.0
    assert ema_momentum(5, 10, 0.99, 1.0) == pytest.approx(1 - 0.01 * 0.5)
    assert ema_momentum(3, 10, 0.999, None) == 0.999
    assert ema_momentum(3, 10, 0.9, 0.99) == pytest.approx(cosine_to(0.9, 0.99, 3, 10), abs=1e-15)
    # MoCo's T − 1 updates vs BYOL's T: the last update of either reaches momentum_end
    moco = EMATeacher({"k": "backbone"}, 0.99, 1.0, timing="before_forward")
    byol = EMATeacher({"t": "backbone"}, 0.99, 1.0)
    last = StepInfo(global_step=9, total_steps=10, epoch=0, max_epochs=1)
    assert moco.momentum_at(last) == 1.0 and byol.momentum_at(last) < 1.0
    assert byol.momentum_at(StepInfo(global_step=10, total_steps=10, epoch=0, max_epochs=1)) == 1.0


@pytest.mark.parametrize("method", EMA_METHODS)
def test_every_ema_method_has_momentum_and_momentum_end(method):
    obj = build_objective(method, 6, **TINY[method], momentum=0.5, momentum_end=0.75)
    assert isinstance(obj.ema, EMATeacher) and (obj.ema.momentum, obj.ema.momentum_end) == (0.5, 0.75)
    with pytest.raises(ValueError, match=r"method\.kwargs\.momentum_end must be a number in \[0, 1\], got 1\.5"):
        build_objective(method, 6, **TINY[method], momentum_end=1.5)
    with pytest.raises(ValueError, match=r"method\.kwargs\.momentum must be a number in \[0, 1\], got -0\.1"):
        build_objective(method, 6, **TINY[method], momentum=-0.1)


@pytest.mark.parametrize("method,old", [("byol", "base_momentum"), ("dino", "momentum_teacher")])
def test_an_old_key_name_is_refused_naming_the_new_one(method, old, make_cfg):
    with pytest.raises(
        ValueError,
        match=rf"method\.kwargs\.{old} was renamed to method\.kwargs\.momentum .*"
        rf"set momentum=0\.99 instead of {old}",
    ):
        build_objective(method, 6, **TINY[method], **{old: 0.99})
    # from a config that still sets it (an experiment file of an earlier version, or +key on the command line)
    cfg = make_cfg([f"method={method}", f"+method.kwargs.{old}=0.99"])
    with pytest.raises(ValueError, match=rf"method\.kwargs\.{old} was renamed to method\.kwargs\.momentum"):
        build_objective(method, 6, **{**OmegaConf.to_container(cfg.method.kwargs), **TINY[method]})


def test_an_unknown_kwarg_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method\.kwargs for byol: momentom; valid: .*momentum, momentum_end"):
        build_objective("byol", 6, **TINY["byol"], momentom=0.9)


@pytest.mark.parametrize("method", EMA_METHODS)
def test_configs_use_the_same_keys(method, make_cfg):
    cfg = make_cfg([f"method={method}", "method.kwargs.momentum=0.996"])
    kw = OmegaConf.to_container(cfg.method.kwargs, resolve=True)
    assert kw["momentum"] == 0.996
    assert kw["momentum_end"] == (None if method in ("moco_v1", "moco_v2") else 1.0)


@pytest.mark.parametrize("method", ["byol", "dino", "moco_v3"])
@pytest.mark.parametrize("momentum", [0.99, 0.996])
def test_one_sweep_over_the_momentum_of_three_methods_composes(method, momentum, make_cfg):
    """Each job of ``-m method=byol,dino,moco_v3 method.kwargs.momentum=0.99,0.996`` (one key in all three) composes
    and builds its teacher with that momentum, cosine to 1."""
    cfg = make_cfg([f"method={method}", f"method.kwargs.momentum={momentum}"])
    kw = {**OmegaConf.to_container(cfg.method.kwargs, resolve=True), **TINY[method]}
    obj = build_objective(method, 6, **kw)
    assert (obj.ema.momentum, obj.ema.momentum_end) == (momentum, 1.0)
