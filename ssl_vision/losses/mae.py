"""MAE's reconstruction target and loss (He et al. 2021, https://arxiv.org/abs/2111.06377; docs/reference.md §9).

Pure tensor functions, layout as facebookresearch/mae ``models_mae.py``: a patch is flattened in (row, column,
channel) order, ``p·p·C`` values, and patches are numbered row-major over the ``h × w`` grid.
"""

from __future__ import annotations

import torch

#: MAE's ``norm_pix_loss`` epsilon: ``(x − μ) / sqrt(σ² + 1e-6)``.
NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (N, C, H, W) -> patches (N, L, p·p·C), L = (H/p)·(W/p), each patch in (row, column, channel) order.

    ``out[n, i·w + j, (u·p + v)·C + c] == imgs[n, c, i·p + u, j·p + v]`` (MAE's ``nchpwq -> nhwpqc``).
    """
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, L, p·p·C) with L = gh·gw -> images (N, C, gh·p, gw·p)."""
    n, length, dim = patches.shape
    gh, gw = grid
    p, c = patch_size, in_chans
    if length != gh * gw or dim != p * p * c:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit grid {gh}x{gw}, patch_size={p}, "
            f"in_chans={c}: expected (N, {gh * gw}, {p * p * c})"
        )
    x = patches.reshape(n, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, gh * p, gw * p)


def patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's own mean and variance over its p·p·C values: (N, L, P) -> ((N, L, 1), (N, L, 1)).

    The variance is the *unbiased* one (``Tensor.var`` default), exactly as MAE's ``forward_loss``.
    """
    if target.shape[-1] < 2:
        raise ValueError(f"norm_pix_loss needs patches of at least 2 values to standardise, got {target.shape[-1]}")
    return target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)


def normalize_patches(target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """``norm_pix_loss`` target: each patch standardised by its own statistics, ``(x − μ)/sqrt(σ² + eps)``.

    (N, L, P) -> (N, L, P). MAE reports better representations with this target (Table 1d).
    """
    mean, var = patch_stats(target)
    return (target - mean) / (var + eps).sqrt()


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = NORM_PIX_EPS
) -> torch.Tensor:
    """MAE loss: per-patch MSE averaged over the **masked** patches only.

    ``L = Σ_{n,i} M_{n,i} · mean_d (pred − t)²_{n,i,d} / Σ_{n,i} M_{n,i}`` with ``t`` the patchified image,
    standardised per patch when ``norm_pix`` (docs/reference.md §9). Predictions for visible patches do not enter:
    the pitfall "loss over all patches" makes the task partly copying and hurts the representation.

    pred, target: (N, L, P); mask: (N, L), 1 = removed (predicted), 0 = visible. Returns a scalar.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (N, L) = {tuple(pred.shape[:2])}")
    if norm_pix:
        target = normalize_patches(target, eps)
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (N, L)
    mask = mask.to(per_patch.dtype)
    # no emptiness check here (it would cost a device sync per step): the objective guarantees L − keep >= 1
    return (per_patch * mask).sum() / mask.sum()
