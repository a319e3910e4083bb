"""Contrastive losses (SimCLR NT-Xent; MoCo InfoNCE and InstDisc NCE join them here).

Communication (gathering negatives across processes) is done by the caller with
:mod:`ssl_vision.distributed`; the functions take the already-gathered tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    z_a_all: torch.Tensor | None = None,
    z_b_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
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
        raise ValueError(
            f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    z_a_all = z_a if z_a_all is None else z_a_all
    z_b_all = z_b if z_b_all is None else z_b_all
    n, big_b = z_a.shape[0], z_a_all.shape[0]
    if big_b < 2:
        raise ValueError("nt_xent needs at least 2 samples in the (global) batch to have a negative")
    anchors = F.normalize(torch.cat([z_a, z_b]), dim=1)  # (2N, D)
    keys = F.normalize(torch.cat([z_a_all, z_b_all]), dim=1)  # (2B, D)
    logits = anchors @ keys.T / temperature  # (2N, 2B)
    local = torch.arange(n, device=z_a.device) + offset  # global index of local sample
    self_idx = torch.cat([local, local + big_b])  # where each anchor sits in keys
    pos_idx = torch.cat([local + big_b, local])  # its other view
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * big_b).bool(), float("-inf"))
    return F.cross_entropy(logits.float(), pos_idx)


def multi_positive_nt_xent(
    z_local: torch.Tensor, temperature: float, z_all: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """NT-Xent for V ≥ 2 views (multi-crop SimCLR, solo-learn's ``simclr_loss_func`` with indexes).

    Every other view of the same image is a positive: for anchor (v, i),
    ``ℓ = −log( Σ_{v'≠v} exp(s(z_vi, z_v'i)/τ) / Σ_{(v',j)≠(v,i)} exp(s(z_vi, z_v'j)/τ) )``, mean over the V·N
    local anchors. With V = 2 this is exactly :func:`nt_xent`.

    Args:
        z_local: (V, N, D) projections of this process's V views.
        temperature: τ.
        z_all: (V, B, D) the same gathered over processes (B = N·W, rank order); default: the local ones.
        offset: global index of the first local sample (N·rank).
    """
    if z_local.ndim != 3 or z_local.shape[0] < 2:
        raise ValueError(f"multi_positive_nt_xent expects (V, N, D) with V >= 2 views, got {tuple(z_local.shape)}")
    z_all = z_local if z_all is None else z_all
    v, n, _ = z_local.shape
    big_b = z_all.shape[1]
    anchors = F.normalize(z_local.reshape(v * n, -1), dim=1)  # (V·N, D), view-major
    keys = F.normalize(z_all.reshape(v * big_b, -1), dim=1)  # (V·B, D), view-major
    logits = (anchors @ keys.T).float() / temperature  # (V·N, V·B)
    local = torch.arange(n, device=z_local.device) + offset
    sample_of_key = torch.arange(v * big_b, device=z_local.device) % big_b
    view_of_anchor = torch.arange(v, device=z_local.device).repeat_interleave(n)
    view_of_key = torch.arange(v * big_b, device=z_local.device) // big_b
    same_sample = sample_of_key[None, :] == local.repeat(v)[:, None]  # (V·N, V·B)
    self_mask = same_sample & (view_of_key[None, :] == view_of_anchor[:, None])
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_denominator = torch.logsumexp(logits, dim=1)
    log_positives = torch.logsumexp(logits.masked_fill(~same_sample, float("-inf")), dim=1)
    return (log_denominator - log_positives).mean()
