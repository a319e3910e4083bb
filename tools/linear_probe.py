#!/usr/bin/env python
"""Linear probe on a frozen backbone (docs/reference.md §10.2): ``python tools/linear_probe.py checkpoint=<path>``.

Options (conf/linear.yaml): ``protocol=sgd_cosine|sgd_step|lars_bn lr=... epochs=... batch_size=...
weight_decay=... report_best_on_test=true train_augment=true use_teacher=true cache_features=false device=auto``; data
from the checkpoint unless ``data=<name>`` or ``+data.root=/path``. Features are cached beside the checkpoint
(``<stem>.features.<split>.pt``). Writes ``<checkpoint stem>.linear.json`` (an existing one is kept renamed) and
prints it as the last line of stdout, also when it cannot be written (the error that follows names
``output_dir``). ``output_dir=<folder>``: results, feature caches and fine-tuned weights go there instead of beside
the checkpoint (a read-only checkpoint directory).

``finetune=true``: end-to-end fine-tuning instead (docs/reference.md §10.3, recipe under ``finetuning:``; ``lr epochs
batch_size weight_decay`` override it), written to ``<checkpoint stem>.finetune.json``.
"""

from __future__ import annotations

import copy
import errno
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssl_vision.cli import CHECKPOINT_EXAMPLE, require  # noqa: E402
from ssl_vision.eval.checkpoints import load_backbone  # noqa: E402
from ssl_vision.eval.features import resolve_eval_data  # noqa: E402
from ssl_vision.eval.finetune import finetune_backbone, make_finetune_spec  # noqa: E402
from ssl_vision.eval.linear import make_probe_spec, probe_checkpoint  # noqa: E402
from ssl_vision.eval.outputs import (
    OutputNotWritable,
    exit_on_unwritable_output,
    explain_write_errors,  # noqa: E402
    output_path,
    publish,
    save_safetensors_atomic,
    warn_if_unwritable,
    writable,
    write_result_json,
)


def _load(cfg: DictConfig):
    ckpt = Path(cfg.checkpoint)
    backbone, _, info = load_backbone(ckpt, cfg.expect_backbone, cfg.use_teacher)
    kw = info["create_kwargs"]
    data = resolve_eval_data(
        info["data"],
        OmegaConf.to_container(cfg.data, resolve=True) if cfg.data else None,
        kw["in_chans"],
        kw["image_size"],
    )
    head = {
        "checkpoint": str(ckpt.resolve()),
        "method": info["method"],
        "backbone": info["backbone"],
        "weights": info["weights"],
        "global_step": info["global_step"],
        "data": data.name,
    }
    return ckpt, backbone, info, data, head


def finetune(cfg: DictConfig) -> dict:
    if cfg.report_best_on_test or cfg.train_augment:
        raise ValueError(
            "report_best_on_test / train_augment are linear-probe options; fine-tuning always augments and "
            "reports the last epoch"
        )
    spec = make_finetune_spec(
        OmegaConf.to_container(cfg.finetuning, resolve=True),
        cfg.lr,
        cfg.epochs,
        cfg.batch_size,
        cfg.weight_decay,
        cfg.seed,
    )
    first = output_path(cfg.checkpoint, ".finetuned.backbone.safetensors", cfg.output_dir)
    if cfg.save_finetuned and not writable(first.parent):  # before hours of training whose weights would be lost
        raise OutputNotWritable(
            errno.EACCES,
            f"cannot write the fine-tuned weights into {first.parent} (not "
            f"writable for this user); set output_dir=<a writable folder>, or "
            f"save_finetuned=false to keep only the printed accuracy",
        )
    ckpt, backbone, info, data, head = _load(cfg)
    res, model = finetune_backbone(
        backbone,
        info["create_kwargs"],
        data,
        spec,
        cfg.extract_batch_size,
        cfg.num_workers,
        cfg.device,
        cfg.train_subset,
    )
    out = {**head, "mode": "finetune", **res}
    if cfg.save_finetuned:
        try:
            with explain_write_errors(first, cfg.output_dir is not None):
                out["saved"] = save_finetuned(ckpt, model, info, res, cfg.output_dir)
        except BaseException:
            print(json.dumps(out), flush=True)  # the accuracy is never lost, whatever happened to the files
            raise
    return out


