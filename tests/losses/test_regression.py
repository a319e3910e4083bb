"""ssl_vision/losses/regression.py: BYOL's ``2 − 2cos`` (eq. 2) and SimSiam's negative cosine (eq. 2) against the
formulas written out here, their range, scale invariance, stop-gradient and shape checks."""

import math

import pytest
import torch

from ssl_vision.losses.regression import (
    byol_loss,
    neg_cosine,
    regression_loss,
    simsiam_loss,
)


# ------------------------------------------------------------------------------------------------ BYOL
def two_minus_two_cos_by_formula(p, z):
    """BYOL eq. 2 written out: per sample 2 − 2·<p, z>/(‖p‖·‖z‖), in double precision."""
    out = []
    for pi, zi in zip(p.double(), z.double()):
        cos = float(pi @ zi) / (math.sqrt(float(pi @ pi)) * math.sqrt(float(zi @ zi)))
        out.append(2.0 - 2.0 * cos)
    return out


def byol_by_formula(p1, p2, z1, z2):
    """mean_b[ℓ(p1_b, z2_b) + ℓ(p2_b, z1_b)]: each prediction regresses the *other* view's target."""
    a, b = two_minus_two_cos_by_formula(p1, z2), two_minus_two_cos_by_formula(p2, z1)
    return sum(x + y for x, y in zip(a, b)) / len(a)


def test_regression_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g) for _ in range(4))
    assert byol_loss(p1, p2, z1, z2).item() == pytest.approx(byol_by_formula(p1, p2, z1, z2), rel=1e-5)
    assert regression_loss(p1, z2).item() == pytest.approx(sum(two_minus_two_cos_by_formula(p1, z2)) / 5, rel=1e-5)


def test_regression_loss_range_and_scale_invariance():
    z = torch.randn(4, 3)
    assert byol_loss(z, z, z, z).item() == pytest.approx(0.0, abs=1e-6)  # perfect prediction
    assert byol_loss(-z, -z, z, z).item() == pytest.approx(8.0, abs=1e-5)  # opposite: 4 per direction
    assert regression_loss(5 * z, z).item() == pytest.approx(0.0, abs=1e-6)  # only the direction counts


def test_regression_loss_stops_gradient_into_target():
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    regression_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_regression_loss_bad_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        regression_loss(torch.randn(4, 3), torch.randn(4, 5))


# ------------------------------------------------------------------------------------------------ SimSiam
def cosines_by_formula(p, z):
    """cos(p_b, z_b) = <p, z>/(‖p‖·‖z‖) per sample, in double precision."""
    return [
        float(pi @ zi) / (math.sqrt(float(pi @ pi)) * math.sqrt(float(zi @ zi)))
        for pi, zi in zip(p.double(), z.double())
    ]


def simsiam_by_formula(p1, p2, z1, z2):
    """SimSiam eq. 2: L = ½·D(p1, z2) + ½·D(p2, z1), D(p, z) = −mean_b cos(p_b, z_b)."""
    d12, d21 = cosines_by_formula(p1, z2), cosines_by_formula(p2, z1)
    return 0.5 * -sum(d12) / len(d12) + 0.5 * -sum(d21) / len(d21)


def test_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g) for _ in range(4))
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(simsiam_by_formula(p1, p2, z1, z2), rel=1e-5)
    assert neg_cosine(p1, z2).item() == pytest.approx(-sum(cosines_by_formula(p1, z2)) / 5, rel=1e-5)


def test_loss_hand_made_values():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert simsiam_loss(e1, e1, 2 * e1, 2 * e1).item() == pytest.approx(-1.0)  # minimum −1: p ∥ z
    assert simsiam_loss(e1, e1, e2, e2).item() == pytest.approx(0.0, abs=1e-7)  # orthogonal
    assert simsiam_loss(e1, e1, -e1, -e1).item() == pytest.approx(1.0)  # opposite


def test_stop_gradient_on_z():
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    neg_cosine(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None
