"""The objective protocol every method implements (see design.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ssl_vision.optim import param_groups


@dataclass
class StepInfo:
    """Training progress, so objectives compute schedules from progress, never from wall time.

    ``global_step`` counts optimizer steps (gradient accumulation included), ``total_steps`` is the run's total.
    """

    global_step: int
    total_steps: int
    epoch: int
    max_epochs: int
    indices: torch.Tensor | None = None


@dataclass
class ObjectiveOutput:
    """What an objective hands back to :class:`~ssl_vision.module.SSLModule` for one batch.

    loss: scalar to minimise.
    features: (N, D) backbone features of the first view (detached by the module) for the online probe.
    embedding: (N, E) the output whose per-dimension std after L2 normalisation is the collapse monitor.
    logs: extra scalars to log (already detached).
    """

    loss: torch.Tensor
    features: torch.Tensor
    embedding: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: heads, momentum copies and queues live here as submodules/buffers (so checkpoints hold them).

    The backbone is *not* registered here: the module owns it and passes it to :meth:`forward`.
    """

    #: which sample views the objective consumes: first ``num_views`` of the batch (multi-crop methods override).
    num_views: int = 2

    def bind(self, backbone: nn.Module) -> None:
        """Called once with the online backbone (momentum methods copy it here)."""

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        raise NotImplementedError  # abstract: each objective implements it

    def after_optimizer_step(self, backbone: nn.Module, step: StepInfo) -> None:
        """EMA teachers, queue/bank writes, centres: state updates that follow the optimizer step."""

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the objective's own parameters (heads). Override for special groups."""
        return param_groups(self.named_parameters(), weight_decay, name="objective")
