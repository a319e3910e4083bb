"""ssl_vision/losses/infonce.py: MoCo's InfoNCE over a queue (eq. 1) and MoCo v3's contrastive loss (2τ factor,
rank offset) against the formulas written out here, a hand-made case, the queue layout check."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vision.losses.infonce import info_nce, moco_v3_contrastive


def info_nce_by_formula(q, k, queue, tau):
    """MoCo eq. (1): -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_j exp(q·queue_j/τ)), averaged over queries."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ queue[:, j].double()) / tau) for j in range(queue.shape[1]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def ctr_by_formula(q, k_all, tau, offset):
    """MoCo v3: 2τ · mean_i −log exp(q_i·k_{offset+i}/τ) / Σ_j exp(q_i·k_j/τ), q and k normalised."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k_all.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        den = sum(math.exp(float(q[i] @ k[j]) / tau) for j in range(k.shape[0]))
        total += -math.log(math.exp(float(q[i] @ k[offset + i]) / tau) / den)
    return 2 * tau * total / q.shape[0]


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_info_nce_matches_formula(tau):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    queue = F.normalize(torch.randn(4, 9, generator=g), dim=0)
    assert info_nce(q, k, queue, tau).item() == pytest.approx(info_nce_by_formula(q, k, queue, tau), rel=1e-5)


def test_info_nce_hand_made():
    # q = k+ = e0, queue = [e1, -e0]: logits 1/τ, 0, -1/τ -> loss = -log(e^{1/τ} / (e^{1/τ} + 1 + e^{-1/τ}))
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert info_nce(q, q.clone(), queue, tau).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="queue as"):
        info_nce(q, q, torch.randn(3, 2), tau)  # (K, D) instead of (D, K)


@pytest.mark.parametrize("offset", [0, 3])
def test_moco_v3_contrastive_matches_formula_with_rank_offset_and_2tau(offset):
    g = torch.Generator().manual_seed(1)
    q, k_all = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    got = moco_v3_contrastive(q, k_all, 0.2, offset).item()
    assert got == pytest.approx(ctr_by_formula(q, k_all, 0.2, offset), rel=1e-5)
    other = 3 - offset  # the wrong offset gives a different loss: the offset matters
    assert got != pytest.approx(ctr_by_formula(q, k_all, 0.2, other), rel=1e-3)
