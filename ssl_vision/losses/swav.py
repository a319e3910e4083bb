"""SwAV's losses (Caron et al. 2020, https://arxiv.org/abs/2006.09882; facebookresearch/swav ``main_swav.py``).

* :func:`sinkhorn_knopp` -- equipartitioned soft codes from prototype scores (no gradient, float32).
* :func:`swapped_prediction` -- predict each assigned crop's code from every other crop.

Both are pure tensor functions. The distributed Sinkhorn needs sums over all processes *inside* its iterations,
so the caller injects the all-reduce (``ssl_vision.distributed.all_reduce_sum``) and the world size; with the
defaults (identity, 1) it is the single-process algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
    world_size: int = 1,
) -> torch.Tensor:
    """Soft assignment of N local samples to K prototypes with equal prototype mass over the *global* batch.

    Algorithm of docs/reference.md §5 (official ``distributed_sinkhorn``), on ``Q = exp(scores/ε)ᵀ`` (K × N):
    ``Q /= ΣQ`` (global); ``iterations`` × [rows: ``Q /= global row sums``, ``Q /= K``; columns (local, each sample
    is on one process): ``Q /= column sums``, ``Q /= B``]; finally ``Q *= B`` so every sample's code sums to 1.
    ``B = N · world_size`` is the global number of rows to assign (queue rows included), so ranks must all pass
    the same N.

    Args:
        scores: (N, K) prototype scores (cosine similarities in SwAV, so ``exp(1/ε)`` stays finite in float32).
        epsilon: ε, the entropy regularisation (0.05); smaller = sharper codes. ``exp(1/0.05) ≈ 4.9e8`` overflows
            fp16, which is why the computation is always float32 here, whatever the input dtype.
        iterations: number of Sinkhorn iterations (3 in SwAV).
        all_reduce_sum: sums a tensor over processes (identity on one process).
        world_size: number of processes W.

    Returns:
        (N, K) float32 codes, each row summing to 1; over the global batch each column sums to ≈ B/K
        (exactly in the limit of many iterations; the last normalisation is the per-sample one).
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (N, K) scores, got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0 (SwAV: 0.05), got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1 (SwAV: 3), got {iterations}")
    q = torch.exp(scores.float() / epsilon).t()  # (K, N)
    k, b = q.shape[0], q.shape[1] * world_size
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets total mass 1/K ...
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # ... each sample total mass 1/B
        q /= b
    q *= b  # codes: every sample's column sums to 1
    return q.t()


def swapped_prediction(
    scores: torch.Tensor, codes: torch.Tensor, assigned: Sequence[int], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV's swapped prediction loss (docs/reference.md §5).

    ``L = (1/|A|) Σ_{s∈A} (1/(V−1)) Σ_{t≠s} mean_b[ −Σ_k q_{s,b,k} · log softmax(scores_{t,b}/τ)_k ]``

    Args:
        scores: (V, N, K) prototype scores ``z·Cᵀ`` of all V crops (with gradient).
        codes: (|A|, N, K) Sinkhorn codes of the assigned crops (no gradient), in the order of ``assigned``.
        assigned: the crop indices that received codes (SwAV: the two global crops, ``[0, 1]``).
        temperature: τ of the prediction softmax (0.1).

    Returns a scalar (float32).
    """
    if scores.ndim != 3 or codes.ndim != 3 or codes.shape[1:] != scores.shape[1:]:
        raise ValueError(
            f"swapped_prediction expects scores (V, N, K) and codes (A, N, K) with matching N, K; got "
            f"{tuple(scores.shape)} and {tuple(codes.shape)}"
        )
    num_crops = scores.shape[0]
    if len(assigned) != codes.shape[0] or num_crops < 2:
        raise ValueError(
            f"need one code tensor per assigned crop and >= 2 crops; got {len(assigned)} assigned "
            f"crops, {codes.shape[0]} code tensors, {num_crops} crops"
        )
    if any(not 0 <= s < num_crops for s in assigned):
        raise ValueError(f"assigned crop indices {list(assigned)} must lie in [0, {num_crops})")
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)  # (V, N, K)
    total = scores.new_zeros((), dtype=torch.float32)
    for q, s in zip(codes.float(), assigned):
        others = [t for t in range(num_crops) if t != s]
        # mean over the other crops and the batch of the cross-entropy with the code of crop s
        total = total - (q.unsqueeze(0) * log_p[others]).sum(-1).mean()
    return total / len(assigned)
