"""The EMA teacher, one component for every momentum method: MoCo v1/v2 key encoder, MoCo v3 momentum encoder,
BYOL target, DINO teacher (docs/reference.md §0.1).

* :func:`momentum_copy` -- the frozen deep copy an EMA teacher starts as;
* :func:`ema_update_` -- ``θ_t ← m·θ_t + (1 − m)·θ_o`` over parameters only;
* :func:`ema_momentum` -- the one momentum schedule: constant, or a half cosine ``momentum → momentum_end`` over the
  run's EMA updates (BYOL eq. for τ, DINO's cosine 0.996 → 1, MoCo v3 ``--moco-m-cos``);
* :class:`EMATeacher` -- which of an objective's modules have EMA copies, the schedule's two values (the config keys
  ``method.kwargs.momentum`` / ``momentum_end`` of every momentum method) and the one update.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from ssl_vision.nn.memory import HostMirror
from ssl_vision.optim import cosine_between

#: earlier names of ``method.kwargs.momentum``, per method: a config that still sets one gets an error naming the new
#: key instead of an "unexpected keyword" (see :func:`ssl_vision.objectives.build_objective`)
RENAMED_KWARGS: dict[str, dict[str, str]] = {
    "byol": {"base_momentum": "momentum"},
    "dino": {"momentum_teacher": "momentum"},
}

#: when the teacher is updated: after each optimizer step (BYOL, DINO: the official training loops) or at the start
#: of the first forward of each optimizer step (MoCo v1/v2/v3: ``_momentum_update_key_encoder`` inside the forward)
TIMINGS = ("after_step", "before_forward")


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere: initialised as the online network, never optimised."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online over **parameters only** (docs/reference.md §0.1).

    BN running statistics of the target are its own (from its own forward passes), never averaged.
    Both modules must have the same parameter names and shapes.
    """
    t_params = dict(target.named_parameters())
    o_params = dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        missing = sorted(set(t_params) ^ set(o_params))[:5]
        raise ValueError(f"EMA target and online networks differ in parameters, e.g. {missing}")
    if momentum == 1.0:  # the target stays as it is (MoCo v3 / BYOL / DINO cosine at the last update)
        return
    names = list(t_params)
    t = [t_params[n].data for n in names]
    o = [o_params[n].data for n in names]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)


def ema_momentum(update: int, num_updates: int, momentum: float, momentum_end: float | None) -> float:
    """The momentum of EMA update number ``update`` (1 … ``num_updates``) of a run.

    ``momentum_end=None``: ``momentum`` throughout (MoCo v1/v2). Otherwise the half cosine
    ``m_end − (m_end − m)·½(1 + cos(π·u/U))`` from ``momentum`` (u = 0) to exactly ``momentum_end`` at the last
    update u = U and after (BYOL §3.2 τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2; DINO's ``cosine_scheduler(m, 1)``; MoCo v3
    ``--moco-m-cos``). The last update uses exactly ``momentum_end``, not 0.9999999999999999.
    """
    if momentum_end is None:
        return momentum
    return cosine_between(min(update, num_updates), num_updates, momentum, momentum_end)


def check_momentum(momentum, momentum_end, note: str = "") -> None:
    """``method.kwargs.momentum`` in [0, 1]; ``momentum_end`` in [0, 1] or null (constant). ``note``: the paper's
    values, quoted in the message."""
    for key, value, allow_none in (("momentum", momentum, False), ("momentum_end", momentum_end, True)):
        if value is None and allow_none:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and 0.0 <= value <= 1.0):
            notes = "; ".join(n for n in ("null = constant momentum" if allow_none else "", note) if n)
            raise ValueError(
                f"method.kwargs.{key} must be a number in [0, 1], got {value!r}" + (f" ({notes})" if notes else "")
            )