def save_finetuned(ckpt: Path, model, info: dict, res: dict, output_dir: str | None = None) -> dict:
    """The fine-tuned backbone as ``<stem>.finetuned.backbone.safetensors`` + ``.json`` (the export format: every
    evaluation tool reads it with ``checkpoint=``) and its classifier head as ``<stem>.finetuned.head.safetensors``,
    beside the checkpoint or in ``output_dir``."""
    from ssl_vision.run_record import keep_previous
    from ssl_vision.eval.export import write_backbone_files

    if hasattr(model, "backbone"):  # finetune.Classifier: backbone + Linear head
        backbone, head = model.backbone, model.head
    else:  # a timm ViT with its own head slot: the backbone is the model without it
        head = model.get_classifier()
        backbone = copy.deepcopy(model)
        backbone.reset_classifier(0)
    backbone_path = output_path(ckpt, ".finetuned.backbone.safetensors", output_dir)
    head_path = output_path(ckpt, ".finetuned.head.safetensors", output_dir)
    head_path.parent.mkdir(parents=True, exist_ok=True)
    keep_previous(head_path)
    save_safetensors_atomic({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, head_path)
    meta = write_backbone_files(
        backbone_path,
        backbone,
        info["feature_dim"],
        {**info, "weights": "finetuned"},
        ckpt,
        finetune={
            "top1": res["top1"],
            "epochs": res["epochs"],
            "steps": res["steps"],
            "head": str(head_path.resolve()),
        },
    )
    return {"backbone": meta["weights_path"], "json": meta["json_path"], "head": str(head_path.resolve())}


def evaluate(cfg: DictConfig) -> dict:
    if cfg.finetune:
        return finetune(cfg)
    spec = make_probe_spec(
        cfg.protocol,
        OmegaConf.to_container(cfg.protocols, resolve=True),
        cfg.lr,
        cfg.epochs,
        cfg.batch_size,
        cfg.weight_decay,
        cfg.seed,
    )
    ckpt, backbone, info, data, head = _load(cfg)
    res = probe_checkpoint(
        ckpt,
        spec,
        data,
        backbone,
        info,
        cfg.extract_batch_size,
        cfg.num_workers,
        cfg.device,
        cfg.train_augment,
        cfg.cache_features,
        cfg.report_best_on_test,
        cfg.train_subset,
        output_dir=cfg.output_dir,
        progress=cfg.get("progress", "auto"),
    )
    return {**head, **res}


def run(cfg: DictConfig) -> dict:
    """Probe (or fine-tune), print the result line, write the JSON (beside the checkpoint or in ``output_dir``) and
    print it last -- also when the file cannot be written (the error naming ``output_dir=`` follows)."""
    out = output_path(cfg.checkpoint, ".finetune.json" if cfg.finetune else ".linear.json", cfg.output_dir)
    if not cfg.finetune:
        warn_if_unwritable(out, cfg.output_dir is not None)
    results = evaluate(cfg)
    if cfg.finetune:
        print(
            f"fine-tuning ({results['epochs']} epochs, {results['steps']} steps, layer_decay "
            f"{results['layer_decay']}): top1 {results['top1']:.2f}  top5 {results['top5']:.2f}"
        )
    else:
        print(
            f"linear probe {results['protocol']} (rule={results['rule']}: last epoch): top1 {results['top1']:.2f}"
            f"  top5 {results['top5']:.2f}"
        )
    if "best_on_test" in results:
        b = results["best_on_test"]
        print(f"  best on TEST (selected on the test split, optimistic): top1 {b['top1']:.2f} at epoch {b['epoch']}")
    publish(json.dumps(results), lambda: write_result_json(out, results), out, cfg.output_dir is not None)
    return results


@hydra.main(config_path="../conf", config_name="linear", version_base="1.3")
def main(cfg: DictConfig) -> float:
    require(cfg, "checkpoint", "the pretraining checkpoint or exported backbone to probe", CHECKPOINT_EXAMPLE)
    with exit_on_unwritable_output():
        return run(cfg)["top1"]  # Hydra sweepers can optimise this


if __name__ == "__main__":
    main()
