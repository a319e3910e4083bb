"""MoCo's contrastive losses: InfoNCE against a key queue (v1/v2) and against the global batch of keys (v3).

Pure functions of tensors; gathering keys across processes is the caller's job (:mod:`ssl_vision.distributed`).
Logits are computed in float32 even under autocast: at τ = 0.07 a bf16 rounding error of the similarity is a
several-percent error in exp(·).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v1/v2 InfoNCE (He et al. 2019, https://arxiv.org/abs/1911.05722, eq. 1), mean over the N queries.

    ``ℓ_i = −log exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·queue_j/τ))``: logits ``[l_pos, l_neg] / τ`` with
    the positive in column 0, cross-entropy with label 0 (``moco/builder.py``).

    Args:
        q: (N, D) queries (normalised here; gradient flows through them).
        k: (N, D) positive keys, k_i for q_i (normalised here; no gradient should reach them).
        queue: (D, K) negative keys, already L2-normalised, one per column (a detached copy of the queue).
        temperature: τ > 0.
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"info_nce expects q and k of equal shape (N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[0] != q.shape[1]:
        raise ValueError(f"info_nce expects the queue as (D={q.shape[1]}, K), got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.float()  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive sits in column 0
    return F.cross_entropy(logits, labels)


def moco_v3_contrastive(q: torch.Tensor, k_all: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """MoCo v3 ``ctr(q, k)`` (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057, Alg. 1), local mean × 2τ.

    ``CE(n(q)·n(k_all)ᵀ / τ, labels = arange(N) + offset) · 2τ``: the positive of query i is key ``offset + i`` of
    the gathered batch, every other key of the *global* batch is a negative. The ``2τ`` factor (official code)
    makes the gradient magnitude roughly independent of τ.

    Args:
        q: (N, D) this process's predictor outputs (normalised here).
        k_all: (B, D) momentum-encoder outputs of the other view, gathered over processes in rank order, no grad.
        temperature: τ > 0.
        offset: global index of the first local sample, ``N·rank`` (without it every rank would treat the first N
            keys as its positives).
    """
    if q.ndim != 2 or k_all.ndim != 2 or q.shape[1] != k_all.shape[1]:
        raise ValueError(
            f"moco_v3_contrastive expects q (N, D) and k_all (B, D), got {tuple(q.shape)} and {tuple(k_all.shape)}"
        )
    n = q.shape[0]
    if not 0 <= offset <= k_all.shape[0] - n:
        raise ValueError(f"moco_v3_contrastive: offset {offset} + N={n} exceeds the {k_all.shape[0]} gathered keys")
    if temperature <= 0:
        raise ValueError(f"moco_v3_contrastive: temperature must be > 0, got {temperature}")
    logits = F.normalize(q.float(), dim=1) @ F.normalize(k_all.float(), dim=1).T / temperature  # (N, B)
    labels = torch.arange(n, device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2.0 * temperature)
