#!/usr/bin/env python
"""t-SNE / UMAP picture of a frozen backbone's test features: ``python tools/embed_plot.py checkpoint=<path>``.

Options (conf/embed.yaml): ``embedding=tsne|umap num_samples=2000 perplexity=30 seed=0 use_teacher=true device=auto``;
data from the checkpoint unless ``data=<name>`` or ``+data.root=/path``. Writes ``<checkpoint stem>.<embedding>.png``
and ``<checkpoint stem>.<embedding>.json`` (points, labels, parameters) beside the checkpoint (older ones are kept
renamed) and prints a one-line JSON summary last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssl_vision.eval.checkpoints import beside, keep_existing, load_backbone, write_json_keeping_old  # noqa: E402
from ssl_vision.eval.embed import METHODS, embed_backbone  # noqa: E402
from ssl_vision.eval.features import resolve_eval_data  # noqa: E402


def run(cfg: DictConfig) -> dict:
    """Embed and plot; returns the written JSON's content (``points`` (N, 2) and ``labels`` (N,) as lists)."""
    if cfg.embedding not in METHODS:
        raise ValueError(f"unknown embedding {cfg.embedding!r}; valid: {', '.join(METHODS)}")
    ckpt = Path(cfg.checkpoint)
    backbone, _, info = load_backbone(ckpt, cfg.expect_backbone, cfg.use_teacher)
    kw = info["create_kwargs"]
    data = resolve_eval_data(info["data"], OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else None,
                             kw["in_chans"], kw["image_size"])
    png, side = beside(ckpt, f".{cfg.embedding}.png"), beside(ckpt, f".{cfg.embedding}.json")
    keep_existing(png)
    title = f"{cfg.embedding}: {info['method']} {info['backbone']} ({info['weights']}), {data.name} test"
    res = embed_backbone(backbone, data, png, cfg.num_samples, cfg.embedding, cfg.perplexity, cfg.seed,
                         cfg.batch_size, cfg.num_workers, cfg.device, title, cfg.threads)
    payload = {"checkpoint": str(ckpt.resolve()), "method": info["method"], "backbone": info["backbone"],
               "weights": info["weights"], "global_step": info["global_step"], "data": data.name, "split": "test",
               "num_points": int(len(res["labels"])), "feature_dim": res["feature_dim"], **res["params"],
               "seed": int(cfg.seed), "png": str(png.resolve()),
               "points": [[round(float(a), 5), round(float(b), 5)] for a, b in res["points"]],
               "labels": [int(y) for y in res["labels"]]}
    write_json_keeping_old(side, payload)
    print(f"[ssl_vision] wrote {png} and {side}")
    print(json.dumps({k: v for k, v in payload.items() if k not in ("points", "labels")}), flush=True)
    return payload


@hydra.main(config_path="../conf", config_name="embed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
