#!/usr/bin/env python
"""t-SNE / UMAP picture of a frozen backbone's test features: ``python tools/embed_plot.py checkpoint=<path>``.

Options (conf/embed.yaml): ``embedding=tsne|umap num_samples=2000 perplexity=30 seed=0 use_teacher=true device=auto``;
data from the checkpoint unless ``data=<name>`` or ``+data.root=/path``. Writes ``<checkpoint stem>.<embedding>.png``
and ``<checkpoint stem>.<embedding>.json`` (points, labels, parameters) beside the checkpoint, or into
``output_dir=<folder>`` (older ones are kept renamed), and prints a one-line JSON summary last -- also when the files
cannot be written (a read-only checkpoint directory), before the error that says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssl_vision.cli import CHECKPOINT_EXAMPLE, require  # noqa: E402
from ssl_vision.eval.checkpoints import load_backbone  # noqa: E402
from ssl_vision.run_record import keep_previous  # noqa: E402
from ssl_vision.eval.embed import CLASS_NAMES, METHODS, embed_backbone, plot_embedding  # noqa: E402
from ssl_vision.eval.features import resolve_eval_data  # noqa: E402
from ssl_vision.eval.outputs import (
    exit_on_unwritable_output,
    output_path,
    publish,
    warn_if_unwritable,  # noqa: E402
    write_result_json,
)


def run(cfg: DictConfig) -> dict:
    """Embed and plot; returns the written JSON's content (``points`` (N, 2) and ``labels`` (N,) as lists).

    Computes first, then writes the PNG and JSON (beside the checkpoint or in ``output_dir``); the summary line is
    printed last, also when the files cannot be written (the error naming ``output_dir=`` follows)."""
    if cfg.embedding not in METHODS:
        raise ValueError(f"unknown embedding {cfg.embedding!r}; valid: {', '.join(METHODS)}")
    ckpt = Path(cfg.checkpoint)
    png = output_path(ckpt, f".{cfg.embedding}.png", cfg.output_dir)
    side = png.with_suffix(".json")
    warn_if_unwritable(png, cfg.output_dir is not None)
    backbone, _, info = load_backbone(ckpt, cfg.expect_backbone, cfg.use_teacher)
    kw = info["create_kwargs"]
    data = resolve_eval_data(
        info["data"],
        OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else None,
        kw["in_chans"],
        kw["image_size"],
    )
    title = f"{cfg.embedding}: {info['method']} {info['backbone']} ({info['weights']}), {data.name} test"
    res = embed_backbone(
        backbone,
        data,
        None,
        cfg.num_samples,
        cfg.embedding,
        cfg.perplexity,
        cfg.seed,
        cfg.batch_size,
        cfg.num_workers,
        cfg.device,
        title,
        cfg.threads,
    )
    payload = {
        "checkpoint": str(ckpt.resolve()),
        "method": info["method"],
        "backbone": info["backbone"],
        "weights": info["weights"],
        "global_step": info["global_step"],
        "data": data.name,
        "split": "test",
        "num_points": int(len(res["labels"])),
        "feature_dim": res["feature_dim"],
        **res["params"],
        "seed": int(cfg.seed),
        "png": str(png.resolve()),
        "points": [[round(float(a), 5), round(float(b), 5)] for a, b in res["points"]],
        "labels": [int(y) for y in res["labels"]],
    }

    def write() -> None:
        png.parent.mkdir(parents=True, exist_ok=True)
        keep_previous(png)
        plot_embedding(res["points"], res["labels"], png, title, CLASS_NAMES.get(data.name))
        write_result_json(side, payload)

    summary = json.dumps({k: v for k, v in payload.items() if k not in ("points", "labels")})
    publish(summary, write, png, cfg.output_dir is not None, wrote=[png, side])
    return payload


@hydra.main(config_path="../conf", config_name="embed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    require(cfg, "checkpoint", "the pretraining checkpoint or exported backbone to draw", CHECKPOINT_EXAMPLE)
    with exit_on_unwritable_output():
        run(cfg)


if __name__ == "__main__":
    main()