class EMATeacher:
    """An objective's EMA teacher: the copies, the schedule, the update (one place for every momentum method).

    ``copies`` maps the attribute under which the objective keeps each copy to the attribute of the online module it
    follows (``"backbone"`` = the backbone :class:`~ssl_vision.module.SSLModule` passes in), e.g. BYOL's
    ``{"target_backbone": "backbone", "target_projector": "projector"}``. The copies stay plain submodules of the
    objective under those names, so checkpoints keep the keys they have always had (``objective.target_backbone.*``)
    and :attr:`backbone_copy` names the one that the evaluation tools read as the teacher.

    ``timing`` says when :meth:`update` is called and, with it, how many updates a run of T optimizer steps makes:
    ``"after_step"`` -- after every optimizer step, T updates, update k after step k (BYOL, DINO);
    ``"before_forward"`` -- at the first forward of every optimizer step but the first, T − 1 updates (MoCo: the
    weights only change at a step, so with gradient accumulation the later micro-batches of a step skip it; the
    step of the last update is the owner's ``ema_step`` buffer, checkpointed, read on the host once).
    Either way update k uses :func:`ema_momentum` (k, updates of the run), so the last one uses ``momentum_end``.
    """

    def __init__(
        self,
        copies: dict[str, str],
        momentum: float,
        momentum_end: float | None = 1.0,
        *,
        timing: str = "after_step",
        note: str = "",
    ):
        if timing not in TIMINGS:
            raise ValueError(f"EMATeacher timing must be one of {TIMINGS}, got {timing!r}")
        if "backbone" not in copies.values():
            raise ValueError(f"an EMA teacher copies the backbone; copies={copies}")
        check_momentum(momentum, momentum_end, note)
        self.copies = dict(copies)
        self.momentum, self.momentum_end, self.timing = momentum, momentum_end, timing
        self.backbone_copy = next(name for name, source in copies.items() if source == "backbone")

    def __repr__(self) -> str:
        return (
            f"EMATeacher(copies={self.copies}, momentum={self.momentum}, momentum_end={self.momentum_end}, "
            f"timing={self.timing!r})"
        )

    # ------------------------------------------------------------------------------------------------ setup
    def register_state(self, owner: nn.Module) -> None:
        """``before_forward`` only: the ``ema_step`` buffer (step of the last update) and its host mirror on
        ``owner``; call it in the owner's ``__init__``."""
        if self.timing != "before_forward":
            return
        owner.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        owner._ema_step = HostMirror()  # host copy of ema_step, dropped on every load_state_dict
        HostMirror.watch(owner, "_ema_step")

    def bind(
        self, owner: nn.Module, backbone: nn.Module, adapt: Callable[[str, nn.Module], nn.Module] | None = None
    ) -> None:
        """Create the copies on ``owner`` (frozen deep copies of the online modules, in ``copies`` order).
        ``adapt(name, copy)`` may change a copy without changing its parameter names (DINO: no drop path)."""
        for name, source in self.copies.items():
            target = momentum_copy(self._online(owner, backbone, source))
            setattr(owner, name, adapt(name, target) if adapt is not None else target)

    def is_bound(self, owner: nn.Module) -> bool:
        return all(isinstance(getattr(owner, name, None), nn.Module) for name in self.copies)

    def check_bound(self, owner: nn.Module, method: str) -> None:
        if not self.is_bound(owner):
            raise RuntimeError(
                f"{method}.bind(backbone) must be called before the first forward (SSLModule does it) "
                f"to create the EMA copies {', '.join(self.copies)}"
            )

    # ------------------------------------------------------------------------------------------------ schedule
    def num_updates(self, total_steps: int) -> int:
        """EMA updates in a run of ``total_steps`` optimizer steps (at least 1)."""
        return max(1, total_steps - 1) if self.timing == "before_forward" else total_steps

    def momentum_at(self, step) -> float:
        """The momentum of an update made when ``step.global_step`` optimizer steps have been taken (a
        :class:`~ssl_vision.objectives.base.StepInfo`, as the hook receives it)."""
        return ema_momentum(step.global_step, self.num_updates(step.total_steps), self.momentum, self.momentum_end)

    # ------------------------------------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, owner: nn.Module, backbone: nn.Module, step) -> float:
        """EMA of every copy towards its online module (parameters only; BN statistics stay the copy's own) with
        :meth:`momentum_at`; returns the momentum. ``before_forward``: no update at step 0 (the copies are still
        the online networks) nor twice in one step (gradient accumulation)."""
        m = self.momentum_at(step)
        if self.timing == "before_forward":
            if step.global_step == owner._ema_step.read(owner.ema_step):
                return m
            self._apply(owner, backbone, m)
            owner._ema_step.write(owner.ema_step, step.global_step)
        else:
            self._apply(owner, backbone, m)
        return m

    def _apply(self, owner: nn.Module, backbone: nn.Module, m: float) -> None:
        for name, source in self.copies.items():
            ema_update_(getattr(owner, name), self._online(owner, backbone, source), m)

    @staticmethod
    def _online(owner: nn.Module, backbone: nn.Module, source: str) -> nn.Module:
        return backbone if source == "backbone" else getattr(owner, source)
