"""Memory structures that outlive a batch: MoCo's key queue, and host mirrors of integer state buffers.

All state is in registered buffers, so a checkpoint holds it and a resumed run continues with the same negatives.
"""

from __future__ import annotations

import functools

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
                f"or change data.batch_size so that B divides K")
        p = self.host_ptr()
        self.queue[:, p:p + b] = keys.detach().T.to(self.queue.dtype)
        self._ptr.write(self.ptr, (p + b) % k)
