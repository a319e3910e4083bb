"""ssl_vision/losses/nce.py: InstDisc's NCE loss and the full softmax over the memory bank against the formulas
written out here; a NaN partition constant reaches the loss (for the non-finite-loss guard) instead of an error
that blames Z."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vision.losses.nce import bank_softmax_loss, nce_loss

N_BANK, EMBED, TAU = 16, 6, 0.2


def nce_by_formula(f, bank, idx, noise, tau, z, n, eps=1e-7):
    """L = −(1/N) Σ_b [log h(i_b, f_b) + Σ_j log(1 − h(j, f_b))], h = P/(P + m·P_n + eps), P = exp(v·f/τ)/Z."""
    f, bank = f.double(), bank.double()
    m, total = noise.shape[1], 0.0
    for b in range(f.shape[0]):

        def h(j, b=b):
            p = math.exp(float(bank[j] @ f[b]) / tau) / z
            return p / (p + m / n + eps)

        total += math.log(h(int(idx[b]))) + sum(math.log(1.0 - h(int(j))) for j in noise[b])
    return -total / f.shape[0]


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
        softmax_by_formula(f, bank, idx, TAU), rel=1e-5
    )


def test_nan_partition_constant_gives_a_nan_loss_not_a_z_error():
    """Before: NaN features (a NaN image) made the estimated Z NaN, and ``Z > 0`` refused it with "the partition
    constant Z must be > 0" -- blaming Z instead of the input, and bypassing the non-finite-loss guard that names the
    step and the likely causes. Now a NaN Z gives a NaN loss; a Z <= 0 is still refused."""
    logits = torch.randn(4, 3)
    for z in (torch.tensor(float("nan")), float("nan")):
        assert torch.isnan(nce_loss(logits, z, 16))
    for z in (torch.tensor(0.0), -1.0):
        with pytest.raises(ValueError, match="partition constant Z must be > 0"):
            nce_loss(logits, z, 16)
