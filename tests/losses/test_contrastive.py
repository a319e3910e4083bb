"""ssl_vision/losses/contrastive.py: NT-Xent (SimCLR eq. 1) against its formula written out here, a hand-made case,
scale invariance, a finite value at the lowest temperature, and bad input; the multi-positive NT-Xent of multi-crop
SimCLR against its formula, equal to NT-Xent with 2 views, rank offset."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vision.losses import multi_positive_nt_xent, nt_xent


def nt_xent_by_formula(z_a, z_b, tau):
    """SimCLR eq. (1): l(i,j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), averaged over all 2B anchors."""
    z = torch.cat([z_a, z_b]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    b = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + b) % n2
        num = math.exp(float(z[i] @ z[j]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_formula(tau):
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent(z_a, z_b, tau).item() == pytest.approx(nt_xent_by_formula(z_a, z_b, tau), rel=1e-5)


def test_nt_xent_hand_made_two_samples():
    # Two samples, orthogonal unit vectors; each view identical to its pair: s(pos)=1, others 0 or 1.
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_b = z_a.clone()
    tau = 0.5
    # anchor a0: keys a1 (s=0), b0 (s=1, positive), b1 (s=0) -> -log(e^2 / (e^2 + 2))
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert nt_xent(z_a, z_b, tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_scale_invariant_and_low_temperature_finite():
    z_a, z_b = torch.randn(4, 3), torch.randn(4, 3)
    assert nt_xent(z_a * 10, z_b, 0.2).item() == pytest.approx(nt_xent(z_a, z_b, 0.2).item(), rel=1e-5)
    assert torch.isfinite(nt_xent(z_a.half().float(), z_b, 1e-3))


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3), 0.1)


def multi_positive_by_formula(z: torch.Tensor, tau: float) -> float:
    """−log(Σ_pos exp(s/τ) / Σ_{all but self} exp(s/τ)), one anchor at a time, mean over anchors. z: (V, N, D)."""
    v_count, n, _ = z.shape
    z = F.normalize(z.double(), dim=-1)
    total = 0.0
    for v in range(v_count):
        for i in range(n):
            pos = sum(math.exp(float(z[v, i] @ z[w, i]) / tau) for w in range(v_count) if w != v)
            den = sum(
                math.exp(float(z[v, i] @ z[w, j]) / tau) for w in range(v_count) for j in range(n) if (w, j) != (v, i)
            )
            total += -math.log(pos / den)
    return total / (v_count * n)


@pytest.mark.parametrize("views", [2, 3, 5])
def test_multi_positive_nt_xent_matches_formula(views):
    z = torch.randn(views, 6, 5, generator=torch.Generator().manual_seed(views))
    assert multi_positive_nt_xent(z, 0.3).item() == pytest.approx(multi_positive_by_formula(z, 0.3), rel=1e-5)


def test_multi_positive_with_two_views_is_nt_xent_and_rank_offset_selects_the_local_rows():
    z_all = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0))  # (V, B, D), B = 2 ranks × 4
    assert multi_positive_nt_xent(z_all, 0.2).item() == pytest.approx(nt_xent(z_all[0], z_all[1], 0.2).item(), rel=1e-5)
    # rank 1's anchors are samples 4..7 of the gathered batch; its loss is nt_xent's with the same offset
    local = z_all[:, 4:]
    assert multi_positive_nt_xent(local, 0.2, z_all, offset=4).item() == pytest.approx(
        nt_xent(local[0], local[1], 0.2, z_all[0], z_all[1], offset=4).item(), rel=1e-5
    )
