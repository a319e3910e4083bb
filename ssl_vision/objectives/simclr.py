"""SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709; v2: https://arxiv.org/abs/2006.10029).

Two views through one encoder and projector, NT-Xent against all other 2B−2 samples of the global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.losses import multi_positive_nt_xent, nt_xent
from ssl_vision.nn.heads import simclr_projector
from ssl_vision.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    check_count,
    check_temperature,
    forward_by_resolution,
    register,
)


@register("simclr")
class SimCLR(Objective):
    """Projector: ``proj_layers`` × (Linear → BN), ReLU between, last Linear without bias and its BN without β
    (official ``center=False``), weights N(0, 0.01). v1 = 2 layers, v2 (code default) = 3.

    Both views go through the backbone in one concatenated pass, as in the official code (BN statistics span
    both views; with SyncBN the global batch).

    Multi-crop (``augment=multicrop``, an option; not in the paper): all V crops are used, one backbone pass per
    resolution, and every other crop of the same image is a positive (:func:`multi_positive_nt_xent`,
    solo-learn's multi-crop SimCLR); with V = 2 it is exactly NT-Xent.
    """

    num_views = None  # two views, or all crops of a multi-crop preset

    @classmethod
    def tiny_kwargs(cls) -> dict:
        return {"proj_hidden_dim": 16, "proj_out_dim": 8}

    def __init__(
        self,
        feature_dim: int,
        temperature: float = 0.1,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        proj_layers: int = 3,
    ):
        super().__init__()
        check_temperature("temperature", temperature, "SimCLR uses 0.1-0.5 (0.5 at batch 256, 0.1 at 4096)")
        check_count("proj_hidden_dim", proj_hidden_dim, note="SimCLR: 2048")
        check_count("proj_out_dim", proj_out_dim, note="SimCLR: 128")
        check_count("proj_layers", proj_layers, note="SimCLR v2: 3")
        self.temperature = temperature
        self.projector = simclr_projector(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers)

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        if len(views) < 2:
            raise ValueError(f"SimCLR needs 2 views per sample, the data gives {len(views)}; use augment=simclr")
        n = views[0].shape[0]
        if len(views) > 2:  # multi-crop: one pass per resolution, every other crop of the image is a positive
            h = forward_by_resolution(backbone, views)  # (V·N, D)
            z = self.projector(h).reshape(len(views), n, -1)  # (V, N, E)
            z_all = dist.gather_with_grad(z.transpose(0, 1).contiguous()).transpose(0, 1)  # (V, B, E)
            loss = multi_positive_nt_xent(z, self.temperature, z_all, offset=n * dist.rank())
            return ObjectiveOutput(loss=loss, features=h[:n], embedding=z[0])
        x_a, x_b = views[0], views[1]
        h = backbone(torch.cat([x_a, x_b]))  # (2N, D)
        z_a, z_b = self.projector(h).chunk(2)  # (N, E) each
        # negatives come from the global batch: gather with gradient (backward sums over ranks, docs/reference.md §0.3)
        z_a_all, z_b_all = dist.gather_with_grad(z_a), dist.gather_with_grad(z_b)
        loss = nt_xent(z_a, z_b, self.temperature, z_a_all, z_b_all, offset=n * dist.rank())
        return ObjectiveOutput(loss=loss, features=h[:n], embedding=z_a)
