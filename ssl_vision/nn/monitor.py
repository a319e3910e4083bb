"""Collapse monitor shared by the training module's logging and SimSiam's collapse alarm."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def collapse_std(embedding: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of the L2-normalised embedding (SimSiam's collapse monitor, paper §4.1).

    Healthy ≈ 1/√E for an E-dim embedding; → 0 when all samples map to one point. (N, E) -> scalar.
    """
    if embedding.shape[0] < 2:
        warnings.warn("collapse_std needs at least 2 samples", stacklevel=2)
        return embedding.new_zeros(())
    return F.normalize(embedding.float(), dim=1).std(dim=0).mean()
