"""data.device_prefetch: the next train batch copied to the device on a side stream while the step runs
(ssl_vision/data/prefetch.py).

On the CPU the CUDA calls are replaced by a recording stand-in (``FakeStreams``: the "copy" is a clone made inside the
side-stream context, waits and ``record_stream`` calls are logged), which checks the order of the calls, the look-ahead
and the loader's end; a real fit with the stand-in must train exactly as without the prefetch. The CUDA test at the
end runs where a GPU is present.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch

import ssl_vision.data.prefetch as prefetch_mod
from ssl_vision.checkpoint_io import load_checkpoint
from ssl_vision.data import SSLDataModule
from ssl_vision.data.encoded import EncodedFiles
from ssl_vision.data.prefetch import DevicePrefetcher, DevicePrefetchIterator
from ssl_vision.launch import run_pretraining
from tests.conftest import FAST

# 24 synthetic samples / 8 per batch = 3 batches per epoch; 4 steps stop one batch into the second epoch
BASE = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "trainer.limit_val_batches=0",
    "eval.final_eval=false",
    "eval.knn_at_init=false",
    "trainer.max_epochs=10",
    "trainer.max_steps=4",
    "data.synthetic_size=24",
    "data.batch_size=8",
    "data.image_size=16",
    "method.kwargs.proj_hidden_dim=32",
    "method.kwargs.proj_out_dim=16",
    "augment.backend=batched",  # raw uint8 batches (a dict with host-only lists) turned into views after the transfer
]
BATCHES_PER_EPOCH = 24 // 8
STEPS = 4


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait", self.name, other.name))


class FakeStreams:
    """Stands in for :class:`~ssl_vision.data.prefetch.CudaStreams` on the CPU: a "copy" is a clone, which must be
    made inside :meth:`copying` (on the side stream); every call is logged with the tensor's name."""

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self.log: list[tuple] = []
        self.side = FakeStream("side", self.log)
        self._current = FakeStream("current", self.log)
        self.names = names if names is not None else {}
        self.keep: list[torch.Tensor] = []  # keeps the ids in ``names`` unique
        self.on_side = False

    @contextlib.contextmanager
    def copying(self):
        self.on_side = True
        try:
            yield
        finally:
            self.on_side = False

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        assert self.on_side, "a copy was issued outside the side stream"
        moved = tensor.clone()
        name = self.names.get(id(tensor), "?")
        self.names[id(moved)] = name
        self.keep += [tensor, moved]
        self.log.append(("move", name))
        return moved

    def current(self) -> FakeStream:
        return self._current

    def record(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record", self.names.get(id(tensor), "?"), stream.name))


TENSORS = ("view0", "view1", "labels", "indices")


def host_batches(n: int, names: dict[int, str]) -> list[dict]:
    """``n`` batches shaped like the batched backend's: tensors plus host-only lists and encoded files."""
    out = []
    for i in range(n):
        views = [torch.full((2, 3, 4, 4), float(i)), torch.full((2, 3, 2, 2), float(i) + 0.5)]
        batch = {
            "views": views,
            "labels": torch.tensor([i, -1]),
            "indices": torch.tensor([2 * i, 2 * i + 1]),
            "sizes": [(4, 4), (4, 4)],
            "files": EncodedFiles([torch.zeros(3, dtype=torch.uint8)], [0], [3]),
        }
        for name, t in zip(TENSORS, [*views, batch["labels"], batch["indices"]]):
            names[id(t)] = f"b{i}.{name}"
        out.append(batch)
    return out


class Source:
    """A loader pass over ``batches`` that logs each read; after its end it would go on with other batches (as a
    next epoch's would), so a read past the end shows."""

    def __init__(self, batches: list, log: list, fail_at: int | None = None) -> None:
        self.batches, self.log, self.fail_at, self.i, self.reads = batches, log, fail_at, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.reads += 1
        if self.fail_at is not None and self.i == self.fail_at:
            self.log.append(("fail", self.i))
            raise OSError(f"image file of batch {self.i} is truncated")
        if self.i >= len(self.batches):
            self.log.append(("end",))
            self.i = -(10**6)  # a further read would hand out something that is not this pass's
            raise StopIteration
        if self.i < 0:
            return {"next_epoch": True}
        self.log.append(("pull", self.i))
        self.i += 1
        return self.batches[self.i - 1]


def moves(i: int) -> list[tuple]:
    return [("move", f"b{i}.{name}") for name in TENSORS]


def waits_for(i: int) -> list[tuple]:
    return [("wait", "current", "side"), *[("record", f"b{i}.{name}", "current") for name in TENSORS]]


# ----------------------------------------------------------------------------------------------- the iterator alone
def test_looks_ahead_one_batch_and_waits_before_the_next_copy():
    """Asked for batch i, the prefetcher waits for batch i's copy (compute stream on the side stream), records each of
    its tensors on the compute stream, then reads batch i+1 and starts its copy on the side stream, and only then
    returns batch i: a look-ahead of exactly one batch, whose copy is not part of the wait."""
    names: dict[int, str] = {}
    streams = FakeStreams(names)
    batches = host_batches(3, names)
    it = DevicePrefetchIterator(Source(batches, streams.log), streams)
    assert streams.log == [], "nothing is read before the first next()"

    first = next(it)
    assert streams.log == [("pull", 0), *moves(0), *waits_for(0), ("pull", 1), *moves(1)]
    streams.log.clear()
    second = next(it)
    assert streams.log == [*waits_for(1), ("pull", 2), *moves(2)]
    streams.log.clear()
    third = next(it)
    assert streams.log == [*waits_for(2), ("end",)]  # the pass's end is met, nothing beyond it read
    streams.log.clear()
    for _ in range(3):
        with pytest.raises(StopIteration):
            next(it)
    assert streams.log == [], "after the end: no wait, no copy, no read"

    for host, got in zip(batches, (first, second, third)):
        for key in ("labels", "indices"):
            assert torch.equal(got[key], host[key]) and got[key] is not host[key]  # the device copy, same values
        assert all(torch.equal(g, h) and g is not h for g, h in zip(got["views"], host["views"]))
        assert got["sizes"] == host["sizes"] and got["files"] is host["files"]  # non-tensors left as they are


def test_every_tensor_moved_once_and_nothing_read_past_the_end():
    names: dict[int, str] = {}
    streams = FakeStreams(names)
    batches = host_batches(5, names)
    source = Source(batches, streams.log)
    got = list(DevicePrefetchIterator(source, streams))
    moved = [entry[1] for entry in streams.log if entry[0] == "move"]
    assert sorted(moved) == sorted(f"b{i}.{n}" for i in range(5) for n in TENSORS)  # each exactly once
    assert len(got) == 5 and source.reads == 6  # 5 batches and the one read that met the end
    assert not any("next_epoch" in b for b in got)


def test_error_while_reading_ahead_surfaces_at_its_own_batch():
    """A read that fails (a bad image, a dead worker) while batch i+1 is read ahead is raised when batch i+1 is asked
    for, as without the prefetch: batch i is still handed out first."""
    names: dict[int, str] = {}
    reference = Source(host_batches(3, {}), [], fail_at=2)
    plain = [next(reference), next(reference)]
    with pytest.raises(OSError, match="batch 2"):
        next(reference)

    streams = FakeStreams(names)
    it = DevicePrefetchIterator(Source(host_batches(3, names), streams.log, fail_at=2), streams)
    got = [next(it), next(it)]  # batch 1 is returned although reading batch 2 already failed
    assert ("fail", 2) in streams.log
    with pytest.raises(OSError, match="batch 2"):
        next(it)
    assert [int(b["labels"][0]) for b in got] == [int(b["labels"][0]) for b in plain] == [0, 1]
    with pytest.raises(StopIteration):
        next(it)


def test_first_read_errors_and_an_empty_pass_propagate_at_once():
    streams = FakeStreams()
    with pytest.raises(OSError, match="batch 0"):
        next(DevicePrefetchIterator(Source(host_batches(2, {}), streams.log, fail_at=0), streams))
    with pytest.raises(StopIteration):
        next(DevicePrefetchIterator(Source([], streams.log), streams))
    assert not any(entry[0] in ("wait", "record", "move") for entry in streams.log)


def test_host_copy_finds_the_host_tensor_of_recent_batches_only():
    names: dict[int, str] = {}
    streams = FakeStreams(names)
    batches = host_batches(4, names)
    prefetcher = DevicePrefetcher(lambda: torch.device("cpu"), streams=lambda device: streams)
    it = prefetcher.wrap(Source(batches, streams.log))
    got = [next(it), next(it), next(it)]
    assert prefetcher.host_copy(got[2]["labels"]) is batches[2]["labels"]
    assert prefetcher.host_copy(got[1]["indices"]) is batches[1]["indices"]
    assert prefetcher.host_copy(got[0]["labels"]) is None  # only the last two batches are kept
    assert prefetcher.host_copy(batches[2]["labels"]) is None  # a host tensor is no device copy
    assert prefetcher.host_copy(torch.tensor([2, -1])) is None
    gone = weakref.ref(got[2]["labels"])
    streams.keep.clear()
    del got
    gc.collect()
    assert gone() is None, "the prefetcher's memory of host copies does not keep a used batch on the device"


def _cpu() -> torch.device:
    return torch.device("cpu")


def _fake_streams(device: torch.device) -> FakeStreams:
    return FakeStreams()


def test_prefetcher_pickles_without_its_streams_and_batches():
    """A data module is pickled for a spawned process: the prefetcher goes without this process's streams and the
    batches it remembers (weak references, which cannot be pickled), and makes them again on use."""
    prefetcher = DevicePrefetcher(_cpu, streams=_fake_streams)
    it = prefetcher.wrap(iter(host_batches(3, {})))
    first = next(it)
    assert prefetcher.host_copy(first["labels"]) is not None
    copy = pickle.loads(pickle.dumps(prefetcher))
    assert copy._streams == {} and len(copy._recent) == 0
    assert copy.host_copy(first["labels"]) is None
    assert [int(b["labels"][0]) for b in copy.wrap(iter(host_batches(2, {})))] == [0, 1]


def test_off_cuda_the_prefetcher_is_a_pass_through():
    """The default streams exist for CUDA only: on the CPU (and with no trainer fitting: device None) the loader pass
    comes back unchanged, so the step gets the very objects the loader made."""
    batches = host_batches(2, {})
    passing = iter(batches)
    assert DevicePrefetcher(lambda: torch.device("cpu")).wrap(passing) is passing
    assert DevicePrefetcher(lambda: None).wrap(passing) is passing
    assert [b is h for b, h in zip(passing, batches)] == [True, True]


# ------------------------------------------------------------------------------------------- the data module and fit
def _datamodule(**kwargs) -> SSLDataModule:
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    views = OmegaConf.load(Path(CONF) / "augment" / "simclr.yaml").views
    return SSLDataModule(
        name="synthetic",
        root=None,
        image_size=16,
        in_chans=3,
        num_classes=4,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        batch_size=8,
        num_workers=0,
        views=views,
        synthetic_size=32,
        **kwargs,
    )


def test_datamodule_option_and_bad_value():
    assert isinstance(_datamodule().prefetcher, DevicePrefetcher)  # on by default
    assert _datamodule(device_prefetch=False).prefetcher is None
    with pytest.raises(ValueError, match=r"data.device_prefetch must be true or false, got 'yes'"):
        _datamodule(device_prefetch="yes")


def test_loader_without_a_trainer_is_unchanged():
    """Outside a fit (no trainer: no device to prefetch to) the train loader yields what it always did, with the same
    length."""
    dm = _datamodule()
    dm.setup()
    loader = dm.train_dataloader()
    got = list(loader)
    assert len(got) == len(loader) == 32 // 8
    dm_off = _datamodule(device_prefetch=False)
    dm_off.setup()
    want = list(dm_off.train_dataloader())
    for g, w in zip(got, want):
        assert torch.equal(g[2], w[2]) and all(torch.equal(a, b) for a, b in zip(g[0], w[0]))


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.indices: list[list[int]] = []
        self.labeled: list[int | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch[2].tolist())
        self.labeled.append(trainer.datamodule.labeled_on_host)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class CountingPass:
    """A loader pass that counts its reads and whether it met its end."""

    def __init__(self, iterator) -> None:
        self.iterator, self.reads, self.ended = iterator, 0, False

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.iterator)

    def __next__(self):
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.ended = True
            raise
        self.reads += 1
        return batch


