"""Pluggable objectives, one file per method family.

Each objective class registers itself with ``@register("name")``; every module in this package is imported
here, so adding a method is adding a file (plus ``conf/method/<name>.yaml``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from ssl_vision.config_checks import ConfigValueError
from ssl_vision.nn.momentum import RENAMED_KWARGS
from ssl_vision.objectives.base import OBJECTIVES, Objective, ObjectiveOutput, StepInfo, forward_by_resolution, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def build_objective(name: str, feature_dim: int, num_samples: int | None = None, **kwargs) -> Objective:
    """Instantiate the objective ``name`` for a backbone with ``feature_dim`` features.

    ``num_samples`` (the training-set size) is passed only to objectives that take it (InstDisc's memory bank).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    accepted = inspect.signature(cls.__init__).parameters
    renamed = {old: new for old, new in RENAMED_KWARGS.get(name, {}).items() if old in kwargs}
    if renamed:
        raise ConfigValueError(
            "; ".join(
                f"method.kwargs.{old} was renamed to method.kwargs.{new} (every EMA method uses momentum and "
                f"momentum_end: the cosine from momentum to momentum_end, 1.0 by default): set "
                f"{new}={kwargs[old]!r} instead of {old} in the config"
                for old, new in renamed.items()
            )
        )
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in kwargs if k not in accepted or k in ("self", "feature_dim", "num_samples"))
    if unknown and not open_ended:
        valid = sorted(k for k in accepted if k not in ("self", "feature_dim", "num_samples"))
        raise ConfigValueError(
            f"unknown method.kwargs for {name}: {', '.join(unknown)}; valid: {', '.join(valid)}. When an "
            f"experiment=<recipe> of another method sets them (method={name} overrides only the method), use "
            f"that method's own recipe instead, e.g. experiment=fmnist_{name}, or drop method=..."
        )
    if "num_samples" in accepted:
        kwargs["num_samples"] = num_samples
    return cls(feature_dim=feature_dim, **kwargs)


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveOutput",
    "StepInfo",
    "build_objective",
    "forward_by_resolution",
    "register",
]
