"""SimSiam (Chen & He 2021, https://arxiv.org/abs/2011.10566; facebookresearch/simsiam).

One encoder (backbone → projector) and a bottleneck predictor; each view's prediction regresses the
stop-gradient projection of the other view with the negative cosine. No momentum encoder, no negatives.
docs/reference.md §7.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ssl_vision.losses.regression import simsiam_loss
from ssl_vision.nn.heads import simsiam_predictor, simsiam_projector
from ssl_vision.nn.monitor import collapse_std
from ssl_vision.objectives.base import Objective, ObjectiveOutput, StepInfo, check_count, register
from ssl_vision.optim import param_groups


@register("simsiam")
class SimSiam(Objective):
    """Projector + predictor heads, the symmetric negative-cosine loss, the fixed predictor lr and a collapse alarm.

    Each view goes through the encoder in its own pass (BN statistics per view), as the official code does.
    ``fix_pred_lr`` puts the predictor in its own parameter group with ``fixed_lr=True``: the scheduler keeps it
    at the initial (batch-scaled) lr while the rest follows warmup + cosine.
    ``collapse_warn_fraction``: from the second epoch on, warn once when the std of ``n(z)`` drops below this
    fraction of the healthy ``1/√d`` (loss near −1 with that std near 0 is the collapse of simsiam#29).
    """

    num_views = 2

    @classmethod
    def tiny_kwargs(cls) -> dict:
        return {"proj_hidden_dim": 16, "proj_out_dim": 16, "pred_hidden_dim": 8}

    def __init__(
        self,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 2048,
        proj_layers: int = 3,
        pred_hidden_dim: int = 512,
        fix_pred_lr: bool = True,
        collapse_warn_fraction: float = 0.1,
    ):
        super().__init__()
        check_count("proj_hidden_dim", proj_hidden_dim, note="SimSiam: 2048")
        check_count("proj_out_dim", proj_out_dim, note="SimSiam: 2048")
        check_count("proj_layers", proj_layers, note="SimSiam: 3 (2 on CIFAR)")
        check_count("pred_hidden_dim", pred_hidden_dim, note="SimSiam: 512")
        if not (isinstance(collapse_warn_fraction, (int, float)) and 0.0 <= collapse_warn_fraction < 1.0):
            raise ValueError(
                f"method.kwargs.collapse_warn_fraction must be in [0, 1) (a fraction of 1/√d; "
                f"0 disables the warning), got {collapse_warn_fraction}"
            )
        self.fix_pred_lr = fix_pred_lr
        self.collapse_warn_fraction = collapse_warn_fraction
        self.projector = simsiam_projector(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers)
        self.predictor = simsiam_predictor(proj_out_dim, pred_hidden_dim)
        self._warned_collapse = False  # warn once per process; not training state, so not checkpointed

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Projector groups follow the lr schedule; predictor groups keep a fixed lr when ``fix_pred_lr``.

        As everywhere in the toolkit, 1-D tensors (biases, BN) get no weight decay; the official SimSiam decays
        all parameters, a difference documented in the method config.
        """
        groups = param_groups(self.projector.named_parameters(), weight_decay, name="projector")
        groups += param_groups(
            self.predictor.named_parameters(), weight_decay, fixed_lr=self.fix_pred_lr, name="predictor"
        )
        return groups

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        if len(views) < 2:
            raise ValueError(f"SimSiam needs 2 views per sample, the data gives {len(views)}; use augment=simsiam")
        x1, x2 = views[0], views[1]
        h1, h2 = backbone(x1), backbone(x2)  # (N, D) each, one pass per view
        z1, z2 = self.projector(h1), self.projector(h2)  # (N, d)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (N, d)
        loss = simsiam_loss(p1, p2, z1, z2)  # stop-gradient on z inside the loss
        z_std = collapse_std(z1.detach())
        self._check_collapse(z_std, z1.shape[1], step)
        return ObjectiveOutput(loss=loss, features=h1, embedding=z1, logs={"z_std": z_std})

    def _check_collapse(self, z_std: torch.Tensor, dim: int, step: StepInfo) -> None:
        """Warn once when ``std(n(z)) < fraction/√d`` after the first epoch (the first epoch may still be settling).

        Checked about 10 times per epoch rather than every step: reading the value is a host-device sync.
        """
        if self._warned_collapse or step.epoch < 1 or self.collapse_warn_fraction == 0.0:
            return
        if step.global_step % max(1, step.steps_per_epoch // 10) != 0:
            return
        healthy = 1.0 / math.sqrt(dim)
        value = float(z_std)
        if value < self.collapse_warn_fraction * healthy:
            self._warned_collapse = True
            warnings.warn(
                f"SimSiam looks collapsed at epoch {step.epoch} (step {step.global_step}): std of the "
                f"normalised projection is {value:.2e}, below {self.collapse_warn_fraction} × 1/√{dim} = "
                f"{self.collapse_warn_fraction * healthy:.2e} (healthy ≈ {healthy:.2e}). Usual fixes: lower "
                "lr, keep fix_pred_lr, check the augmentation and the predictor (docs/reference.md §7).",
                RuntimeWarning,
                stacklevel=2,
            )