def _fit(make_cfg, tmp_path: Path, name: str, overrides: list[str]) -> tuple[Record, dict]:
    rec = Record()
    cfg = make_cfg([*BASE, *overrides], run_dir=tmp_path / name)
    results = run_pretraining(cfg, extra_callbacks=[rec])
    fit = load_checkpoint(Path(results["checkpoint"]))["loops"]["fit_loop"]
    position = {
        "loader": fit["state_dict"]["combined_loader"],
        "batches": fit["epoch_loop.batch_progress"],
        "epochs": fit["epoch_progress"],
    }
    return rec, position


def test_fit_with_prefetch_trains_and_checkpoints_exactly_as_without(make_cfg, tmp_path, monkeypatch):
    """A short CPU fit (4 steps over 3-batch epochs, stopping inside the second epoch) three ways: the option off (the
    reference), on with the CPU's pass-through, and on with the recording stand-in for CUDA's streams on the CPU (each
    batch read ahead and "copied"). Same losses, same samples in the same order, same labelled counts, and the same
    data position in the last checkpoint; each loader pass read no further than its own end (the full first epoch) or
    one batch beyond the steps run (the stopped second)."""
    ref, ref_pos = _fit(make_cfg, tmp_path, "off", ["data.device_prefetch=false"])
    assert len(ref.losses) == STEPS and ref_pos["loader"][0]["batches_done"] == STEPS - BATCHES_PER_EPOCH

    passthrough, pt_pos = _fit(make_cfg, tmp_path, "cpu", ["data.device_prefetch=true"])

    streams = FakeStreams()
    monkeypatch.setattr(prefetch_mod, "cuda_streams", lambda device: streams)
    passes: list[CountingPass] = []
    real_wrap = DevicePrefetcher.wrap

    def counting_wrap(self, iterator):
        passes.append(CountingPass(iterator))
        return real_wrap(self, passes[-1])

    monkeypatch.setattr(DevicePrefetcher, "wrap", counting_wrap)
    host_hits: list[bool] = []
    real_host_copy = DevicePrefetcher.host_copy
    monkeypatch.setattr(
        DevicePrefetcher,
        "host_copy",
        lambda self, t: host_hits.append(real_host_copy(self, t) is not None) or real_host_copy(self, t),
    )
    fake, fake_pos = _fit(make_cfg, tmp_path, "fake", ["data.device_prefetch=true"])

    for run in (passthrough, fake):
        assert run.losses == ref.losses  # bit-identical: the same batches in the same order
        assert run.indices == ref.indices and run.labeled == ref.labeled == [8] * STEPS
    assert pt_pos == ref_pos and fake_pos == ref_pos
    moved = sum(1 for entry in streams.log if entry[0] == "move")
    waits = sum(1 for entry in streams.log if entry[0] == "wait")
    # per batch read: the raw images, labels and indices copied (sizes and keys are lists); per step: one wait
    second = STEPS - BATCHES_PER_EPOCH + 1  # the batches run in the stopped epoch and the one read ahead
    assert [(p.reads, p.ended) for p in passes] == [(BATCHES_PER_EPOCH, True), (second, False)]
    assert moved == 3 * (BATCHES_PER_EPOCH + second) and waits == STEPS
    assert host_hits == [True] * STEPS  # labels counted from their host copy, not read back from the device


