"""Non-contrastive regression losses: BYOL's normalised MSE and SimSiam's negative cosine.

Both compare a prediction ``p`` of one view with a stop-gradient target ``z`` of the other view. The
stop-gradient is part of the loss definition (``sg(z)`` in docs/reference.md §6 and §7), so it is applied here: no
gradient ever flows into ``z``, whatever the caller did. Nothing is gathered across processes: each loss is a
per-sample quantity averaged over the local batch, and DDP's gradient average gives the global-batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(p: torch.Tensor, z: torch.Tensor, fn: str) -> None:
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(
            f"{fn} expects prediction and target of equal shape (N, D), got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    if p.shape[0] == 0:
        raise ValueError(f"{fn} got an empty batch")


def cosine_to_target(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``cos(p, sg(z))``, (N, D), (N, D) -> (N,), computed in float32.

    A zero vector normalises to zero (F.normalize's eps), so its cosine is 0 rather than NaN.
    """
    return (F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``ℓ(p, z) = ‖n(p) − n(sg(z))‖² = 2 − 2·cos(p, z)``, averaged over the batch.

    Grill et al. 2020, https://arxiv.org/abs/2006.07733, eq. 2. (N, D), (N, D) -> scalar in [0, 4].
    """
    _check_pair(p, z, "regression_loss")
    return (2.0 - 2.0 * cosine_to_target(p, z)).mean()


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss ``mean_b[ℓ(p1, sg z2) + ℓ(p2, sg z1)]`` (range 0–8, as the official code reports it).

    p1, p2: (N, D) online predictions of views 1 and 2; z1, z2: (N, D) target projections of views 1 and 2.
    Each prediction regresses the target of the *other* view.
    """
    return regression_loss(p1, z2) + regression_loss(p2, z1)


def neg_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = −cos(p, sg(z))`` averaged over the batch. (N, D), (N, D) -> scalar in [−1, 1].

    Chen & He 2021, https://arxiv.org/abs/2011.10566, eq. 1.
    """
    _check_pair(p, z, "neg_cosine")
    return -cosine_to_target(p, z).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss ``½·D(p1, z2) + ½·D(p2, z1)`` (minimum −1; reaching it early means collapse).

    p1, p2: (N, D) predictor outputs of views 1 and 2; z1, z2: (N, D) projector outputs (stop-gradient here).
    """
    return 0.5 * neg_cosine(p1, z2) + 0.5 * neg_cosine(p2, z1)
