"""InstDisc: NCE / full-softmax loss against the formulas, memory-bank writes, the frozen partition constant Z,
noise sampling, 1 process == 2 processes (gloo), one-step smoke runs and resume equality."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.launch import run_pretraining
from ssl_vision.losses.nce import bank_softmax_loss, nce_loss
from ssl_vision.objectives import StepInfo, build_objective
from ssl_vision.objectives.instdisc import bank_scores, draw_noise
from tests.conftest import FAST
from tests.distributed_harness import average_grads, run_on_processes
from tests.test_pretrain import StopAfter, _backbone_state

N_BANK, EMBED, TAU = 16, 6, 0.2


def step(indices, global_step=0):
    return StepInfo(global_step=global_step, total_steps=10, epoch=0, max_epochs=1, indices=indices)


def make(nce_k=5, num_samples=N_BANK, **kw):
    """A tiny backbone without BatchNorm (nothing differs per process) and an InstDisc objective, seeded."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU())
    obj = build_objective("instdisc", 8, num_samples=num_samples, embed_dim=EMBED, temperature=TAU, nce_k=nce_k,
                          bank_momentum=0.5, noise_seed=3, **kw)
    return backbone, obj


def images(n, seed=1):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ formulas
def nce_by_formula(f, bank, idx, noise, tau, z, n, eps=1e-7):
    """L = −(1/N) Σ_b [log h(i_b, f_b) + Σ_j log(1 − h(j, f_b))], h = P/(P + m·P_n + eps), P = exp(v·f/τ)/Z."""
    f, bank = f.double(), bank.double()
    m, total = noise.shape[1], 0.0
    for b in range(f.shape[0]):
        def h(j):
            p = math.exp(float(bank[j] @ f[b]) / tau) / z
            return p / (p + m / n + eps)
        total += math.log(h(int(idx[b]))) + sum(math.log(1.0 - h(int(j))) for j in noise[b])
    return -total / f.shape[0]


def z_by_formula(f, bank, idx, noise, tau, n):
    """Z = n · mean over the positive and noise scores of exp(v·f/τ)."""
    vals = [math.exp(float(bank[j].double() @ f[b].double()) / tau)
            for b in range(f.shape[0]) for j in [int(idx[b]), *map(int, noise[b])]]
    return n * sum(vals) / len(vals)


def softmax_by_formula(f, bank, idx, tau):
    """−(1/N) Σ_b log( exp(v_{i_b}·f_b/τ) / Σ_j exp(v_j·f_b/τ) ) over all n bank rows."""
    f, bank = f.double(), bank.double()
    total = 0.0
    for b in range(f.shape[0]):
        num = math.exp(float(bank[int(idx[b])] @ f[b]) / tau)
        den = sum(math.exp(float(bank[j] @ f[b]) / tau) for j in range(bank.shape[0]))
        total += math.log(num / den)
    return -total / f.shape[0]


def test_nce_loss_function_matches_formula():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(4, EMBED, generator=g), dim=1)
    bank = F.normalize(torch.randn(N_BANK, EMBED, generator=g), dim=1)
    idx = torch.tensor([0, 5, 9, 15])
    noise = torch.randint(N_BANK, (4, 7), generator=g)
    cols = torch.cat([idx[:, None], noise], 1)
    logits = torch.stack([bank[c] @ f[b] for b, c in enumerate(cols)]) / TAU
    loss = nce_loss(logits, z=37.5, num_samples=N_BANK)
    assert loss.item() == pytest.approx(nce_by_formula(f, bank, idx, noise, TAU, 37.5, N_BANK), rel=1e-5)
    assert bank_softmax_loss(f @ bank.T / TAU, idx).item() == pytest.approx(
        softmax_by_formula(f, bank, idx, TAU), rel=1e-5)


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
    assert torch.equal(a, draw_noise(pos, 5, 1000, seed=1, global_step=4))       # same (seed, step): same rows
    assert not torch.equal(a, draw_noise(pos, 5, 1000, seed=1, global_step=5))   # a new step draws anew
    counts = torch.bincount(a.flatten(), minlength=5).double() / a.numel()
    torch.testing.assert_close(counts, torch.full((5,), 0.2, dtype=torch.float64), atol=0.01, rtol=0)
    halves = [draw_noise(pos[r * 4:(r + 1) * 4], 5, 1000, 1, 4, rank=r, world_size=2) for r in range(2)]
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


