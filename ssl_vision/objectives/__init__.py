"""Pluggable objectives, one file per method family. ``build_objective`` is the one name → class table."""

from __future__ import annotations

from ssl_vision.objectives.base import Objective, ObjectiveOutput, StepInfo
from ssl_vision.objectives.simclr import SimCLR

OBJECTIVES: dict[str, type[Objective]] = {
    "simclr": SimCLR,
}


def build_objective(name: str, feature_dim: int, **kwargs) -> Objective:
    """Instantiate the objective ``name`` for a backbone with ``feature_dim`` features."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](feature_dim=feature_dim, **kwargs)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "StepInfo", "build_objective"]
