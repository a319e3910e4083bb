"""Contrastive losses (SimCLR NT-Xent; MoCo InfoNCE and InstDisc NCE join them here).

Communication (gathering negatives across processes) is done by the caller with
:mod:`ssl_vision.distributed`; the functions take the already-gathered tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, z_a_all: torch.Tensor | None = None,
            z_b_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, https://arxiv.org/abs/2002.05709), mean over the 2N local anchors.

    Args:
        z_a, z_b: (N, D) projections of the two views of the local batch (any norm; normalised here).
        temperature: τ.
        z_a_all, z_b_all: (B, D) the same, gathered over all processes (B = N·W); default: the local ones.
        offset: index of the first local sample in the gathered set (N·rank).

    For anchor i of view a the positive is b_i; the denominator holds the positive and all 2B-2 other
    samples, only the anchor itself is excluded (the official code subtracts 1e9 from the self-logit).
    Computed with cross-entropy (log-softmax), so it is safe at low τ in half precision.
    Returns the mean of ℓ over the 2N local anchors (lightly/solo convention; the TF code reports 2×).
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    z_a_all = z_a if z_a_all is None else z_a_all
    z_b_all = z_b if z_b_all is None else z_b_all
    n, big_b = z_a.shape[0], z_a_all.shape[0]
    if big_b < 2:
        raise ValueError("nt_xent needs at least 2 samples in the (global) batch to have a negative")
    anchors = F.normalize(torch.cat([z_a, z_b]), dim=1)                   # (2N, D)
    keys = F.normalize(torch.cat([z_a_all, z_b_all]), dim=1)              # (2B, D)
    logits = anchors @ keys.T / temperature                               # (2N, 2B)
    local = torch.arange(n, device=z_a.device) + offset                   # global index of local sample
    self_idx = torch.cat([local, local + big_b])                          # where each anchor sits in keys
    pos_idx = torch.cat([local + big_b, local])                           # its other view
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * big_b).bool(), float("-inf"))
    return F.cross_entropy(logits.float(), pos_idx)