# ------------------------------------------------------------------------------------------ distributed
def _two_steps(backbone, obj, x, idx, lo, hi):
    """Step 0 (estimates Z) with backward and bank write, then the loss of step 1 on the written bank."""
    out = obj([x[lo:hi]], backbone, step(idx[lo:hi], global_step=0))
    out.loss.backward()
    obj.after_optimizer_step(backbone, step(None))
    out1 = obj([x[lo:hi]], backbone, step(idx[lo:hi], global_step=1))
    return out.loss.detach(), out1.loss.detach()


def _rank_fn(rank, world, x, idx):
    backbone, obj = make()
    n = x.shape[0] // world
    loss0, loss1 = _two_steps(backbone, obj, x, idx, rank * n, (rank + 1) * n)
    losses = torch.stack([loss0, loss1])
    torch.distributed.all_reduce(losses)  # the global mean loss = mean of the per-process means (equal N)
    grads = average_grads(backbone)       # what DDP does
    grads.update({f"head.{k}": v for k, v in average_grads(obj).items()})
    return {"losses": losses / world, "grads": grads, "bank": obj.bank.clone(), "z": obj.z.clone()}


def test_two_processes_equal_one_process():
    """The tiny backbone has no BatchNorm, so nothing is per-process except what InstDisc communicates: the Z
    estimate (all-reduced), the bank writes (all-gathered) and the noise (seeded per global batch, sliced by rank)."""
    x, idx = images(8, seed=5), torch.tensor([3, 0, 12, 7, 9, 15, 1, 10])
    backbone, obj = make()
    loss0, loss1 = _two_steps(backbone, obj, x, idx, 0, 8)
    ref_grads = {n: p.grad for n, p in backbone.named_parameters()}
    ref_grads.update({f"head.{n}": p.grad for n, p in obj.named_parameters()})
    results = run_on_processes(_rank_fn, 2, x, idx)
    for r in results:
        torch.testing.assert_close(r["z"], obj.z, rtol=1e-5, atol=0)
        torch.testing.assert_close(r["bank"], obj.bank, rtol=1e-5, atol=1e-6)  # every process: the global writes
        torch.testing.assert_close(r["losses"], torch.stack([loss0, loss1]), rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(ref_grads)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(results[0]["bank"], results[1]["bank"]) and torch.equal(results[0]["z"], results[1]["z"])


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_one_step_smoke(make_cfg, backbone):
    extra = ["backbone.width=0.125"] if backbone == "resnet18" else ["backbone.patch_size=8"]
    cfg = make_cfg(["method=instdisc", f"backbone={backbone}", *extra, *FAST, "trainer.max_steps=1"])
    assert cfg.augment.name == "instdisc" and len(cfg.augment.views) == 1 and cfg.augment.views[0].count == 1
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["images_seen"] == 16
    assert res["train_loss"] is not None and math.isfinite(res["train_loss"])
    _, state = _backbone_state(res["checkpoint"])
    assert state["objective.bank"].shape == (64, 128) and bool(state["objective.z_set"])
    assert (state["objective.bank"].norm(dim=1) - 1).abs().lt(1e-5).sum() == 16  # the batch's rows were written


def test_augment_alias_is_moco_v1_with_one_view(make_cfg):
    ours = make_cfg(["method=instdisc"]).augment.views
    moco = make_cfg(["augment=moco_v1"]).augment.views
    assert len(ours) == len(moco) == 1
    assert {**ours[0], "count": 2} == dict(moco[0]) and moco[0].count == 2 and ours[0].gray_before_jitter


def test_resume_equals_uninterrupted(make_cfg, tmp_path):
    """8 steps straight == 4 steps, checkpoint, resume, 4 steps: weights, bank, Z and its flag all equal."""
    common = ["method=instdisc", "backbone=resnet18", "backbone.width=0.125", *FAST, "trainer.max_epochs=2",
              "eval.final_eval=false", "checkpoint.save_top_k=-1"]
    straight = run_pretraining(make_cfg(common, tmp_path / "straight"))
    assert straight["steps"] == 8
    half = run_pretraining(make_cfg(common, tmp_path / "half"), extra_callbacks=[StopAfter(4)])
    assert half["steps"] == 4
    resumed = run_pretraining(make_cfg([*common, f"resume={half['checkpoint']}"], tmp_path / "other"))
    assert resumed["steps"] == 8
    a, _ = _backbone_state(straight["checkpoint"])
    b, _ = _backbone_state(resumed["checkpoint"])
    assert a.keys() == b.keys() and {"objective.bank", "objective.z", "objective.z_set"} <= set(a)
    assert torch.allclose(a["objective.bank"].norm(dim=1), torch.ones(64))  # every row written by now
    assert bool(a["objective.z_set"]) and a["objective.z"] > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


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
