"""The objective protocol every method implements (see docs/reference.md §12 for the hook order)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ssl_vision.optim import param_groups


#: method name -> objective class, filled by :func:`register`.
OBJECTIVES: dict[str, type["Objective"]] = {}


def register(*names: str):
    """Class decorator: make the objective available as ``method=<name>`` (one class may serve several names)."""

    def deco(cls):
        for name in names:
            if name in OBJECTIVES and OBJECTIVES[name] is not cls:
                raise ValueError(f"method name {name!r} registered twice")
            OBJECTIVES[name] = cls
        return cls

    return deco


@dataclass
class StepInfo:
    """Training progress, so objectives compute schedules from progress, never from wall time.

    ``global_step`` counts optimizer steps (gradient accumulation included), ``total_steps`` is the run's total.
    """

    global_step: int
    total_steps: int
    epoch: int
    max_epochs: int
    steps_per_epoch: int = 1
    indices: torch.Tensor | None = None

    @property
    def progress_epochs(self) -> float:
        """Fractional epoch ``epoch + i/iters`` (MoCo v3 / MAE schedules)."""
        return self.global_step / max(1, self.steps_per_epoch)


@dataclass
class ObjectiveOutput:
    """What an objective hands back to :class:`~ssl_vision.module.SSLModule` for one batch.

    loss: scalar to minimise.
    features: (N, D) backbone features of the first view (detached by the module) for the online probe.
    embedding: (N, E) the objective's output embedding of the first view (projector output); the collapse monitor
        reads it unless the objective's ``collapse_monitor`` says otherwise.
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

    #: how many of the batch's views the objective consumes (the first ones); None = all (multi-crop methods).
    num_views: int | None = 2

    #: which :class:`ObjectiveOutput` tensor the collapse monitor (``train/collapse_std``,
    #: :func:`~ssl_vision.nn.monitor.collapse_std`) reads: ``"embedding"`` (the projector output of contrastive,
    #: clustering and EMA methods, ≈ 1/√E when healthy, → 0 on collapse) or None for an objective whose loss has no
    #: such collapse mode and whose outputs have no reason to spread over the sphere (MAE): no monitor is logged then.
    collapse_monitor: str | None = "embedding"

    #: backbone families the objective trains: ``"resnet"`` (torchvision ResNets), ``"vit"`` (timm ViTs).
    supported_families: tuple[str, ...] = ("resnet", "vit")

    #: whether a global batch split over W processes gives the loss and (DDP-averaged) gradients of one process.
    #: False only for objectives that draw their own random numbers per process (MAE's masks): their own tests
    #: check the W-process case with the randomness fixed.
    world_size_invariant: bool = True

    #: buffers that hold one block of rows per process (SwAV's queue: each process's own past embeddings), so that
    #: their row order, not their content, depends on the number of processes (rows along dim -2).
    per_process_row_buffers: tuple[str, ...] = ()

    @classmethod
    def tiny_kwargs(cls) -> dict:
        """``method.kwargs`` overrides that make the objective CPU-test sized (small heads, queues, banks) with
        every stateful path still used within a few steps of batch 8-16 (queues filled and read, schedules and
        freezes crossing an epoch). tests/objectives/test_contract.py builds every registered objective with them."""
        return {}

    def bind(self, backbone: nn.Module) -> None:
        """Called once with the online backbone (momentum methods copy it here)."""

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        raise NotImplementedError  # abstract: each objective implements it

    def before_optimizer_step(self, step: StepInfo) -> None:
        """After backward, before the step, on unscaled gradients: gradient cancellation (SwAV prototypes,
        DINO last layer), per-parameter clipping."""

    def after_optimizer_step(self, backbone: nn.Module, step: StepInfo) -> None:
        """EMA teachers, queue/bank writes, centres: state updates that follow the optimizer step."""

    def compile_targets(self) -> list[str]:
        """Names of the objective's own submodules that ``perf.compile`` compiles too (beside the backbones)."""
        return []

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the objective's own parameters (heads). Override for special groups."""
        return param_groups(self.named_parameters(), weight_decay, name="objective")


def num_global_crops(views: list[torch.Tensor]) -> int:
    """How many leading views share the first view's size: the global crops of a multi-crop batch (ordered
    large → small), or all of them when every view has one size."""
    n = 1
    while n < len(views) and views[n].shape[-2:] == views[0].shape[-2:]:
        n += 1
    return n


def forward_by_resolution(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all views, one pass per run of consecutive same-size views (multi-crop, SwAV/DINO).

    views: V tensors (N, C, H_v, W_v), ordered large → small. Returns (V·N, D) in view order.
    """
    out, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out.append(backbone(torch.cat(views[start:end])))
        start = end
    return torch.cat(out)


# ------------------------------------------------------------------------------------- construction checks
#: the smallest temperature accepted: logits are divided by it, so 1e-9 turns cosine similarities into 1e9-sized
#: numbers (loss ~4e8) instead of an error; every paper's value is far above it
MIN_TEMPERATURE = 1e-3


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_count(key: str, value, minimum: int = 1, note: str = "") -> int:
    """``method.kwargs.<key>`` must be an integer >= ``minimum`` (a count: prototypes, queue rows, dims, layers)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"method.kwargs.{key} must be an integer >= {minimum}, got {value!r}" + (f" ({note})" if note else "")
        )
    return value


def check_range(
    key: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False, note: str = ""
) -> float:
    """``method.kwargs.<key>`` must be a number in the interval; the message writes the interval as [a, b) etc."""
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(
            f"method.kwargs.{key} must be a number in {interval}, got {value!r}" + (f" ({note})" if note else "")
        )
    return value


def check_temperature(key: str, value, papers: str) -> float:
    """A softmax temperature: finite and >= ``MIN_TEMPERATURE``; ``papers`` says what the papers use."""
    if not (_is_number(value) and math.isfinite(value) and value >= MIN_TEMPERATURE):
        raise ValueError(
            f"method.kwargs.{key} must be a number >= {MIN_TEMPERATURE:g} (logits are divided by it; "
            f"{papers}), got {value!r}"
        )
    return value
