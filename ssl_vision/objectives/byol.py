"""BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733; deepmind-research/byol).

An online network (backbone → projector → predictor) regresses the projection of the *other* view made by a
target network (backbone → projector, no predictor), which is an EMA of the online one. docs/reference.md §6.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vision.losses.regression import byol_loss, regression_loss
from ssl_vision.nn.heads import byol_mlp
from ssl_vision.nn.momentum import EMATeacher
from ssl_vision.objectives.base import Objective, ObjectiveOutput, StepInfo, check_count, num_global_crops, register


@register("byol")
class BYOL(Objective):
    """Online projector and predictor (same shape, 2048→4096→256 and 256→4096→256 at ImageNet scale), a target
    = EMA copy of backbone + projector (never the predictor), and the symmetric ``2 − 2cos`` loss.

    Each view goes through the networks in its own pass, so BN statistics are per view as in the official code
    (lucidrains/byol-pytorch concatenates the views, mixing their statistics; docs/reference.md §6 pitfalls).
    The target (an :class:`~ssl_vision.nn.momentum.EMATeacher`) is updated after every optimizer step with
    ``τ = 1 − (1 − τ_base)·½(1 + cos(π·k/K))`` (``momentum`` = τ_base, ``momentum_end`` = 1), k the optimizer steps
    taken so far (gradient accumulation counted once) and K their total, so the last update uses exactly τ = 1.
    (The official code evaluates τ at the step index before the increment, k − 1; this is one step later so that
    τ reaches 1.0 at the end, as the schedule in docs/reference.md §0.1 says.)

    Multi-crop (``augment=multicrop``, an option; not in the paper, solo-learn's formulation): the target sees
    the global crops (the leading crops at the first crop's size) and every crop's prediction regresses the
    target of every *other* global crop, ``Σ_{g global} Σ_{v≠g} ℓ(p_v, sg z'_g)``; with 2 views this is the
    symmetric loss above. Each crop is still forwarded on its own.
    """

    num_views = None  # two views, or all crops of a multi-crop preset

    @classmethod
    def tiny_kwargs(cls) -> dict:
        return {"proj_hidden_dim": 16, "proj_out_dim": 8, "pred_hidden_dim": 16}

    def __init__(
        self,
        feature_dim: int,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        pred_hidden_dim: int = 4096,
        momentum: float = 0.99,
        momentum_end: float | None = 1.0,
    ):
        super().__init__()
        self.ema = EMATeacher(
            {"target_backbone": "backbone", "target_projector": "projector"},
            momentum,
            momentum_end,
            note="the target EMA τ_base → 1; BYOL uses 0.99 (0.996 for 1000 epochs) and ends at 1",
        )
        check_count("proj_hidden_dim", proj_hidden_dim, note="BYOL: 4096")
        check_count("proj_out_dim", proj_out_dim, note="BYOL: 256")
        check_count("pred_hidden_dim", pred_hidden_dim, note="BYOL: 4096")
        self.projector = byol_mlp(feature_dim, proj_hidden_dim, proj_out_dim)
        self.predictor = byol_mlp(proj_out_dim, pred_hidden_dim, proj_out_dim)
        # created in bind(): submodules, so checkpoints hold them and a resume continues the same target
        self.target_backbone: nn.Module | None = None
        self.target_projector: nn.Module | None = None
        self.last_momentum: float | None = None  # τ of the latest EMA update (for tests and inspection)

    def bind(self, backbone: nn.Module) -> None:
        # requires_grad=False everywhere: param_groups skips these, so the target never reaches the optimizer
        self.ema.bind(self, backbone)

    def momentum_at(self, step: StepInfo) -> float:
        """τ for an EMA update made when ``step.global_step`` optimizer steps have been taken."""
        return self.ema.momentum_at(step)

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        self.ema.check_bound(self, "BYOL")
        if len(views) < 2:
            raise ValueError(f"BYOL needs 2 views per sample, the data gives {len(views)}; use augment=byol")
        if len(views) > 2:  # multi-crop
            n_global = num_global_crops(views)
            hs = [backbone(x) for x in views]  # one pass per crop (BN statistics per crop)
            zs = [self.projector(h) for h in hs]
            ps = [self.predictor(z) for z in zs]
            with torch.no_grad():
                ts = [self.target_projector(self.target_backbone(x)) for x in views[:n_global]]
            loss = sum(regression_loss(ps[v], ts[g]) for g in range(n_global) for v in range(len(views)) if v != g)
            logs = {"ema_momentum": torch.tensor(self.momentum_at(step), device=loss.device)}
            return ObjectiveOutput(loss=loss, features=hs[0], embedding=zs[0], logs=logs)
        x1, x2 = views[0], views[1]
        h1, h2 = backbone(x1), backbone(x2)  # (N, D) each, one pass per view
        z1, z2 = self.projector(h1), self.projector(h2)  # (N, E)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (N, E)
        with torch.no_grad():  # stop-gradient on the target branch (and no activations kept for it)
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        loss = byol_loss(p1, p2, t1, t2)
        logs = {"ema_momentum": torch.tensor(self.momentum_at(step), device=loss.device)}
        return ObjectiveOutput(loss=loss, features=h1, embedding=z1, logs=logs)

    @torch.no_grad()
    def after_optimizer_step(self, backbone: nn.Module, step: StepInfo) -> None:
        """EMA of parameters only; the target's BN running statistics come from its own forward passes."""
        self.last_momentum = self.ema.update(self, backbone, step)
