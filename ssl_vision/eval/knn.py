"""Weighted k-nearest-neighbour classification on frozen features (docs/reference.md §10.1).

The protocol of InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978, ``test.py``) and DINO
(Caron et al. 2021, https://arxiv.org/abs/2104.14294, ``eval_knn.py``): L2-normalise train and test
features, take the top-k train neighbours of each test feature by cosine similarity ``s_j``, and give
class ``c`` the score ``Σ_j exp(s_j / T)·[y_j = c]``; the prediction is the arg-max.

The search is exact (``faiss.IndexFlatIP`` on unit vectors = cosine) and done once for ``max(ks)``;
every smaller k reuses the head of that sorted list. Everything runs on CPU in float32; callers gather
features from all ranks first (no distribution in here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify", "knn_accuracy"]

# exp() overflows float32 above ~88.72; the largest weight is exp(1/T) and up to k of them are summed.
_FLOAT32_LOG_MAX = 88.0
# Elements of the (rows, k, D) gather used to recompute similarities; bounds that temporary to 64 MiB.
_GATHER_BUDGET = 1 << 24
# faiss' exact search multiplies blocks of (<= 4096 queries) x (this many bank rows) and merges each block into the
# running top-k. At k = 200 the merge dominates faiss' default 1024-row blocks (~60% of the plain sgemm rate on a
# 1.28M bank); 8192 rows (a 128 MiB block) reach the sgemm rate (benchmarks/knn_bench.py; RESULTS.md, "kNN evaluation").
_FAISS_DATABASE_BLOCK = 8192


def _check_inputs(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor | None,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int,
) -> None:
    """Raise ValueError naming the first thing that is wrong with the arguments."""
    for what, f in (("train_features", train_features), ("test_features", test_features)):
        if f.ndim != 2:
            raise ValueError(f"knn: {what} must be 2-D (num_samples, dim), got shape {tuple(f.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("knn: the train set is empty (train_features has 0 rows)")
    if test_features.shape[0] == 0:
        raise ValueError("knn: the test set is empty (test_features has 0 rows)")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn: feature dims differ: train {train_features.shape[1]} vs test {test_features.shape[1]}")
    if num_classes < 1:
        raise ValueError(f"knn: num_classes must be >= 1, got {num_classes}")
    labelled = [("train_labels", train_labels, train_features.shape[0])]
    if test_labels is not None:
        labelled.append(("test_labels", test_labels, test_features.shape[0]))
    for what, y, n in labelled:
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"knn: {what} must have shape ({n},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"knn: {what} must be an integer tensor, got {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"knn: {what} must lie in [0, num_classes={num_classes}), found values in [{lo}, {hi}]")
    if len(ks) == 0 or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"knn: ks must be a non-empty sequence of positive integers, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0 (0.07 or 0.1 in the papers), got {temperature}")
    if 1.0 / temperature + math.log(max(ks)) > _FLOAT32_LOG_MAX:
        raise ValueError(
            f"knn: temperature={temperature} is too small: exp(1/T) summed over k={max(ks)} neighbours "
            "overflows float32; use T >= 0.02"
        )
    if chunk_size < 1:
        raise ValueError(f"knn: chunk_size must be >= 1, got {chunk_size}")


def _effective_ks(ks: Sequence[int], num_train: int) -> dict[int, int]:
    """Map each requested k to min(k, N), warning once if any k had to shrink."""
    too_big = sorted({int(k) for k in ks if k > num_train})
    if too_big:
        warnings.warn(
            f"knn: k={too_big} exceeds the {num_train} training samples; using k={num_train} "
            "(results stay keyed by the requested k)",
            stacklevel=4,  # _effective_ks <- _chunk_scores <- knn_* <- the caller
        )
    return {int(k): min(int(k), num_train) for k in ks}


def _rowwise_similarity(queries: Tensor, train: Tensor, idx: Tensor) -> Tensor:
    """(m, D), (N, D), (m, k) -> (m, k) with ``out[i, j] = queries[i] · train[idx[i, j]]``.

    Recomputed in torch rather than taken from faiss: faiss switches between BLAS and SIMD kernels
    depending on how many queries a call holds, so its similarities (and hence the votes) would change in
    the last bits with ``chunk_size``. A per-pair multiply-and-sum is the same computation for every
    chunking. Done in row blocks so the (rows, k, D) temporary stays bounded; that one buffer is reused (gather
    into it, multiply in place, sum into ``out``), which gives the same bits as ``(q[:, None] * train[idx]).sum(-1)``
    at about a third of the time (no fresh 64 MiB allocations to page in per block).
    """
    m, k = idx.shape
    dim = train.shape[1]
    rows = max(1, _GATHER_BUDGET // max(1, k * dim))
    out = torch.empty(m, k, dtype=torch.float32)
    buf = torch.empty(min(rows, m) * k, dim, dtype=train.dtype)
    for s in range(0, m, rows):
        part = idx[s : s + rows]
        n = part.shape[0]
        neigh = torch.index_select(train, 0, part.reshape(-1), out=buf[: n * k]).view(n, k, dim)  # (rows, k, D)
        torch.sum(neigh.mul_(queries[s : s + n, None, :]), dim=-1, out=out[s : s + n])
    return out


def _search(index: faiss.IndexFlatIP, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with bank blocks of ``_FAISS_DATABASE_BLOCK`` rows (faiss' global setting, restored after)."""
    before = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(before, _FAISS_DATABASE_BLOCK)
    try:
        return index.search(queries, k)
    finally:
        faiss.cvar.distance_compute_blas_database_bs = before


