"""Optimizers, parameter groups and step-based schedules shared by every objective.

Everything here is a function of the *optimizer step* (docs/reference.md §0.1): callers pass
``trainer.global_step`` and ``trainer.estimated_stepping_batches``, never epochs or wall time.

* :class:`LARS` -- layer-wise adaptive rate scaling, You et al. 2017, https://arxiv.org/abs/1708.03888,
  in the form of MoCo v3 / MAE ``LARS`` (docs/reference.md §0.2).
* :func:`param_groups` / :func:`build_optimizer` -- no weight decay and no LARS adaptation for 1-D tensors.
* :func:`warmup_cosine`, :func:`cosine_between`, :func:`momentum_schedule`, :class:`WarmupCosineLR`.
* :func:`linear_scaled_lr` (Goyal et al. 2017, https://arxiv.org/abs/1706.02677) and
  :func:`clip_grad_per_param` (DINO's ``clip_gradients``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "LARS",
    "param_groups",
    "build_optimizer",
    "warmup_cosine",
    "cosine_between",
    "momentum_schedule",
    "WarmupCosineLR",
    "linear_scaled_lr",
    "clip_grad_per_param",
    "check_same_optimizer",
    "groups_for_resume",
    "OPTIMIZERS",
    "LR_SCALING_RULES",
]

OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCALING_RULES = ("linear", "sqrt", "none")


# --------------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """LARS with momentum, exactly as docs/reference.md §0.2 (MoCo v3 ``moco/optimizer.py``, MAE ``util/lars.py``).

    For every parameter ``w`` with gradient ``g`` in a group with ``lars_exclude=False``::

        g' = g + λ·w
        r  = η·‖w‖ / ‖g'‖          (r = 1 if ‖w‖ = 0 or ‖g'‖ = 0)
        u  ← μ·u + r·g'
        w  ← w − lr·u              (Nesterov: w ← w − lr·(r·g' + μ·u))

    The trust ratio's denominator is the norm of the *decayed* gradient ``‖g + λw‖``. timm's ``Lars`` and
    solo-learn/apex LARC use ``‖g‖ + λ‖w‖`` instead, which is only an upper bound of it, so they take
    slightly smaller steps; we follow the spec (and MoCo v3 / MAE) rather than wrapping timm.

    Groups with ``lars_exclude=True`` (biases and normalisation parameters, see :func:`param_groups`) get
    **neither** weight decay **nor** the trust ratio -- plain SGD with momentum -- even if their
    ``weight_decay`` is non-zero. That is BYOL's ``exclude_bias_and_norm`` and MoCo v3 / MAE's
    ``if p.ndim > 1`` branch.

    ``trust_clip=True`` is LARC's / solo-learn's ``clip_lr``: the trust ratio is replaced by
    ``min(r / lr, 1)`` *and then multiplied by lr as usual*, so the effective local learning rate is
    ``min(η·‖w‖/‖g'‖, lr)`` -- the adaptive rate may lower the global lr but never raise it. With
    ``lr == 0`` the clipped factor is 1 (the step is zero anyway). Ignored for excluded groups.

    All options (``weight_decay``, ``momentum``, ``trust_coefficient``, ``nesterov``, ``trust_clip``,
    ``lars_exclude``) may be overridden per parameter group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        nesterov: bool = False,
        trust_clip: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"LARS: trust_coefficient must be > 0 (0.001 in the papers), got {trust_coefficient}")
        if nesterov and momentum == 0.0:
            raise ValueError("LARS: nesterov=True needs momentum > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            trust_clip=trust_clip,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                d = p.grad
                if not group["lars_exclude"]:
                    d = self._adapted_update(p, d, group)
                if mu != 0.0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(mu).add_(d)
                    d = d.add(buf, alpha=mu) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss

    @staticmethod
    def _adapted_update(p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Return ``r·(g + λw)`` for one parameter (any shape); see the class docstring for r."""
        wd = group["weight_decay"]
        d = g.add(p, alpha=wd) if wd != 0.0 else g
        w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
        one = torch.ones_like(w_norm)
        # torch.where keeps this on the device (no .item() sync per parameter, as in MoCo v3 / MAE).
        ratio = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, one)
        if group["trust_clip"] and group["lr"] > 0:
            ratio = torch.clamp(ratio / group["lr"], max=1.0)
        return d.mul(ratio)


# --------------------------------------------------------------------------------------------------
# Parameter groups and the optimizer factory
# --------------------------------------------------------------------------------------------------
def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_scale: float = 1.0,
    fixed_lr: bool = False,
    name: str = "",
) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a no-decay / LARS-excluded group.

    Tensors with ``ndim <= 1`` (biases, BatchNorm/LayerNorm affine parameters, scalars) get
    ``weight_decay=0`` and ``lars_exclude=True``, as in BYOL, SimCLR, MoCo v3 and MAE (docs/reference.md §0.2, §12).
    Parameters with ``requires_grad=False`` (momentum encoders, MoCo v3's frozen patch projection, MAE's
    fixed pos-embeds) are skipped: an optimizer that holds them would still apply weight decay to them.

    Each group carries ``lr_scale`` (its lr is ``lr × lr_scale`` in :func:`build_optimizer`), ``fixed_lr``
    (:class:`WarmupCosineLR` leaves it at its initial lr, SimSiam's ``fix_pred_lr``) and ``name``, the same
    for both groups (tell them apart by ``lars_exclude``). Empty groups are dropped, so the result may be [].
    """
    if weight_decay < 0:
        raise ValueError(f"param_groups({name!r}): weight_decay must be >= 0, got {weight_decay}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    common = dict(lr_scale=lr_scale, fixed_lr=fixed_lr, name=name)
    groups = [
        dict(params=decay, weight_decay=weight_decay, lars_exclude=False, **common),
        dict(params=no_decay, weight_decay=0.0, lars_exclude=True, **common),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    nesterov: bool = False,
    trust_coefficient: float = 0.001,
    trust_clip: bool = False,
) -> torch.optim.Optimizer:
    """Build ``sgd`` | ``lars`` | ``adamw`` over ``groups`` (from :func:`param_groups`).

    Each group's initial lr is ``lr × group["lr_scale"]`` (default scale 1); a group without a
    ``weight_decay`` key gets 0 (AdamW's own default of 0.01 would silently decay everything).
    ``momentum`` and ``nesterov`` apply to sgd/lars, ``betas`` to adamw, ``trust_coefficient`` and
    ``trust_clip`` to lars. The extra group keys (``lr_scale``, ``fixed_lr``, ``name``, ``lars_exclude``)
    are kept in the groups and ignored by torch's SGD/AdamW.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if not groups:
        raise ValueError(f"build_optimizer({name!r}): no parameter groups (is every parameter frozen?)")
    if nesterov and key == "adamw":
        raise ValueError("build_optimizer: nesterov=True has no meaning for adamw; use sgd or lars")
    scaled = []
    for g in groups:
        if "params" not in g:
            raise ValueError(f"build_optimizer: every group needs a 'params' key, got keys {sorted(g)}")
        g = dict(g)
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g.setdefault("weight_decay", 0.0)
        scaled.append(g)
    if key == "sgd":
        return torch.optim.SGD(scaled, lr=lr, momentum=momentum, nesterov=nesterov)
    if key == "lars":
        return LARS(
            scaled,
            lr=lr,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            trust_clip=trust_clip,
        )
    return torch.optim.AdamW(scaled, lr=lr, betas=betas)


# --------------------------------------------------------------------------------------------------
# Schedules (pure functions of the optimizer step)
# --------------------------------------------------------------------------------------------------
def _check_progress(step: int, total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def cosine_between(step: int, total_steps: int, v0: float, v_end: float) -> float:
    """Half cosine from ``v0`` (step 0) to ``v_end`` (step ``total_steps`` and after).

    ``v_end + ½(v0 − v_end)(1 + cos(π·t/T))`` (docs/reference.md §0.1), written as ``v0 − (v0 − v_end)·½(1 − cos)``
    so step 0 gives ``v0`` bit-exactly, while ``t >= T`` returns ``v_end`` itself: the EMA momentum must be
    exactly 1.0 at the last step (DINO/BYOL), not 0.9999999999999999.
    """
    _check_progress(step, total_steps)
    if step >= total_steps:
        return v_end
    return v0 - (v0 - v_end) * 0.5 * (1.0 - math.cos(math.pi * step / total_steps))


def momentum_schedule(step: int, total_steps: int, m0: float) -> float:
    """EMA momentum ``1 − (1 − m0)·½(1 + cos(π·t/T))``: ``m0`` at step 0, exactly 1.0 at the end (BYOL, DINO)."""
    return cosine_between(step, total_steps, m0, 1.0)


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base: float,
    start: float = 0.0,
    final: float = 0.0,
) -> float:
    """Linear warmup ``start → base`` over ``warmup_steps``, then half cosine ``base → final``.

    Step 0 gives ``start``, step ``warmup_steps`` gives ``base``, the cosine runs over
    ``T = total_steps − warmup_steps`` with ``t`` counted from the end of warmup, and any step
    ``>= total_steps`` gives ``final`` (docs/reference.md §0.1; MoCo v3, SimCLR, BYOL, SwAV, DINO, MAE).
    """
    _check_progress(step, total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step >= total_steps:
        return final
    if step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    return cosine_between(step - warmup_steps, total_steps - warmup_steps, base, final)


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-step :func:`warmup_cosine` for every param group, relative to the group's initial lr.

    Step it once per optimizer step (Lightning: ``interval="step"``). A group's curve goes from
    ``initial_lr × warmup_start_factor`` through ``initial_lr`` to ``initial_lr × final_factor``, so the
    ``lr_scale`` of :func:`build_optimizer` carries through. Groups with ``fixed_lr=True`` keep their
    initial lr for the whole run (SimSiam's predictor with ``--fix-pred-lr``).

    All state (``last_epoch`` = step, ``base_lrs``, the hyper-parameters) is in ``state_dict()``, so a
    resumed run continues the same curve.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int,
        warmup_start_factor: float = 0.0,
        final_factor: float = 0.0,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"WarmupCosineLR: total_steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"WarmupCosineLR: warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
            )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_start_factor = warmup_start_factor
        self.final_factor = final_factor
        super().__init__(optimizer)

    def _lr_at(self, step: int) -> list[float]:
        lrs = []
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            if group.get("fixed_lr", False):
                lrs.append(base)
            else:
                lrs.append(
                    warmup_cosine(
                        step,
                        self.total_steps,
                        self.warmup_steps,
                        base,
                        start=base * self.warmup_start_factor,
                        final=base * self.final_factor,
                    )
                )
        return lrs

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self._lr_at(self.last_epoch)

    def state_continuing(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A state dict for *this* schedule (its length, warmup, factors and ``base_lrs``, i.e. the current config)
        positioned at the step of ``saved`` (a state dict of an earlier run's scheduler): what a resumed run loads so
        that a changed run length or lr continues from the step reached instead of replaying the old curve."""
        step = int(saved["last_epoch"])
        state = dict(saved)  # step bookkeeping (last_epoch, _step_count, ...) as saved
        state.update(
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start_factor=self.warmup_start_factor,
            final_factor=self.final_factor,
            base_lrs=list(self.base_lrs),
            _last_lr=self._lr_at(step),
        )
        return state

    def _get_closed_form_lr(self) -> list[float]:
        return self._lr_at(self.last_epoch)


# --------------------------------------------------------------------------------------------------
# Resuming with a changed configuration
# --------------------------------------------------------------------------------------------------
def check_same_optimizer(saved_name: str | None, name: str, source: str) -> None:
    """Refuse to resume ``source`` (a checkpoint trained with optimizer ``saved_name``) with another optimizer: its
    state (SGD/LARS momentum buffers, AdamW moments and step counts) has no meaning for another one, and torch
    would fail on it only at the first step (``KeyError: 'step'``)."""
    if saved_name is None or saved_name.lower() == name.lower():
        return
    raise ValueError(
        f"{source} was trained with method.optim.name={saved_name}, this run asks for "
        f"method.optim.name={name}: the optimizer state in the checkpoint (momentum buffers / Adam "
        f"moments) cannot carry over to another optimizer. Resume with method.optim.name={saved_name} "
        f"(lr, weight decay, momentum and schedule may change on resume), or start fresh with "
        f"resume=null."
    )


def groups_for_resume(
    saved_groups: list[dict[str, Any]], optimizer: torch.optim.Optimizer, lrs: Sequence[float]
) -> list[dict[str, Any]]:
    """The saved optimizer's ``param_groups`` with every hyper-parameter (weight decay, momentum, betas, the initial
    lr, the LARS options...) taken from ``optimizer`` -- built from the current config -- and each group's lr set to
    ``lrs`` (the current schedule at the resumed step). The saved ``params`` (state indices) are kept, so the
    per-parameter state (momentum buffers, Adam moments) still loads."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run's has "
            f"{len(optimizer.param_groups)}: the model or the method's parameter grouping changed "
            f"(resume with the same method.kwargs, or start fresh with resume=null)"
        )
    out = []
    for saved, group, lr in zip(saved_groups, optimizer.param_groups, lrs, strict=True):
        new = {k: v for k, v in group.items() if k != "params"}
        new["params"], new["lr"] = saved["params"], lr
        out.append(new)
    return out


# --------------------------------------------------------------------------------------------------
# Learning-rate scaling and gradient clipping
# --------------------------------------------------------------------------------------------------
def linear_scaled_lr(base_lr: float, global_batch: int, reference: int = 256, rule: str = "linear") -> float:
    """Scale ``base_lr`` with the global batch ``B = N·W``.

    * ``"linear"``: ``base_lr × B / reference`` (Goyal et al. 2017; MoCo v3, BYOL, DINO, MAE, solo-learn).
    * ``"sqrt"``: ``base_lr × sqrt(B)`` -- SimCLR's small-batch form ``lr = 0.075·√B`` (appendix B.1);
      ``reference`` is *not* used, so ``base_lr`` here is 0.075, not a per-256 value.
    * ``"none"``: ``base_lr`` unchanged (e.g. SwAV's linear probe at lr 0.3).
    """
    if global_batch <= 0:
        raise ValueError(f"linear_scaled_lr: global_batch must be > 0, got {global_batch}")
    if reference <= 0:
        raise ValueError(f"linear_scaled_lr: reference must be > 0, got {reference}")
    if rule == "linear":
        return base_lr * global_batch / reference
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; valid rules: {', '.join(LR_SCALING_RULES)}")


@torch.no_grad()
def clip_grad_per_param(params: Iterable[torch.Tensor] | Sequence[torch.Tensor], max_norm: float) -> None:
    """Clip each tensor's gradient to L2 norm ``max_norm`` separately (DINO ``utils.clip_gradients``).

    DINO clips per parameter, not the global norm of ``torch.nn.utils.clip_grad_norm_``: a huge gradient
    in the head does not shrink the backbone's. Coefficient ``max_norm / (‖g‖ + 1e-6)``, applied only when
    it is < 1 (clamping to 1 multiplies by 1.0, which is exact and avoids a host sync per tensor).
    Call it on unscaled gradients (Lightning: ``on_before_optimizer_step``). Tensors without grad are skipped.
    """
    if max_norm <= 0:
        raise ValueError(f"clip_grad_per_param: max_norm must be > 0, got {max_norm}")
    for p in params:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad.detach(), 2)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        p.grad.detach().mul_(coef.to(p.grad.dtype))
