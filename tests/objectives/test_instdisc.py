"""InstDisc: the objective's NCE / full-softmax loss against the formulas, memory-bank writes, the frozen partition
constant Z, noise sampling, the bank a run builds. (Smoke runs, 1 vs 2 processes, resume equality and the non-finite
guard: tests/objectives/test_contract.py; the loss functions: tests/losses/test_nce.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.launch import run_pretraining
from ssl_vision.nn.memory import bank_scores
from ssl_vision.objectives import StepInfo, build_objective
from ssl_vision.objectives.instdisc import draw_noise
from tests.conftest import FAST
from tests.losses.test_nce import nce_by_formula, softmax_by_formula
from tests.test_pretrain import _backbone_state

N_BANK, EMBED, TAU = 16, 6, 0.2


def step(indices, global_step=0):
    return StepInfo(global_step=global_step, total_steps=10, epoch=0, max_epochs=1, indices=indices)


def make(nce_k=5, num_samples=N_BANK, **kw):
    """A tiny backbone without BatchNorm (nothing differs per process) and an InstDisc objective, seeded."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU())
    obj = build_objective(
        "instdisc",
        8,
        num_samples=num_samples,
        embed_dim=EMBED,
        temperature=TAU,
        nce_k=nce_k,
        bank_momentum=0.5,
        noise_seed=3,
        **kw,
    )
    return backbone, obj


def images(n, seed=1):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ formulas


def z_by_formula(f, bank, idx, noise, tau, n):
    """Z = n · mean over the positive and noise scores of exp(v·f/τ)."""
    vals = [
        math.exp(float(bank[j].double() @ f[b].double()) / tau)
        for b in range(f.shape[0])
        for j in [int(idx[b]), *map(int, noise[b])]
    ]
    return n * sum(vals) / len(vals)


def test_objective_nce_loss_and_z_match_formulas():
    backbone, obj = make()
    x, idx = images(4), torch.tensor([2, 7, 11, 14])
    bank0 = obj.bank.clone()
    out = obj([x], backbone, step(idx))
    with torch.no_grad():
        f = F.normalize(obj.head(backbone(x)), dim=1)  # backbone → Linear → L2 norm
    noise = draw_noise(idx, N_BANK, 5, seed=3, global_step=0)
    z = z_by_formula(f, bank0, idx, noise, TAU, N_BANK)
    assert obj.z.item() == pytest.approx(z, rel=1e-5) and bool(obj.z_set)
    assert out.loss.item() == pytest.approx(nce_by_formula(f, bank0, idx, noise, TAU, z, N_BANK), rel=1e-5)
    assert out.features.shape == (4, 8) and out.embedding.shape == (4, EMBED)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(4))
    out.loss.backward()
    assert not obj.bank.requires_grad and torch.equal(obj.bank, bank0)  # forward and backward never touch the bank


def test_objective_full_softmax_matches_formula():
    backbone, obj = make(nce_k=0)
    x, idx = images(4), torch.tensor([2, 7, 11, 14])
    out = obj([x], backbone, step(idx))
    with torch.no_grad():
        f = F.normalize(obj.head(backbone(x)), dim=1)
    assert out.loss.item() == pytest.approx(softmax_by_formula(f, obj.bank, idx, TAU), rel=1e-5)
    assert not bool(obj.z_set)  # no partition constant in the full softmax


def test_bank_scores_both_paths_equal_dot_products():
    g = torch.Generator().manual_seed(0)
    f, bank = torch.randn(3, EMBED, generator=g), torch.randn(N_BANK, EMBED, generator=g)
    cols = torch.randint(N_BANK, (3, 4), generator=g)
    ref = torch.stack([torch.stack([bank[j] @ f[b] for j in cols[b]]) for b in range(3)])
    torch.testing.assert_close(bank_scores(f, bank, cols, gather_rows=True), ref)
    torch.testing.assert_close(bank_scores(f, bank, cols, gather_rows=False), ref)


# ------------------------------------------------------------------------------------------ state
def test_bank_init_range():
    _, obj = make(num_samples=2000)
    bound = 1 / math.sqrt(EMBED / 3)
    assert obj.bank.shape == (2000, EMBED) and not obj.bank.requires_grad
    assert obj.bank.min() >= -bound and obj.bank.max() <= bound
    assert obj.bank.min() < -0.95 * bound and obj.bank.max() > 0.95 * bound  # the whole range is used
    assert "bank" in dict(obj.named_buffers()) and "bank" not in dict(obj.named_parameters())