# ------------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_hands_out_device_batches_equal_to_the_host_ones():
    device = torch.device("cuda", torch.cuda.current_device())
    batches = host_batches(4, {})
    for b in batches:
        b["views"] = [v.pin_memory() for v in b["views"]]
    prefetcher = DevicePrefetcher(lambda: device)
    streams = prefetcher.streams_for(device)
    assert streams.side != torch.cuda.current_stream(device)  # a stream of its own
    got = list(prefetcher.wrap(iter(batches)))
    assert len(got) == 4
    for host, dev in zip(batches, got):
        assert dev["labels"].device == device and dev["views"][0].device == device
        assert torch.equal(dev["labels"].cpu(), host["labels"]) and torch.equal(dev["views"][1].cpu(), host["views"][1])
        assert dev["files"] is host["files"] and dev["files"].data[0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_with_prefetch_matches_without(make_cfg, tmp_path):
    gpu = ["trainer=gpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.benchmark=false"]
    gpu += ["trainer.enable_progress_bar=false", "data.pin_memory=true"]
    ref, ref_pos = _fit(make_cfg, tmp_path, "off", [*gpu, "data.device_prefetch=false"])
    on, on_pos = _fit(make_cfg, tmp_path, "on", [*gpu, "data.device_prefetch=true"])
    assert on.indices == ref.indices and on_pos == ref_pos
    assert on.labeled == [8] * STEPS  # counted on the host although the labels were already on the device
    assert on.losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------------------------ benchmarks/e2e.py
def test_e2e_measures_the_whole_command_with_and_without_the_prefetch(tmp_path):
    """``--stages whole,whole_no_prefetch``: the whole command twice, the second with ``data.device_prefetch=false``,
    and their ratio."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "e2e.py"), "data=synthetic", "data.synthetic_size=32"]
    cmd += ["data.batch_size=8", "data.image_size=16", "data.num_workers=0", "backbone.width=0.125"]
    cmd += ["method.kwargs.proj_hidden_dim=32", "method.kwargs.proj_out_dim=16", "augment.backend=batched"]
    cmd += ["--stages", "whole,whole_no_prefetch", "--steps", "1", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["device_prefetch"] is True and "step" not in res and "loader" not in res
    assert res["whole"] > 0 and res["whole_no_prefetch"] > 0
    assert res["prefetch_gain"] == pytest.approx(res["whole"] / res["whole_no_prefetch"], rel=1e-3)
    assert "whole_no_prefetch" in proc.stdout.split("{")[0]  # in the table too
