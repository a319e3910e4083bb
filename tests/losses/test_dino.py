"""ssl_vision/losses/dino.py: DINO's cross-entropy between centred, sharpened teacher and student distributions
against the formula written out here, and its 2V − 2 pairs (no crop against itself)."""

import math

import pytest
import torch

from ssl_vision.losses.dino import dino_cross_entropy


def dino_by_formula(student, teacher, center, tau_s, tau_t):
    """(1/(2V−2)) Σ_{i∈{0,1}} Σ_{v≠i} (1/N) Σ_b −Σ_k P_t(i,b)_k log P_s(v,b)_k, with Python loops."""
    v_count, n, k_count = student.shape

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) for x in xs]
        return [x / sum(e) for x in e]

    total, terms = 0.0, 0
    for i in range(2):
        for v in range(v_count):
            if v == i:
                continue
            for b in range(n):
                p_t = softmax([(float(teacher[i, b, k]) - float(center[k])) / tau_t for k in range(k_count)])
                p_s = softmax([float(student[v, b, k]) / tau_s for k in range(k_count)])
                total += -sum(p_t[k] * math.log(p_s[k]) for k in range(k_count)) / n
            terms += 1
    return total / terms


@pytest.mark.parametrize("tau_s,tau_t", [(0.1, 0.04), (0.2, 0.07)])
def test_loss_matches_formula(tau_s, tau_t):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)  # V=4, N=3, K=6
    center = torch.randn(6, generator=g) * 0.3
    got = dino_cross_entropy(student, teacher, center, tau_s, tau_t)
    assert got.item() == pytest.approx(dino_by_formula(student, teacher, center, tau_s, tau_t), rel=1e-5)


@pytest.mark.parametrize("num_crops", [2, 3, 6])
def test_pair_count_is_2v_minus_2(num_crops):
    """One-hot teacher (both global crops on prototype 0) and student crop v with −log P_s(v)_0 = c_v known in
    closed form: the loss is (Σ_{i∈{0,1}} Σ_{v≠i} c_v) / (2V − 2), no same-view pair."""
    k = 3
    teacher = torch.tensor([100.0, 0.0, 0.0]).expand(2, 1, k)  # P_t = one-hot(0) at τ_t = 0.04
    logits = [float(v) for v in range(num_crops)]  # student crop v: (v, 0, 0) at τ_s = 1
    student = torch.tensor([[[a, 0.0, 0.0]] for a in logits])
    c = [-(a - math.log(math.exp(a) + 2)) for a in logits]
    expected = sum(c[v] for i in range(2) for v in range(num_crops) if v != i) / (2 * num_crops - 2)
    got = dino_cross_entropy(student, teacher, torch.zeros(k), student_temp=1.0, teacher_temp=0.04)
    assert got.item() == pytest.approx(expected, rel=1e-6)
