"""The resolved values of a composed pretraining config that decide what a run trains (the golden snapshot).

``python -m tests.config_snapshot`` writes ``tests/fixtures/config_golden.json`` from the tree as it is; the
fixture in the repository was written from the configuration before the schema / recipe restructuring, and
``tests/test_config_golden.py`` checks that every case still composes to the same values (with the documented
mapping of deliberate renames applied there, never in the fixture).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import ssl_vision  # noqa: F401  (registers the config schema the YAML files merge onto)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "config_golden.json"

#: each method with the backbone of its paper's main recipe (the method file's own defaults are that recipe)
METHOD_DEFAULTS = {
    "simclr": "resnet50",
    "moco_v1": "resnet50",
    "moco_v2": "resnet50",
    "moco_v3": "resnet50",
    "byol": "resnet50",
    "simsiam": "resnet50",
    "swav": "resnet50",
    "instdisc": "resnet18",
    "dino": "vit_s",
    "mae": "vit_b",
}

TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches", "check_val_every_n_epoch")


def cases() -> dict[str, list[str]]:
    """Case name -> overrides: every ``conf/experiment/*.yaml`` and every method with its paper backbone."""
    out = {f"experiment={p.stem}": [f"experiment={p.stem}"] for p in sorted((CONF / "experiment").glob("*.yaml"))}
    out.update({f"method={m} backbone={b}": [f"method={m}", f"backbone={b}"] for m, b in METHOD_DEFAULTS.items()})
    return out


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("pretrain", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def snapshot(cfg) -> dict:
    """What matters of one composed config, resolved to plain values (``views`` as the config has them)."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return {
        "method": {
            "name": cfg.method.name,
            "kwargs": plain(cfg.method.kwargs),
            "optim": plain(cfg.method.optim),
            "sync_batchnorm": cfg.method.get("sync_batchnorm"),
        },
        "augment": {"name": cfg.augment.name, "backend": cfg.augment.backend, "views": plain(cfg.augment.views)},
        "backbone": plain(cfg.backbone),
        "data": plain(cfg.data),
        "trainer": {k: cfg.trainer[k] for k in TRAINER_KEYS},
        "eval": plain(cfg.eval),
    }


def main() -> None:
    golden = {name: snapshot(compose_cfg(ov)) for name, ov in cases().items()}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(golden)} cases to {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
