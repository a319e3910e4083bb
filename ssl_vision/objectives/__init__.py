"""Pluggable objectives, one file per method family.

Each objective class registers itself with ``@register("name")``; every module in this package is imported
here, so adding a method is adding a file (plus ``conf/method/<name>.yaml``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

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
    if "num_samples" in inspect.signature(cls.__init__).parameters:
        kwargs["num_samples"] = num_samples
    return cls(feature_dim=feature_dim, **kwargs)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "StepInfo", "build_objective", "forward_by_resolution",
           "register"]
