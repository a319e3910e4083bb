"""DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294; facebookresearch/dino ``main_dino.py``).

Self-distillation without labels: a student (backbone + DINO head) matches the centred, sharpened output
distribution of a teacher that is an EMA of the student. The teacher sees only the two global crops, the student
every crop (multi-crop, one backbone pass per resolution); no pair compares a view with itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.losses.dino import dino_cross_entropy, teacher_temperature
from ssl_vision.nn.dino_head import DINOHead
from ssl_vision.nn.momentum import EMATeacher
from ssl_vision.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    check_count,
    check_range,
    check_temperature,
    forward_by_resolution,
    num_global_crops,
    register,
)
from ssl_vision.optim import clip_grad_per_param

#: DINO's teacher sees this many crops: the first two global crops (``num_global_crops``: the leading crops at the
#: first crop's size), which is all of them in DINO's multi-crop (2 × 224 + 8 × 96).
NUM_GLOBAL_CROPS = 2


def _without_drop_path(module: nn.Module) -> nn.Module:
    """Replace stochastic-depth modules (timm ``DropPath``, torchvision ``StochasticDepth``) by identities in place.

    DINO builds its teacher with ``drop_path_rate=0`` (the student keeps 0.1); neither has parameters, so the
    teacher's parameter names still match the student's for the EMA.
    """
    for name, child in list(module.named_children()):
        if type(child).__name__ in ("DropPath", "StochasticDepth"):
            setattr(module, name, nn.Identity())
        else:
            _without_drop_path(child)
    return module


@register("dino")
class DINO(Objective):
    """Student head :class:`~ssl_vision.nn.dino_head.DINOHead`; teacher = EMA copy of backbone + head (made in
    :meth:`bind`), centre of the teacher logits in a buffer.

    Args (``conf/method/dino.yaml: kwargs``; defaults = DINO's ImageNet ViT-S/16 values):
        out_dim: K, prototypes of the last layer (65536). hidden_dim / bottleneck_dim / head_layers: 2048 / 256 / 3.
        use_bn_in_head: BN in the head MLP (off). norm_last_layer: freeze the last layer's weight_g at 1 (on).
        student_temp: τ_s (0.1). warmup_teacher_temp → teacher_temp over warmup_teacher_temp_epochs epochs:
            τ_t 0.04 → 0.07 over 30 epochs (paper / README best; the code default is 0.04 constant).
        center_momentum: m of the centre EMA (0.9). momentum / momentum_end: the teacher EMA, cosine from
            ``momentum`` (0.996; README: 0.9995 for B = 256) to ``momentum_end`` (1.0) over the optimizer steps.
        freeze_last_layer: epochs during which the student's last layer gets no update (1).
        clip_grad: per-parameter gradient-norm clip of the student (3.0; 0 = off).
    """

    num_views = None  # multi-crop: all views

    @classmethod
    def tiny_kwargs(cls) -> dict:
        # last layer frozen and teacher temperature warming up during epoch 0 (the defaults' schedules, shortened)
        return {
            "out_dim": 32,
            "hidden_dim": 16,
            "bottleneck_dim": 8,
            "warmup_teacher_temp_epochs": 1,
            "freeze_last_layer": 1,
        }

    def __init__(
        self,
        feature_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        momentum_end: float | None = 1.0,
        freeze_last_layer: int = 1,
        clip_grad: float = 3.0,
    ):
        super().__init__()
        check_temperature("student_temp", student_temp, "DINO's student uses 0.1")
        check_temperature("teacher_temp", teacher_temp, "DINO's teacher uses 0.04-0.07")
        check_temperature("warmup_teacher_temp", warmup_teacher_temp, "DINO's teacher warms up from 0.04")
        check_range("center_momentum", center_momentum, 0.0, 1.0, high_open=True, note="DINO: 0.9")
        self.ema = EMATeacher(
            {"teacher_backbone": "backbone", "teacher_head": "head"},
            momentum,
            momentum_end,
            note="the teacher EMA; DINO: 0.996 (0.9995 at small batches) cosine to 1",
        )
        check_range("clip_grad", clip_grad, 0.0, math.inf, note="DINO: 3.0; 0 = no clipping")
        check_count("freeze_last_layer", freeze_last_layer, minimum=0, note="epochs; DINO: 1")
        check_count("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, minimum=0, note="DINO: 30")
        check_count("out_dim", out_dim, note="prototypes; DINO: 65536")
        check_count("hidden_dim", hidden_dim, note="DINO: 2048")
        check_count("bottleneck_dim", bottleneck_dim, note="DINO: 256")
        check_count("head_layers", head_layers, note="DINO: 3")
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.freeze_last_layer = freeze_last_layer
        self.clip_grad = clip_grad
        self.head = DINOHead(
            feature_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, use_bn_in_head, norm_last_layer
        )
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_backbone: nn.Module | None = None
        self.teacher_head: nn.Module | None = None
        self._student_backbone: tuple[nn.Module, ...] = ()  # a reference, not a submodule (the module owns it)

    def bind(self, backbone: nn.Module) -> None:
        # teacher = student at init, never optimised (requires_grad False keeps it out of the optimizer)
        self.ema.bind(self, backbone, adapt=lambda name, copy: _without_drop_path(copy))
        self._student_backbone = (backbone,)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        self.ema.check_bound(self, "DINO")
        if num_global_crops(views) < NUM_GLOBAL_CROPS:
            raise ValueError(
                f"DINO needs >= 2 views whose first 2 are same-size global crops; got sizes "
                f"{[tuple(v.shape[-2:]) for v in views]}; use augment=dino (multi-crop) or "
                f"augment=simclr / byol (2 crops)"
            )
        num_crops, n = len(views), views[0].shape[0]
        with torch.no_grad():  # the teacher: only the global crops, one pass
            t = self.teacher_head(self.teacher_backbone(torch.cat(views[:NUM_GLOBAL_CROPS])))  # (2N, K)
        h = forward_by_resolution(backbone, views)  # (V·N, D)
        bottleneck = self.head.bottleneck(h)  # (V·N, 256), unit norm
        s = self.head.last_layer(bottleneck)  # (V·N, K)
        temp = self.current_teacher_temp(step)
        loss = dino_cross_entropy(
            s.view(num_crops, n, -1), t.view(NUM_GLOBAL_CROPS, n, -1), self.center, self.student_temp, temp
        )
        logs = {
            "teacher_temp": torch.tensor(temp),
            "teacher_momentum": torch.tensor(self.current_teacher_momentum(step)),
            "teacher_entropy": _mean_entropy(t.float(), self.center, temp),
        }
        self._update_center(t)  # after the loss, from the raw (un-centred) teacher logits
        return ObjectiveOutput(loss=loss, features=h[:n], embedding=bottleneck[:n], logs=logs)

    def current_teacher_temp(self, step: StepInfo) -> float:
        """τ_t, warmed up by *epoch* (DINO's teacher_temp_schedule)."""
        return teacher_temperature(
            step.epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs
        )

    def current_teacher_momentum(self, step: StepInfo) -> float:
        """Cosine ``momentum`` → ``momentum_end`` over the optimizer steps; exactly ``momentum_end`` at the last."""
        return self.ema.momentum_at(step)

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        """c ← m·c + (1−m)·Σ(teacher logits over all processes)/(2N·W): the centre is the *global* batch mean."""
        # in the centre's dtype (float32 under bf16/fp16 autocast; float64 when the module is double)
        batch_center = dist.all_reduce_sum(teacher.sum(dim=0, keepdim=True).to(self.center.dtype)) / (
            teacher.shape[0] * dist.world_size()
        )
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    # ------------------------------------------------------------------------------------------ hooks
    def before_optimizer_step(self, step: StepInfo) -> None:
        """On unscaled gradients: per-parameter clipping of the student, then cancel its last layer's gradients
        during the first ``freeze_last_layer`` epochs (the *student's*, not the teacher's: lightly#1586)."""
        if self.clip_grad > 0:
            student = [p for m in (*self._student_backbone, self.head) for p in m.parameters() if p.requires_grad]
            clip_grad_per_param(student, self.clip_grad)
        if step.epoch < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, backbone: nn.Module, step: StepInfo) -> None:
        """Teacher ← EMA of the student (parameters only), momentum from the step count."""
        self.ema.update(self, backbone, step)


@torch.no_grad()
def _mean_entropy(teacher: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean entropy of the teacher distributions (ln K = uniform collapse, 0 = one-hot collapse). (R, K) -> scalar."""
    log_p = torch.log_softmax((teacher - center) / temp, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()
