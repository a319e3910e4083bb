"""ssl_vision/losses/swav.py: Sinkhorn-Knopp (docs/reference.md §5) and the swapped prediction against the formulas
written out here, marginals, float32 under half input, bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vision.losses.swav import sinkhorn_knopp, swapped_prediction


def sinkhorn_by_formula(scores, eps, iters):
    """docs/reference.md §5 on one process, in float64: Q = exp(S/ε)ᵀ; Q /= ΣQ; iters × (rows /= sum, /K; cols /=
    sum, /B)."""
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


def test_sinkhorn_matches_formula_and_marginals():
    scores = unit_scores(12, 5)
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert q.dtype == torch.float32 and q.shape == (12, 5)
    torch.testing.assert_close(q.double(), sinkhorn_by_formula(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # each sample's code sums to 1
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
    scores = torch.randn(4, 3, 5, generator=g)  # V=4 crops, N=3, K=5
    codes = torch.softmax(torch.randn(2, 3, 5, generator=g), -1)  # codes of crops 0 and 1
    got = swapped_prediction(scores, codes, [0, 1], tau)
    assert got.item() == pytest.approx(swapped_by_formula(scores, codes, [0, 1], tau), rel=1e-5)
    # hand-made: 2 crops, K=2, one-hot code for crop 0 on prototype 0, crop 1 predicts with scores (0, 0):
    # −log softmax(0, 0)_0 = ln 2, and crop 1's code predicted from crop 0 scores (1, 0)/τ=1 with code (0, 1):
    # −log(e^0 / (e^1 + e^0)) = ln(1 + e). Mean over the two assigned crops.
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert swapped_prediction(s, q, [0, 1], 1.0).item() == pytest.approx((math.log(2) + math.log(1 + math.e)) / 2)
