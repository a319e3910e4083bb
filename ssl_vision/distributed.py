"""Every cross-process communication of the toolkit lives here.

Each helper is a no-op (identity) on a single process, so objectives call them unconditionally.
See docs/reference.md §0.3 and §11 for what each method must synchronise.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


# ------------------------------------------------------------------------------------------------------------------
# Collective timeout (``distributed.timeout_s``)
# ------------------------------------------------------------------------------------------------------------------
#: the collective timeout of this process's group in seconds, as configured (None: not set through here)
_timeout_s: float | None = None

#: what torch.distributed says when a collective times out (gloo: "Timed out waiting 1800000ms for recv operation",
#: "Application timeout caused pair closure"; NCCL's watchdog: "Watchdog caught collective operation timeout")
_TIMEOUT_WORDS = re.compile(r"timed out|timeout", re.IGNORECASE)


class CollectiveTimeoutError(RuntimeError):
    """A collective waited ``distributed.timeout_s`` for another process that never joined it."""


def set_collective_timeout(seconds: float | None) -> None:
    """Record the configured timeout, for the message of :class:`CollectiveTimeoutError`."""
    global _timeout_s
    _timeout_s = seconds


def _waited_s(exc: BaseException) -> float | None:
    if _timeout_s is not None:
        return _timeout_s
    found = re.search(r"waiting (\d+)\s*ms", str(exc))
    return int(found.group(1)) / 1000 if found else None


_STOPPED = (
    "another process stopped or hung (a suspended job, a deadlock, a stuck file system or data loader). This "
    "process stops here; the last checkpoint is kept, so once every process runs again continue with "
    "resume=auto"
)


@contextlib.contextmanager
def explain_timeout(where: str, cause: str = _STOPPED) -> Iterator[None]:
    """Turn a timed-out collective inside the block into a :class:`CollectiveTimeoutError` that says which rank
    waited, how long, where, the likely ``cause`` and what to do. Other errors (a peer that died closes the
    connection at once) pass through unchanged, as does an error already explained further in."""
    try:
        yield
    except CollectiveTimeoutError:
        raise
    except RuntimeError as exc:  # torch's DistBackendError is a RuntimeError
        if not _TIMEOUT_WORDS.search(str(exc)):
            raise
        waited = _waited_s(exc)
        r = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        how_long = f"{waited:g} s" if waited is not None else "the collective timeout"
        longer = f"distributed.timeout_s={max(2 * waited, 60):g}" if waited is not None else "distributed.timeout_s=..."
        raise CollectiveTimeoutError(
            f"rank {r} waited {how_long} for the other processes at {where}; {cause}. If steps are legitimately "
            f"this slow (long checkpoint writes, compilation, a download on one rank), raise {longer}. [{exc}]"
        ) from exc


def _explained(where: str):
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with explain_timeout(where):
                return fn(*args, **kwargs)

        return inner

    return wrap


class TimeoutDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with the collective timeout of ``distributed.timeout_s`` and a clear error when it
    fires: every place where this process waits for the others (the forward's buffer broadcast and our gathers, the
    gradient all-reduce in backward, barriers, broadcasts, reductions) reports a timeout as a
    :class:`CollectiveTimeoutError` naming the rank, the time waited and the place, instead of gloo's bare
    "Timed out waiting 1800000ms for recv operation" -- or, before the timeout was configurable, 30 silent minutes.
    """

    def __init__(self, timeout_s: float, **kwargs: Any) -> None:
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s must be a positive number of seconds, got {timeout_s!r}")
        super().__init__(timeout=timedelta(seconds=float(timeout_s)), **kwargs)
        self.timeout_s = float(timeout_s)

    def setup_environment(self) -> None:
        set_collective_timeout(self.timeout_s)
        with explain_timeout(
            "process-group start-up",
            "not every process arrived: one failed to start or is still "
            "starting (a loaded machine, slow imports), or the address / port is unreachable",
        ):
            super().setup_environment()

    def training_step(self, *args: Any, **kwargs: Any):
        with explain_timeout(f"the forward of training step {self._step()} (buffer broadcast or a gather)"):
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any):
        with explain_timeout("a validation step"):
            return super().validation_step(*args, **kwargs)

    def backward(self, *args: Any, **kwargs: Any):
        with explain_timeout(f"the gradient all-reduce of training step {self._step()}"):
            return super().backward(*args, **kwargs)

    def barrier(self, name: str | None = None) -> None:
        with explain_timeout(f"a barrier ({name or 'unnamed'}: checkpoint save, setup or teardown)"):
            super().barrier(name)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with explain_timeout("a broadcast from rank 0"):
            return super().broadcast(obj, src)

    def reduce(self, *args: Any, **kwargs: Any):
        with explain_timeout("a reduction of logged values"):
            return super().reduce(*args, **kwargs)

    def all_gather(self, *args: Any, **kwargs: Any):
        with explain_timeout("an all-gather"):
            return super().all_gather(*args, **kwargs)

    def reduce_boolean_decision(self, *args: Any, **kwargs: Any) -> bool:
        with explain_timeout("a stop decision shared by all processes"):
            return super().reduce_boolean_decision(*args, **kwargs)

    def _step(self) -> str:
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        return str(trainer.global_step) if trainer is not None else "?"


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward **sums** the incoming gradients over ranks and keeps the local slice.

    Each rank computes its loss for its local anchors against the gathered set; the gradient reaching a
    local embedding is the sum of what every rank's loss sends it. DDP then averages parameter gradients,
    which gives exactly the gradient of the global mean loss (lightly#1528 returned only the local part).
    Written with all_reduce rather than reduce_scatter because gloo (CPU) has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


@_explained("an all-gather of embeddings (gather_with_grad)")
def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (N·W, ...) in rank order, differentiable (backward sum-reduces)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
@_explained("an all-gather (gather_no_grad)")
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (N·W, ...) in rank order, without gradient (keys, bank writes).

    Ranks may hold different N (e.g. the last evaluation batch); sizes are exchanged first.
    """
    if not is_distributed():
        return x
    x = x.contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    n_max = int(max(s.item() for s in sizes))
    padded = x.new_zeros((n_max, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], 0)


@_explained("an all-reduce (all_reduce_sum)")
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); returns a new tensor, the input is untouched."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / world_size()


@_explained("the online probe's gradient all-reduce")
def average_gradients(params) -> None:
    """Average ``.grad`` over ranks in place, for modules kept outside DDP (the online probe)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()


# ------------------------------------------------------------------------------------------------------------------
# MoCo v1/v2 shuffle-BN (facebookresearch/moco builder.py ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``)
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
@_explained("a broadcast (distributed.broadcast)")
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` in place with rank ``src``'s tensor and return it (identity on one process)."""
    if is_distributed():
        dist.broadcast(x, src)
    return x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across processes for the key encoder's BatchNorm.

    All-gathers the key images (B = N·W, ...), draws a permutation of B on rank 0 (from ``generator``, a CPU
    generator, or the global RNG) and broadcasts it, and returns this rank's slice of the shuffled batch plus the
    permutation. Row j of the shuffled global batch is sample ``perm[j]``; this rank holds its rows
    ``[rank·N, (rank+1)·N)``.
    x: (N, ...) -> ((N, ...), perm (B,) int64 on x.device). Every rank must hold the same N.
    """
    x_all = gather_no_grad(x)
    b, n = x_all.shape[0], x.shape[0]
    if b != n * world_size():
        raise ValueError(
            f"batch_shuffle needs the same batch on every process; got {n} here, {b} in total over "
            f"{world_size()} processes (use drop_last=True)"
        )
    if rank() == 0:
        perm = torch.randperm(b, generator=generator).to(x.device)
    else:
        perm = torch.empty(b, dtype=torch.long, device=x.device)  # filled by the broadcast
    broadcast(perm, 0)
    r = rank()
    return x_all[perm[r * n : (r + 1) * n]], perm


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on its outputs: (N, ...) per rank in shuffled order -> (B, ...) global batch in the
    original sample order (row i belongs to sample i; this rank's own samples are rows ``[rank·N, (rank+1)·N)``)."""
    y_all = gather_no_grad(y)
    if y_all.shape[0] != perm.shape[0]:
        raise ValueError(f"batch_unshuffle: {y_all.shape[0]} gathered rows for a permutation of {perm.shape[0]}")
    out = torch.empty_like(y_all)
    out[perm] = y_all  # shuffled row j is sample perm[j]
    return out
