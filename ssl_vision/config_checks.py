"""Type and range checks of a pretraining config's plain fields, before anything is built.

The typed schema (``ssl_vision/config_schema.py``) refuses a value of the wrong type when the config is composed
(``data.batch_size=abc``), but not one out of range (``data.batch_size=0``), nor any value of an untyped node
(``trainer.*``); without these checks such a value surfaces much later, e.g. as an error inside a DataLoader
without the key. :func:`check_pretrain_config` runs first in
:func:`ssl_vision.launch.run_pretraining` and names the key, the value given and what is expected. The
objective's own values (``method.kwargs.*``) are checked by each objective when it is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["check_pretrain_config", "ConfigValueError"]

_MISSING = object()


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range (the message names the key)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _int_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= minimum


#: key -> (accepts the value?, what is expected, may it be null?)
_RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32 - 1]", False),
    "data.batch_size": (_int_at_least(1), "a positive integer (images per process and step), e.g. 256", False),
    "data.eval_batch_size": (_int_at_least(1), "a positive integer, e.g. 256", False),
    "data.num_workers": (
        _int_at_least(0),
        "an integer >= 0 (DataLoader worker processes; 0 = in the main process)",
        False,
    ),
    "data.image_size": (_int_at_least(1), "a positive integer (pixels)", False),
    "data.in_chans": (_int_at_least(1), "a positive integer (1 or 3)", False),
    "data.num_classes": (_int_at_least(1), "a positive integer", False),
    "trainer.max_epochs": (_int_at_least(-1), "an integer >= 1 (or -1 / null: no epoch limit)", True),
    "trainer.max_steps": (_int_at_least(-1), "an integer >= 1 (or -1: no step limit)", False),
    "trainer.accumulate_grad_batches": (_int_at_least(1), "a positive integer", False),
    "checkpoint.every_n_epochs": (_int_at_least(0), "an integer >= 0 (0: no periodic checkpoints) or null", True),
    "checkpoint.every_n_steps": (_int_at_least(1), "a positive number of optimizer steps or null", True),
    "checkpoint.save_top_k": (_int_at_least(-1), "an integer >= -1 (-1: keep all, 0: last.ckpt only)", False),
    "checkpoint.save_init": (lambda v: isinstance(v, bool), "true or false", True),
    "eval.knn_temperature": (lambda v: _is_number(v) and v > 0, "a number > 0, e.g. 0.1", False),
    "eval.probe_lr": (lambda v: _is_number(v) and v >= 0, "a number >= 0, e.g. 0.1", False),
    "eval.knn_at_init": (lambda v: isinstance(v, bool), "true or false", False),
    "eval.final_eval": (lambda v: isinstance(v, bool), "true or false", False),
}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_pretrain_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigValueError` for the first field of the wrong type or range, naming the key, the value
    and what is expected (see ``_RULES``); also every ``augment.views.<name>.count`` (crops per recipe, >= 1) and
    ``eval.knn_k`` (a list of positive integers).

    Keys a config does not have are skipped (the checks follow the config, they do not define it)."""
    for key, (ok, expected, nullable) in _RULES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING or (value is None and nullable):
            continue
        if not ok(value):
            raise ConfigValueError(
                f"{key} must be {expected}, got {value!r} ({_type_name(value)}); set it with "
                f"{key}=<value> on the command line or in the config"
            )
    views = OmegaConf.select(cfg, "augment.views", default=None)
    named = views.items() if OmegaConf.is_dict(views) else enumerate(views) if OmegaConf.is_list(views) else []
    if OmegaConf.is_dict(views) and len(views) == 0:
        raise ConfigValueError("augment.views is empty: a preset needs at least one view (conf/augment/*.yaml)")
    for name, view in named:
        count = view.get("count", 1) if OmegaConf.is_dict(view) else None
        if not (_is_int(count) and count >= 1):
            raise ConfigValueError(
                f"augment.views.{name}.count must be a positive integer (crops drawn with this "
                f"recipe, e.g. 2 global + 6 local for multi-crop), got {count!r} "
                f"({_type_name(count)})"
            )
    knn_k = OmegaConf.select(cfg, "eval.knn_k", default=_MISSING)
    if knn_k is not _MISSING:
        ks = OmegaConf.to_container(knn_k) if OmegaConf.is_list(knn_k) else knn_k
        if not isinstance(ks, list) or not ks or not all(_is_int(k) and k >= 1 for k in ks):
            raise ConfigValueError(
                f"eval.knn_k must be a list of positive integers, e.g. eval.knn_k=[20,200] (the "
                f"first is the reported knn_top1), got {ks!r}"
            )


def recipe_line(cfg: DictConfig, recipes_dir: str | None = None) -> str:
    """The one line a run prints first about its recipe: the paper recipe of the (method, backbone family) pair in
    use and its source (``recipe.name`` / ``recipe.source``, set by ``conf/recipe/<method>/<family>.yaml``), or that
    there is none for the pair and the method's own defaults apply (naming the pairs that have one); an
    ``experiment=<name>`` on top is named too."""
    from pathlib import Path

    method = OmegaConf.select(cfg, "method.name", default=None)
    family = OmegaConf.select(cfg, "family.name", default=None)
    name = OmegaConf.select(cfg, "recipe.name", default=None)
    experiment = None
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            experiment = HydraConfig.get().runtime.choices.get("experiment")
    except Exception:  # a config composed without Hydra's runtime node (tests, notebooks)
        experiment = None
    on_top = f"; experiment={experiment} is applied on top" if experiment else ""
    if name:
        return f"[ssl_vision] recipe {name}: {OmegaConf.select(cfg, 'recipe.source', default=None)}{on_top}"
    where = Path(recipes_dir) if recipes_dir else Path(__file__).resolve().parents[1] / "conf" / "recipe"
    known = sorted(f"{method}/{p.stem}" for p in (where / str(method)).glob("*.yaml"))
    return (
        f"[ssl_vision] no paper recipe for ({method}, {family}): the defaults of conf/method/{method}.yaml apply"
        f" (paper recipes of {method}: {', '.join(known) or 'none'}){on_top}"
    )
