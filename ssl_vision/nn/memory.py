"""Memory structures that outlive a batch: MoCo's key queue.

All state is in registered buffers, so a checkpoint holds it and a resumed run continues with the same negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
            hint = f" (e.g. {(k // b) * b or b} or {(k // b + 1) * b})" if b else ""
            raise ValueError(
                f"MoCo queue size K={k} is not a multiple of the global batch B={b} (per-process batch × processes, "
                f"× 2 with the symmetric loss); set method.kwargs.queue_size to a multiple of B{hint} "
                f"or change data.batch_size so that B divides K")
        p = int(self.ptr)
        self.queue[:, p:p + b] = keys.detach().T.to(self.queue.dtype)
        self.ptr.fill_((p + b) % k)
