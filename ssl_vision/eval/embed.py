"""A 2-D picture of a backbone's feature space: t-SNE (scikit-learn) or UMAP of test-split features by label.

Features come from :func:`ssl_vision.eval.features.extract_features` (eval mode, no grad, the eval transform) on a
fixed random subset of the test split, are L2-normalised (the geometry the kNN evaluation uses: euclidean
distance between unit vectors is a monotone function of cosine similarity) and mapped to 2-D.
t-SNE (van der Maaten & Hinton 2008): PCA init, ``learning_rate="auto"``, seeded; perplexity is lowered to
``(N - 1) / 3`` when N is too small for it (the result says so). UMAP (McInnes et al. 2018) runs when asked for
and ``umap`` (package ``umap-learn``) is importable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssl_vision.data import IndexedDataset, build_eval_transform
from ssl_vision.data.datasets import take_subset
from ssl_vision.eval.features import EvalData, build_eval_splits, extract_features, resolve_device

__all__ = ["METHODS", "CLASS_NAMES", "embed_2d", "sample_test_features", "plot_embedding", "embed_backbone"]

METHODS = ("tsne", "umap")
#: legend names for the data sets whose classes have well-known names
CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def embed_2d(
    features: Tensor,
    method: str = "tsne",
    perplexity: float = 30.0,
    seed: int = 0,
    n_neighbors: int = 15,
    threads: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, D) features -> ``((N, 2) float32 array, parameters used)``; rows are L2-normalised first.

    ``threads`` caps the OpenMP / BLAS threads (None: the libraries' default). On a busy machine 1 can be many
    times faster: scikit-learn's t-SNE gradient spins OpenMP threads that then wait for a free core."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(limits=threads):
        return _embed_2d(features, method, perplexity, seed, n_neighbors)


def _embed_2d(
    features: Tensor, method: str, perplexity: float, seed: int, n_neighbors: int
) -> tuple[np.ndarray, dict[str, Any]]:
    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r}; valid: {', '.join(METHODS)}")
    n = features.shape[0]
    if features.ndim != 2 or n < 4:
        raise ValueError(f"embed_2d needs (N, D) features with N >= 4, got shape {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=1).numpy()
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise ImportError(
                "embedding=umap needs the umap-learn package (pip install umap-learn); embedding=tsne works without it"
            ) from exc
        k = min(n_neighbors, n - 1)
        points = umap.UMAP(n_components=2, n_neighbors=k, random_state=seed).fit_transform(x)
        return np.asarray(points, dtype=np.float32), {"embedding": "umap", "n_neighbors": k}
    from sklearn.manifold import TSNE

    used = min(float(perplexity), (n - 1) / 3)  # sklearn needs perplexity < N; (N-1)/3 keeps 3·perplexity neighbours
    points = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)
    return np.asarray(points, dtype=np.float32), {
        "embedding": "tsne",
        "perplexity": used,
        "perplexity_asked": float(perplexity),
    }


def sample_test_features(
    backbone: nn.Module,
    data: EvalData,
    num_samples: int | None,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Features (n, D) and labels (n,) of a fixed random subset of ``num_samples`` test images (all if None)."""
    _, test = build_eval_splits(data)
    subset = take_subset(test, num_samples, seed)
    transform = build_eval_transform(data.image_size, data.in_chans, data.mean, data.std, data.eval_crop_ratio)
    loader = DataLoader(
        IndexedDataset(subset, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    dev = resolve_device(device)
    return extract_features(backbone.to(dev), loader, dev)


def plot_embedding(
    points: np.ndarray, labels: np.ndarray, path: Path, title: str, class_names: Sequence[str] | None = None
) -> None:
    """Scatter coloured by label (tab10 / tab20), one legend entry per class; written atomically as PNG."""
    import matplotlib
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend choice

    classes = np.unique(labels)
    colours = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[c] if class_names is not None and c < len(class_names) else str(int(c))
        ax.scatter(
            points[sel, 0], points[sel, 1], s=5, color=colours(i % colours.N), label=name, alpha=0.8, linewidths=0
        )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def embed_backbone(
    backbone: nn.Module,
    data: EvalData,
    png: Path | None,
    num_samples: int | None = 2000,
    method: str = "tsne",
    perplexity: float = 30.0,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    title: str = "",
    threads: int | None = None,
) -> dict[str, Any]:
    """Extract, embed and plot; returns ``{"points": (n, 2) array, "labels": (n,) array, "params": ...}``.

    ``png=None`` skips the plot (tools/embed_plot.py computes first, prints, then writes with :func:`plot_embedding`).
    """
    if method not in METHODS:  # before the (slow) extraction
        raise ValueError(f"unknown embedding method {method!r}; valid: {', '.join(METHODS)}")
    feats, labels = sample_test_features(backbone, data, num_samples, seed, batch_size, num_workers, device)
    points, params = embed_2d(feats, method, perplexity, seed, threads=threads)
    y = labels.numpy()
    if png is not None:
        plot_embedding(
            points, y, png, title or f"{method} of {len(y)} {data.name} test images", CLASS_NAMES.get(data.name)
        )
    return {"points": points, "labels": y, "params": params, "feature_dim": int(feats.shape[1])}
