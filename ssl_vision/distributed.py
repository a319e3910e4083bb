"""Every cross-process communication of the toolkit lives here.

Each helper is a no-op (identity) on a single process, so objectives call them unconditionally.
See methods.md section 0.3 and 11 for what each method must synchronise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (N·W, ...) in rank order, differentiable (backward sum-reduces)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
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


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); returns a new tensor, the input is untouched."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / world_size()


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
        raise ValueError(f"batch_shuffle needs the same batch on every process; got {n} here, {b} in total over "
                         f"{world_size()} processes (use drop_last=True)")
    if rank() == 0:
        perm = torch.randperm(b, generator=generator).to(x.device)
    else:
        perm = torch.empty(b, dtype=torch.long, device=x.device)  # filled by the broadcast
    broadcast(perm, 0)
    r = rank()
    return x_all[perm[r * n:(r + 1) * n]], perm


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
