"""Device prefetch of the train batches (``data.device_prefetch``): batch i+1 is copied to the GPU on a side stream
while step i runs, so that no host-to-device copy sits in a training step's critical path.

Without it, Lightning moves each batch right before its step, on the compute stream (``batch_to_device``), and its
fetcher does not look ahead for a loader with a length (``_PrefetchDataFetcher`` skips its look-ahead when the length
is known, as it is for :class:`~ssl_vision.data.datamodule.ResumableLoader`): the step waits for its own copy. With it,
one pass of the train loader is wrapped in a :class:`DevicePrefetchIterator`. When Lightning asks for batch i:

1. the compute stream waits for the side stream, which holds batch i's copy (``current.wait_stream(side)``), and
   every tensor of batch i gets ``record_stream(current)``, so the caching allocator does not hand its memory (taken
   on the side stream) to another tensor while the step still reads it;
2. batch i+1 is taken from the loader and each of its tensors copied with ``non_blocking=True`` on the side stream
   (after the wait of 1., so that wait does not include this copy); the copy runs while step i computes;
3. batch i, already on the device, is returned: Lightning's ``batch_to_device`` finds its tensors where they should
   be and moves nothing.

What is copied is what Lightning's own transfer would copy: every tensor of the collated structure (images, labels,
indices; anything ``lightning_utilities``' ``apply_to_collection`` reaches in mappings, sequences and dataclasses).
Everything else stays as it is: lists of sizes and keys, and :class:`~ssl_vision.data.encoded.EncodedFiles` (the
JPEG bytes the decoder reads from the host). The batch structure handed on is a new one (Lightning's transfer makes
a new one too), with the same values.

Nothing else changes: the same batches in the same order, the loader's ``len()``, the epoch's end and the data
position in checkpoints (which comes from the trainer's count of batches run, not from how far the loader was
read). The look-ahead is one batch and stays inside one pass of the loader: at the epoch's end it meets the pass's
own end (never a batch of the next epoch), and an error raised while reading the next batch (a bad image, a worker
that died) is kept and raised when that batch is asked for, at the step where it would have been raised without the
prefetch. Each DDP process wraps its own loader pass, on its own device. On any device but CUDA, or without a
trainer that fits, the loader pass is returned unchanged (a pass-through).

The CUDA calls (stream, copy, wait, record) go through a small :class:`CudaStreams` object made per device by
:func:`cuda_streams`; tests put a recording stand-in in its place to check the order of the calls on the CPU.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

__all__ = ["CudaStreams", "DevicePrefetchIterator", "DevicePrefetcher", "Streams", "cuda_streams"]


class Streams(Protocol):
    """The device calls of the prefetch, for one device: :class:`CudaStreams`, or a test's stand-in."""

    side: Any  # the dedicated copy stream

    def copying(self) -> AbstractContextManager: ...  # work issued inside runs on ``side``

    def move(self, tensor: Tensor) -> Tensor: ...  # an asynchronous copy to the device

    def current(self) -> Any: ...  # the stream the training step runs on

    def record(self, tensor: Tensor, stream: Any) -> None: ...  # ``tensor`` is used on ``stream``


class CudaStreams:
    """A dedicated ``torch.cuda.Stream`` on ``device`` for the copies, and the calls the prefetch makes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device=device)

    def copying(self) -> AbstractContextManager:
        return torch.cuda.stream(self.side)

    def move(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.device, non_blocking=True)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def record(self, tensor: Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)


def cuda_streams(device: torch.device) -> Streams | None:
    """The prefetch's streams for ``device``: :class:`CudaStreams` on a CUDA device, None (no prefetch) otherwise."""
    return CudaStreams(device) if device.type == "cuda" else None


