"""Memory structures that outlive a batch: MoCo's key queue, InstDisc's memory bank, SwAV's queue of embeddings, and
host mirrors of integer state buffers.

All state is in registered buffers, so a checkpoint holds it and a resumed run continues with the same negatives.
MoCo's queue is a submodule (``objective.queue.queue``); the bank and SwAV's queue are buffers of their objectives
under their historical names (``objective.bank``, ``objective.queue``), and the functions here read and write them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def valid_queue_sizes(size: int, batch: int) -> tuple[int, int]:
    """The two multiples of ``batch`` nearest to ``size``, distinct and at least ``batch`` (a queue holds at least
    one batch): the multiples just below and above ``size``, or ``batch`` and ``2 * batch`` when ``size < batch``."""
    below = (size // batch) * batch
    if below < batch:
        return batch, 2 * batch
    return below, below + batch


def _invalidate_mirrors(names: tuple[str, ...], module: nn.Module, incompatible_keys) -> None:
    for name in names:
        getattr(module, name).invalidate()


class HostMirror:
    """A host-side copy (a Python int) of a 0-d integer or bool buffer that decides what the host does next (a queue
    pointer, the step of the last EMA update, a "done" flag).

    Reading the buffer on a GPU (``int(buf)``) waits for the device; the mirror reads it once, on first use, and
    afterwards :meth:`write` updates both the buffer (on its device, without a read: ``fill_``, so checkpoints hold
    the value as before) and the copy. The buffer stays the truth: :meth:`watch` registers a post-load hook on the
    owning module that drops the copy whenever a state dict is loaded into it (a resume, a restored checkpoint), so
    the next :meth:`read` takes the loaded value. Device moves (``.to()``) keep the value, so they need nothing.
    Every process holds the same buffers (checkpoints and DDP), hence the same mirror and the same decisions.
    Anything else that writes the buffer in place must call :meth:`invalidate`.
    """

    def __init__(self) -> None:
        self._value: int | None = None

    @staticmethod
    def watch(owner: nn.Module, *names: str) -> None:
        """Drop the mirrors ``owner.<name>`` after every ``owner.load_state_dict`` (also when a parent module loads).

        The hook looks the mirrors up on the module it is called with, so a deep copy or an unpickled module
        invalidates its own mirrors (and the module stays picklable)."""
        owner.register_load_state_dict_post_hook(functools.partial(_invalidate_mirrors, names))

    def invalidate(self) -> None:
        self._value = None

    def read(self, buffer: torch.Tensor) -> int:
        """The buffer's value; a device read only on the first call after construction or a load."""
        if self._value is None:
            self._value = int(buffer)
        return self._value

    def write(self, buffer: torch.Tensor, value: int) -> None:
        """Set the buffer (on its device, no read) and the copy to ``value``."""
        buffer.fill_(value)
        self._value = int(value)


class KeyQueue(nn.Module):
    """MoCo's FIFO dictionary of keys (He et al. 2019, https://arxiv.org/abs/1911.05722, ``moco/builder.py``).

    ``queue``: (dim, K) buffer, one L2-normalised key per column, initialised with normalised random vectors (the
    official init; they act as random negatives until the first K keys have been written). ``ptr``: the column
    where the next batch goes. :meth:`enqueue` overwrites the *oldest* B columns, so the queue always holds the
    keys of the last K/B batches (after the first K/B steps).
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"KeyQueue needs dim >= 1 and size >= 1, got dim={dim}, size={size}")
        self.register_buffer("queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._ptr = HostMirror()  # host copy of ``ptr``: enqueue never reads the device
        HostMirror.watch(self, "_ptr")

    def host_ptr(self) -> int:
        """The pointer as a Python int (read from ``ptr`` once after construction or a load, then kept on the host)."""
        return self._ptr.read(self.ptr)

    @property
    def size(self) -> int:
        return self.queue.shape[1]

    def negatives(self) -> torch.Tensor:
        """(dim, K) detached **copy** of the queue: the logits use it while :meth:`enqueue` writes in place, and
        autograd must not see the write (the official ``self.queue.clone().detach()``)."""
        return self.queue.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of the *global* batch (B, dim) at the pointer and advance it by B modulo K.

        Every process must pass the same all-gathered keys so that every process holds the same queue.
        K must be a multiple of B (moco PRs #99/#100): the write never wraps around the end, and the pointer
        arithmetic stays exact; a partial batch would break it, hence ``drop_last=True`` in the data module.
        """
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[0]:
            raise ValueError(f"enqueue expects keys (B, {self.queue.shape[0]}), got {tuple(keys.shape)}")
        b, k = keys.shape[0], self.size
        if b == 0 or k % b:
            hint = " (e.g. {} or {})".format(*valid_queue_sizes(k, b)) if b else ""
            raise ValueError(
                f"MoCo queue size K={k} is not a multiple of the global batch B={b} (per-process batch × processes, "
                f"× 2 with the symmetric loss); set method.kwargs.queue_size to a multiple of B{hint} "
                f"or change data.batch_size so that B divides K"
            )
        p = self.host_ptr()
        self.queue[:, p : p + b] = keys.detach().T.to(self.queue.dtype)
        self._ptr.write(self.ptr, (p + b) % k)


