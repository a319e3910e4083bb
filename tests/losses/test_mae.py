"""ssl_vision/losses/mae.py: patchify's layout and round trip, the masked MSE (with and without norm_pix) against
the formula written out here, the per-patch standardised target."""

import math

import pytest
import torch

from ssl_vision.losses.mae import masked_mse, normalize_patches, patchify, unpatchify


def patchify_by_loops(imgs, p):
    """patch (i, j) of an h x w grid is token i·w + j; inside it, value (u, v, c) sits at (u·p + v)·C + c."""
    n, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    out = torch.empty(n, h * w, p * p * c)
    for i in range(h):
        for j in range(w):
            for u in range(p):
                for v in range(p):
                    for ch in range(c):
                        out[:, i * w + j, (u * p + v) * c + ch] = imgs[:, ch, i * p + u, j * p + v]
    return out


def masked_mse_by_formula(pred, target, mask, norm_pix):
    """L = Σ_{n,i} M_ni · mean_d (pred − t)² / Σ M, t standardised per patch with the unbiased variance + 1e-6."""
    total, count = 0.0, 0.0
    for n in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            t = target[n, i].double()
            if norm_pix:
                mu = t.sum() / t.numel()
                var = ((t - mu) ** 2).sum() / (t.numel() - 1)
                t = (t - mu) / math.sqrt(var + 1e-6)
            err = ((pred[n, i].double() - t) ** 2).mean()
            total += float(mask[n, i]) * float(err)
            count += float(mask[n, i])
    return total / count


def test_patchify_layout_and_round_trip():
    for c, h, w, p in [(3, 8, 12, 4), (1, 28, 28, 7), (3, 6, 6, 2)]:
        imgs = torch.randn(2, c, h, w)
        patches = patchify(imgs, p)
        assert patches.shape == (2, (h // p) * (w // p), p * p * c)
        torch.testing.assert_close(patches, patchify_by_loops(imgs, p), rtol=0, atol=0)
        torch.testing.assert_close(unpatchify(patches, p, (h // p, w // p), c), imgs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        patchify(torch.randn(1, 3, 10, 10), 4)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_matches_formula_and_ignores_visible_patches(norm_pix):
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 6, 12, generator=g), torch.randn(2, 6, 12, generator=g) * 3 + 1
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.float32)
    loss = masked_mse(pred, target, mask, norm_pix=norm_pix)
    assert loss.item() == pytest.approx(masked_mse_by_formula(pred, target, mask, norm_pix), rel=1e-5)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible predictions are not part of the loss
    assert masked_mse(changed, target, mask, norm_pix=norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[0, 0] += 1.0  # a masked prediction is
    assert masked_mse(changed, target, mask, norm_pix=norm_pix).item() != pytest.approx(loss.item(), rel=1e-6)


def test_norm_pix_target_is_each_patch_standardised():
    t = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mu, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # unbiased, as Tensor.var in MAE
    expected = torch.tensor([[[(v - mu) / math.sqrt(var + 1e-6) for v in (1.0, 2.0, 3.0, 6.0)]]])
    torch.testing.assert_close(normalize_patches(t), expected)