class DevicePrefetchIterator:
    """One pass of a loader with the next batch already on its way to the device (see the module's docstring).

    ``on_handout(host_batch, device_batch, pairs)`` is called with each batch as it is returned, ``pairs`` the list of
    (device tensor, host tensor) it was copied from.
    """

    def __init__(
        self,
        iterator: Iterator,
        streams: Streams,
        on_handout: Callable[[Any, Any, list[tuple[Tensor, Tensor]]], None] | None = None,
    ) -> None:
        self.iterator, self.streams, self.on_handout = iterator, streams, on_handout
        self._ahead: tuple[Any, Any, list[tuple[Tensor, Tensor]]] | None = None  # (host, device, pairs) in flight
        self._started = False
        self._ended = False  # the loader pass is used up (or failed: _error)
        self._error: Exception | None = None

    def __iter__(self) -> DevicePrefetchIterator:
        return self

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]

    def _fetch(self) -> tuple[Any, Any, list[tuple[Tensor, Tensor]]]:
        """Read the next host batch and start its copy on the side stream."""
        host = next(self.iterator)
        pairs: list[tuple[Tensor, Tensor]] = []

        def move(t: Tensor) -> Tensor:
            moved = self.streams.move(t)
            pairs.append((moved, t))
            return moved

        with self.streams.copying():
            device = apply_to_collection(host, Tensor, move)
        return host, device, pairs

    def _read_ahead(self) -> None:
        try:
            self._ahead = self._fetch()
        except StopIteration:
            self._ended = True
        except Exception as err:  # raised when the batch it stands for is asked for (next call)
            self._ended, self._error = True, err

    def __next__(self) -> Any:
        if not self._started:
            self._started = True
            self._ahead = self._fetch()  # nothing handed out yet: an empty pass or an error surfaces now
        if self._ahead is None:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            raise StopIteration
        host, device, pairs = self._ahead
        self._ahead = None
        current = self.streams.current()
        current.wait_stream(self.streams.side)  # this batch's copy, issued on the side stream before now
        for moved, _ in pairs:
            self.streams.record(moved, current)
        if not self._ended:
            self._read_ahead()  # the next batch's copy runs while this batch's step computes
        if self.on_handout is not None:
            self.on_handout(host, device, pairs)
        return device


class DevicePrefetcher:
    """The train loader's device prefetch: wraps each pass of the loader (:meth:`wrap`) in a
    :class:`DevicePrefetchIterator` when ``device()`` names a device that ``streams`` has streams for.

    ``device``: called at the start of each pass; the device the training step runs on (the trainer's
    ``strategy.root_device``; each DDP process its own), or None (no trainer fitting: no prefetch). ``streams``: device
    -> :class:`Streams` or None (no prefetch on that device); default :func:`cuda_streams`, made once per device.
    """

    def __init__(
        self,
        device: Callable[[], torch.device | None],
        streams: Callable[[torch.device], Streams | None] | None = None,
    ) -> None:
        self.device, self._make_streams = device, streams
        self._streams: dict[torch.device, Streams | None] = {}
        # the host tensors of the last two batches handed out: id(device tensor) -> (weak reference to the device
        # tensor, host tensor); weak, so that this memory does not keep a used batch on the device
        self._recent: collections.deque[dict[int, tuple[weakref.ref, Tensor]]] = collections.deque(maxlen=2)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a spawned process, a deep copy) without its streams and remembered batches: those belong to
        this process and are made again on use."""
        state = self.__dict__.copy()
        state["_streams"], state["_recent"] = {}, collections.deque(maxlen=2)
        return state

    def streams_for(self, device: torch.device) -> Streams | None:
        if device not in self._streams:
            make = self._make_streams or cuda_streams  # looked up at call time
            self._streams[device] = make(device)
        return self._streams[device]

    def wrap(self, iterator: Iterator) -> Iterator:
        """``iterator`` (one pass of the loader) itself when there is nothing to prefetch to, else a
        :class:`DevicePrefetchIterator` over it."""
        device = self.device()
        streams = None if device is None else self.streams_for(device)
        if streams is None:
            return iterator
        self._recent.clear()
        return DevicePrefetchIterator(iterator, streams, on_handout=self._remember)

    def _remember(self, host: Any, device: Any, pairs: list[tuple[Tensor, Tensor]]) -> None:
        self._recent.append({id(moved): (weakref.ref(moved), source) for moved, source in pairs})

    def host_copy(self, tensor: Tensor) -> Tensor | None:
        """The host tensor that ``tensor`` (a tensor of one of the last two batches handed out) was copied from, or
        None: lets a hook read a batch's labels without reading the device (a host-device sync)."""
        for batch in reversed(self._recent):
            found = batch.get(id(tensor))
            if found is not None and found[0]() is tensor:  # not another tensor at a freed one's address
                return found[1]
        return None