# ------------------------------------------------------------------------------------------------ InstDisc's bank
def bank_init(num_samples: int, dim: int) -> torch.Tensor:
    """InstDisc's memory bank V at the start: (n, d) uniform in [−1/√(d/3), +1/√(d/3)] (``lib/NCEAverage.py``), so
    each row has E‖v‖² = 1, like a normalised feature. One row per training image."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_samples, dim).mul_(2 * stdv).add_(-stdv)


def momentum_bank_rows(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """``n(μ·v + (1−μ)·f)``: the bank write of ``lib/NCEAverage.py`` (re-normalised after every write).

    old: (B, d) current bank rows; new: (B, d) detached features of the same samples. Returns (B, d).
    """
    return F.normalize(old * momentum + new * (1.0 - momentum), dim=1)


@torch.no_grad()
def write_bank_rows_(bank: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
    """``V[i] ← n(μ·V[i] + (1−μ)·f_i)`` in place for the (distinct) rows ``indices`` (B,), features (B, d)."""
    bank[indices] = momentum_bank_rows(bank[indices], features.to(bank.dtype), momentum)


def bank_scores(
    f: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor, gather_rows: bool | None = None
) -> torch.Tensor:
    """``v_{cols[b,k]} · f_b`` for every anchor b and column k: (N, d), (n, d), (N, K) -> (N, K).

    Two exact ways: gather the N·K bank rows and take batched dot products (the official code; memory N·K·d),
    or score f against the whole bank and pick the columns (memory N·n). ``None`` picks the smaller: the full
    product on CIFAR-sized banks, the row gather on ImageNet's 1.28 M rows.
    """
    if gather_rows is None:
        gather_rows = bank.shape[0] > cols.shape[1] * bank.shape[1]
    if gather_rows:
        return torch.bmm(bank[cols], f.unsqueeze(2)).squeeze(2)
    return (f @ bank.T).gather(1, cols)


# ------------------------------------------------------------------------------------------------ SwAV's queue
def rank_block(queue: torch.Tensor, index: int, rank: int, world: int) -> torch.Tensor:
    """(L/W, E): the block of SwAV's queue (A, L, E) that process ``rank`` of ``world`` uses for assigned crop
    ``index`` (the official per-rank queue of L/W rows)."""
    per_rank = queue.shape[1] // world
    return queue[index, rank * per_rank : (rank + 1) * per_rank]


@torch.no_grad()
def push_rank_blocks_(queue: torch.Tensor, new: torch.Tensor, world: int) -> None:
    """Push the all-gathered embeddings ``new`` (W·N, A, E), in rank order, into every rank's block of ``queue``
    (A, L, E), newest first: each block shifts by N rows and its first N rows get that rank's N embeddings. Every
    process writes every block, so the queue is identical on all of them (and rank 0's checkpoint holds them all)."""
    a, length, e = queue.shape
    n = new.shape[0] // world
    new = new.view(world, n, a, e).permute(2, 0, 1, 3)  # (A, W, N, E)
    blocks = queue.view(a, world, length // world, e)
    blocks[:, :, n:] = blocks[:, :, :-n].clone()
    blocks[:, :, :n] = new.to(blocks.dtype)
