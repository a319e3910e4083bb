#!/usr/bin/env python
"""Weighted kNN of a frozen backbone (docs/reference.md §10.1): ``python tools/knn_eval.py checkpoint=<path>``.

Options (conf/knn.yaml): ``ks=[200,10,20,100] temperature=0.1 use_teacher=true batch_size=... num_workers=...
device=auto train_subset=... subset_seed=... expect_backbone=resnet18``: by default the protocol of the online kNN
(``conf/pretrain.yaml`` ``eval``) on the full train split as the bank; data from the checkpoint unless
``data=<name>`` or ``+data.root=/path``. Every k comes from one faiss search. Prints top-1 / top-5 per k, writes
``<checkpoint stem>.knn.json`` beside the checkpoint, or into ``output_dir=<folder>`` (an existing one is kept
renamed), and prints that JSON as the last line of stdout -- also when the file cannot be written (a read-only
checkpoint directory), before the error that says so.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssl_vision.cli import CHECKPOINT_EXAMPLE, require  # noqa: E402
from ssl_vision.eval.checkpoints import load_backbone  # noqa: E402
from ssl_vision.eval.features import (
    build_eval_loaders,
    extract_features,
    resolve_device,  # noqa: E402
    resolve_eval_data,
)
from ssl_vision.eval.knn import knn_accuracy  # noqa: E402
from ssl_vision.eval.online import knn_protocol  # noqa: E402
from ssl_vision.eval.outputs import (
    exit_on_unwritable_output,
    output_path,
    publish,
    warn_if_unwritable,  # noqa: E402
    write_result_json,
)


def evaluate(cfg: DictConfig) -> dict:
    ckpt = Path(cfg.checkpoint)
    backbone, dim, info = load_backbone(ckpt, cfg.expect_backbone, cfg.use_teacher)
    kw = info["create_kwargs"]
    data = resolve_eval_data(
        info["data"],
        OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else None,
        kw["in_chans"],
        kw["image_size"],
    )
    device = resolve_device(cfg.device)
    # a train_subset is drawn as the run drew its online kNN bank (data.knn_train_subset): same seed, same images
    seed = cfg.subset_seed if cfg.subset_seed is not None else (info.get("seed") or 0)
    train_loader, test_loader = build_eval_loaders(
        data, cfg.batch_size, cfg.num_workers, cfg.train_subset, seed=int(seed)
    )
    t0 = time.perf_counter()
    backbone.to(device)
    progress = cfg.get("progress", "auto")  # bars on stderr when it is a terminal, or progress=true
    train_f, train_y = extract_features(backbone, train_loader, device, progress, desc="features train")
    test_f, test_y = extract_features(backbone, test_loader, device, progress, desc="features test")
    t1 = time.perf_counter()
    ks = [int(k) for k in cfg.ks]
    acc = knn_accuracy(
        train_f,
        train_y,
        test_f,
        test_y,
        data.num_classes,
        ks=ks,
        temperature=cfg.temperature,
        chunk_size=cfg.chunk_size,
    )
    return {
        "checkpoint": str(ckpt.resolve()),
        "method": info["method"],
        "backbone": info["backbone"],
        "weights": info["weights"],
        "global_step": info["global_step"],
        "data": data.name,
        "num_classes": data.num_classes,
        "train_samples": int(train_f.shape[0]),
        "test_samples": int(test_f.shape[0]),
        "feature_dim": dim,
        "temperature": float(cfg.temperature),
        "ks": ks,
        "knn": {str(k): acc[k] for k in ks},
        "knn_protocol": knn_protocol(ks, cfg.temperature, int(train_f.shape[0]), int(test_f.shape[0])),
        "extract_s": round(t1 - t0, 3),
        "knn_s": round(time.perf_counter() - t1, 3),
        "device": str(device),
    }


def run(cfg: DictConfig) -> dict:
    """Evaluate, print per-k lines, write the JSON (beside the checkpoint or in ``output_dir``) and print it last.

    The JSON line is printed even when the file cannot be written; the error (naming ``output_dir=``) follows."""
    out = output_path(cfg.checkpoint, ".knn.json", cfg.output_dir)
    warn_if_unwritable(out, cfg.output_dir is not None)
    results = evaluate(cfg)
    for k, acc in results["knn"].items():
        print(f"knn k={k:>4} T={results['temperature']}: top1 {acc['top1']:.2f}  top5 {acc['top5']:.2f}")
    publish(json.dumps(results), lambda: write_result_json(out, results), out, cfg.output_dir is not None)
    return results


@hydra.main(config_path="../conf", config_name="knn", version_base="1.3")
def main(cfg: DictConfig) -> float:
    require(cfg, "checkpoint", "the pretraining checkpoint or exported backbone to evaluate", CHECKPOINT_EXAMPLE)
    with exit_on_unwritable_output():
        results = run(cfg)
    return results["knn"][str(results["ks"][0])]["top1"]  # Hydra sweepers can optimise this


if __name__ == "__main__":
    main()