def test_bank_write_is_normalised_momentum_mix():
    backbone, obj = make()
    x, idx = images(4), torch.tensor([2, 7, 11, 14])
    bank0 = obj.bank.clone()
    out = obj([x], backbone, step(idx))
    f = out.embedding.detach()
    obj.after_optimizer_step(backbone, step(None))
    expected = 0.5 * bank0[idx] + 0.5 * f
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(obj.bank[idx], expected)
    others = torch.ones(N_BANK, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(obj.bank[others], bank0[others])
    obj.after_optimizer_step(backbone, step(None))  # nothing pending: a second call writes nothing
    torch.testing.assert_close(obj.bank[idx], expected)


def test_z_estimated_once_frozen_and_checkpointed():
    backbone, obj = make()
    obj([images(4, seed=1)], backbone, step(torch.tensor([0, 1, 2, 3])))
    z_first = obj.z.clone()
    assert bool(obj.z_set) and z_first > 0
    obj.after_optimizer_step(backbone, step(None))
    out = obj([images(4, seed=2)], backbone, step(torch.tensor([4, 5, 6, 7]), global_step=1))
    assert torch.equal(obj.z, z_first)  # second batch: Z unchanged
    assert out.logs["nce_log_z"].item() == pytest.approx(math.log(z_first.item()))
    state = obj.state_dict()
    assert {"bank", "z", "z_set"} <= set(state)
    _, fresh = make()
    fresh.bank.uniform_(-0.1, 0.1)  # different state, so the load is what restores it
    assert not bool(fresh.z_set)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.z, z_first) and bool(fresh.z_set) and torch.equal(fresh.bank, obj.bank)
    fresh([images(4, seed=3)], backbone, step(torch.tensor([8, 9, 10, 11]), global_step=2))
    assert torch.equal(fresh.z, z_first)  # a resumed objective does not re-estimate Z


def test_noise_is_uniform_reproducible_and_rank_sliced():
    pos = torch.arange(8) % 5
    a = draw_noise(pos, 5, 1000, seed=1, global_step=4)
    assert a.shape == (8, 1000) and a.min() == 0 and a.max() == 4
    assert torch.equal(a, draw_noise(pos, 5, 1000, seed=1, global_step=4))  # same (seed, step): same rows
    assert not torch.equal(a, draw_noise(pos, 5, 1000, seed=1, global_step=5))  # a new step draws anew
    counts = torch.bincount(a.flatten(), minlength=5).double() / a.numel()
    torch.testing.assert_close(counts, torch.full((5,), 0.2, dtype=torch.float64), atol=0.01, rtol=0)
    halves = [draw_noise(pos[r * 4 : (r + 1) * 4], 5, 1000, 1, 4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(halves), a)  # 2 processes draw what 1 process draws for the same samples
    ex = draw_noise(pos, 5, 1000, seed=1, global_step=4, exclude_positive=True)
    assert not (ex == pos[:, None]).any() and ex.min() == 0 and ex.max() == 4
    assert (a == pos[:, None]).any()  # the official sampler does draw the positive


def test_clear_errors_and_small_data_cap():
    with pytest.raises(ValueError, match="num_samples"):
        make(num_samples=None)
    with pytest.warns(UserWarning, match="capped at n-1=15"):
        _, obj = make(nce_k=4096)
    assert obj.num_noise == N_BANK - 1
    backbone, obj = make()
    with pytest.raises(ValueError, match="indices"):
        obj([images(4)], backbone, step(None))
    with pytest.raises(ValueError, match="outside the memory bank"):
        obj([images(2)], backbone, step(torch.tensor([0, N_BANK])))


# ------------------------------------------------------------------------------------------ end to end
def test_one_step_bank_sized_by_the_data_and_the_batch_rows_written(make_cfg):
    cfg = make_cfg(["method=instdisc", "backbone=resnet18", "backbone.width=0.125", *FAST, "trainer.max_steps=1"])
    assert (
        cfg.augment.name == "instdisc"
        and list(cfg.augment.views) == ["global"]
        and cfg.augment.views["global"].count == 1
    )
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["images_seen"] == 16
    assert res["train_loss"] is not None and math.isfinite(res["train_loss"])
    _, state = _backbone_state(res["checkpoint"])
    assert state["objective.bank"].shape == (64, 128) and bool(state["objective.z_set"])
    assert (state["objective.bank"].norm(dim=1) - 1).abs().lt(1e-5).sum() == 16  # the batch's rows were written


def test_one_epoch_writes_every_bank_row(make_cfg):
    """After one epoch every sample has passed once, so every one of the 64 rows is a written (unit-norm) row, where
    the initial rows are uniform in [-1/sqrt(d/3), 1/sqrt(d/3)] and not unit-norm."""
    cfg = make_cfg(["method=instdisc", "backbone=resnet18", "backbone.width=0.125", *FAST, "trainer.max_epochs=1"])
    res = run_pretraining(cfg)
    assert res["steps"] == 4 and res["images_seen"] == 64
    _, state = _backbone_state(res["checkpoint"])
    assert torch.allclose(state["objective.bank"].norm(dim=1), torch.ones(64), atol=1e-5)


def test_augment_alias_is_moco_v1_with_one_view(make_cfg):
    ours = make_cfg(["method=instdisc"]).augment.views
    moco = make_cfg(["augment=moco_v1"]).augment.views
    assert list(ours) == list(moco) == ["global"]
    assert {**ours["global"], "count": 2} == dict(moco["global"]) and moco["global"].count == 2
    assert ours["global"].gray_before_jitter


def test_head_bn_option_centres_the_embedding():
    """head_bn (off by default, as lemniscate's plain fc) inserts BatchNorm1d between the Linear and the L2 norm."""
    _, plain = make()
    assert isinstance(plain.head, nn.Linear) and plain.head.bias is not None
    backbone, obj = make(head_bn=True)
    assert isinstance(obj.head[0], nn.Linear) and obj.head[0].bias is None and isinstance(obj.head[1], nn.BatchNorm1d)
    out = obj([images(8)], backbone, step(torch.arange(8)))
    with torch.no_grad():
        z = obj.head[0](backbone(images(8)))
        expected = F.normalize((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5), dim=1)
    torch.testing.assert_close(out.embedding, expected, rtol=1e-4, atol=1e-5)