def _neighbours(train: Tensor, test: Tensor, k: int, chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield, per chunk of test rows, (sims (m, k), idx (m, k)) of the k most similar train rows.

    Rows are sorted by similarity descending; equal similarities are ordered by train index ascending,
    so the top-k for any smaller k is the head of this list and the order never depends on chunking.
    ``train`` and ``test`` must already be unit-norm float32 on CPU.
    """
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train.numpy()))
    for s in range(0, test.shape[0], chunk_size):
        q = test[s : s + chunk_size]
        _, found = _search(index, np.ascontiguousarray(q.numpy()), k)
        if (found < 0).any():  # faiss pads with -1 when it cannot rank a row, e.g. NaN features
            raise ValueError("knn: faiss found no neighbours for some test rows; are the features finite?")
        idx = torch.from_numpy(found).long().sort(dim=1).values  # canonical order before the stable sort
        sims = _rowwise_similarity(q, train, idx)
        sims, order = sims.sort(dim=1, descending=True, stable=True)
        yield sims, idx.gather(1, order)


def _vote(sims: Tensor, neighbour_labels: Tensor, k: int, temperature: float, num_classes: int) -> Tensor:
    """(m, K) sorted sims and labels -> (m, num_classes) scores ``Σ_{j<k} exp(s_j/T)·[y_j = c]``."""
    weights = (sims[:, :k] / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


def _prepare(train_features: Tensor, test_features: Tensor) -> tuple[Tensor, Tensor]:
    """L2-normalise both sides in float32 on CPU (faiss-cpu reads numpy)."""
    train = F.normalize(train_features.detach().float().cpu(), dim=1).contiguous()
    test = F.normalize(test_features.detach().float().cpu(), dim=1).contiguous()
    return train, test


def _chunk_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int,
) -> Iterator[dict[int, Tensor]]:
    """Yield ``{k: (m, num_classes) scores}`` for consecutive chunks of the test set (one faiss search)."""
    train, test = _prepare(train_features, test_features)
    labels = train_labels.detach().cpu().long()
    k_of = _effective_ks(ks, train.shape[0])
    k_max = max(k_of.values())
    for sims, idx in _neighbours(train, test, k_max, chunk_size):
        neighbour_labels = labels[idx]  # (m, k_max)
        yield {k: _vote(sims, neighbour_labels, k_eff, temperature, num_classes) for k, k_eff in k_of.items()}


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    ks: Sequence[int] = (200,),
    temperature: float = 0.1,
    chunk_size: int = 4096,
) -> dict[int, Tensor]:
    """Weighted-kNN class scores for every test feature and every k in ``ks``.

    Args:
        train_features: (N, D) any float dtype/device; L2-normalised here.
        train_labels: (N,) integers in [0, num_classes).
        test_features: (M, D).
        num_classes: C.
        ks: neighbour counts; a k > N is reduced to N (one warning) but the result stays keyed by k.
        temperature: T in ``exp(s/T)`` (InstDisc/DINO 0.07, lightly 0.1).
        chunk_size: test rows per faiss query; bounds memory, does not change the result.

    Returns:
        ``{k: (M, C) float32 CPU tensor}`` of scores ``Σ_{j ∈ top-k} exp(s_j/T)·[y_j = c]``.
    """
    _check_inputs(train_features, train_labels, test_features, None, num_classes, ks, temperature, chunk_size)
    parts: dict[int, list[Tensor]] = {int(k): [] for k in ks}
    for chunk in _chunk_scores(train_features, train_labels, test_features, num_classes, ks, temperature, chunk_size):
        for k, scores in chunk.items():
            parts[k].append(scores)
    return {k: torch.cat(p) for k, p in parts.items()}


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (200,),
    temperature: float = 0.1,
    chunk_size: int = 4096,
) -> dict[int, dict[str, float]]:
    """Weighted-kNN top-1 / top-5 accuracy in percent: ``{k: {"top1": %, "top5": %}}``.

    Arguments as :func:`knn_classify`, plus ``test_labels`` (M,). Top-5 means top-``min(5, C)``.
    Ties between class scores go to the lowest class index, deterministically: top-1 is ``torch.argmax``
    (first maximum) and top-5 uses a stable descending sort (``torch.topk`` makes no order promise for
    ties). Note that classes no neighbour voted for all tie at 0. Scores are accumulated per chunk, so
    memory stays at one chunk's (m, C) per k.
    """
    _check_inputs(train_features, train_labels, test_features, test_labels, num_classes, ks, temperature, chunk_size)
    y = test_labels.detach().cpu().long()
    top = min(5, num_classes)
    correct = {int(k): [0, 0] for k in ks}
    start = 0
    for chunk in _chunk_scores(train_features, train_labels, test_features, num_classes, ks, temperature, chunk_size):
        m = next(iter(chunk.values())).shape[0]
        target = y[start : start + m]
        for k, scores in chunk.items():
            correct[k][0] += int((scores.argmax(dim=1) == target).sum())
            ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :top]
            correct[k][1] += int((ranked == target[:, None]).any(dim=1).sum())
        start += m
    total = y.shape[0]
    return {k: {"top1": 100.0 * c1 / total, "top5": 100.0 * c5 / total} for k, (c1, c5) in correct.items()}
