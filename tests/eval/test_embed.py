"""tools/embed_plot.py: a t-SNE PNG + side JSON with one point per sampled test image (labels checked against the
subset drawn here), t-SNE keeping well-separated clusters apart, and the UMAP / argument errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vision.data import build_dataset
from ssl_vision.eval.embed import embed_2d
from tests.eval.test_features import DATA_CFG, tiny_backbone, write_checkpoint
from tests.eval.test_tools import compose_cfg, load_tool


def subset_labels(n: int, seed: int = 0) -> list[int]:
    """Labels of the test subset the tool should draw: a seeded permutation's first n indices, sorted."""
    test = build_dataset(
        "synthetic", "test", None, image_size=16, in_chans=3, num_classes=4, synthetic_size=DATA_CFG["synthetic_size"]
    )
    idx = sorted(torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [int(test[i][1]) for i in idx]


def test_tsne_tool_writes_png_and_points(tmp_path):
    ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    tool = load_tool("embed_plot")
    base = [f"checkpoint={ckpt}", "num_workers=0", "device=cpu", "threads=1"]
    res = tool.run(compose_cfg("embed", [*base, "num_samples=20"]))
    side = json.loads((tmp_path / "last.tsne.json").read_text())
    assert side == res
    assert side["num_points"] == 20 and len(side["points"]) == 20 and len(side["labels"]) == 20
    assert side["labels"] == subset_labels(20)
    assert np.isfinite(np.array(side["points"])).all() and np.array(side["points"]).shape == (20, 2)
    assert (side["embedding"], side["perplexity"], side["perplexity_asked"]) == ("tsne", 19 / 3, 30.0)
    assert (side["method"], side["data"], side["split"], side["feature_dim"]) == ("simclr", "synthetic", "test", 64)
    with Image.open(tmp_path / "last.tsne.png") as im:
        im.verify()
    with Image.open(tmp_path / "last.tsne.png") as im:
        assert im.format == "PNG" and min(im.size) > 200

    everything = tool.run(compose_cfg("embed", [*base, "num_samples=null", "perplexity=5"]))
    assert everything["num_points"] == 24 and everything["perplexity"] == 5.0  # the whole test split
    assert len(list(tmp_path.glob("last.tsne.2*.json"))) == 1 and len(list(tmp_path.glob("last.tsne.2*.png"))) == 1

    with pytest.raises(ValueError, match="unknown embedding 'pca'; valid: tsne, umap"):
        tool.run(compose_cfg("embed", [*base, "embedding=pca"]))
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(ImportError, match="umap-learn"):
            tool.run(compose_cfg("embed", [*base, "embedding=umap", "num_samples=20"]))


def test_tsne_keeps_separated_clusters_apart():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 16) * 10  # three orthogonal directions: far apart after L2 normalisation too
    y = torch.arange(60) % 3
    feats = centers[y] + 0.3 * torch.randn(60, 16, generator=g)
    points, params = embed_2d(feats, "tsne", perplexity=10, seed=0, threads=1)
    assert points.shape == (60, 2) and params["perplexity"] == 10
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y.numpy()[d.argmin(1)] == y.numpy()).all()  # every point's 2-D nearest neighbour shares its label
    with pytest.raises(ValueError, match="N >= 4"):
        embed_2d(feats[:3])
