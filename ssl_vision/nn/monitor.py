"""Collapse monitor shared by the training module's logging and SimSiam's collapse alarm."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def collapse_std(embedding: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of the L2-normalised embedding (SimSiam's collapse monitor, paper §4.1).

    (N, E) -> scalar. Expected values (SimSiam, Chen & He 2021, §4.1): for outputs spread like an isotropic
    zero-mean Gaussian, each coordinate of ``z / ‖z‖`` has std ``1/√E`` (:func:`healthy_std`); when every sample
    maps to one point (collapse) the std is 0. Values in between say how much of the sphere the batch uses. Which
    output an objective exposes to this monitor, if any, is its ``collapse_monitor`` (a reconstruction objective
    such as MAE has none).
    """
    if embedding.shape[0] < 2:
        warnings.warn("collapse_std needs at least 2 samples", stacklevel=2)
        return embedding.new_zeros(())
    return F.normalize(embedding.float(), dim=1).std(dim=0).mean()


def healthy_std(dim: int) -> float:
    """``1/√dim``: :func:`collapse_std` of an isotropic Gaussian batch in ``dim`` dimensions (no collapse)."""
    return dim**-0.5
