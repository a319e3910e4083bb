"""No objective reads a device value back to the host during a training step (on a GPU each read waits for the
device): counters and pointers that decide what the host does (MoCo's EMA step and queue pointer, SwAV's queue fill,
InstDisc's "partition constant estimated" flag) are mirrored on the host, read from their buffers once and kept in
step with them afterwards, and re-read after a ``load_state_dict``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import ssl_vision.objectives  # noqa: F401  (registers every method)
from ssl_vision.launch import build_module, run_pretraining
from ssl_vision.objectives.base import OBJECTIVES, StepInfo
from tests.conftest import FAST
from tests.test_e2e_bench import HOST_READS, CountHostReads

RESNET = ["backbone=resnet18", "backbone.width=0.125"]
VIT = ["backbone=vit_tiny", "backbone.patch_size=8"]
#: the small heads and the settings that exercise each method's state (queues in use, EMA every step); a method
#: not listed runs with its own defaults on the small ResNet
SETTINGS = {
    "byol": [
        *RESNET,
        "method.kwargs.proj_hidden_dim=32",
        "method.kwargs.pred_hidden_dim=32",
        "method.kwargs.proj_out_dim=16",
    ],
    "dino": [*RESNET, "method.kwargs.out_dim=64", "method.kwargs.hidden_dim=32", "method.kwargs.bottleneck_dim=16"],
    "mae": [*VIT],
    "moco_v1": [*RESNET, "method.kwargs.queue_size=64"],
    "moco_v2": [*RESNET, "method.kwargs.queue_size=64", "method.kwargs.proj_hidden_dim=32"],
    "moco_v3": [*RESNET, "method.kwargs.proj_hidden_dim=64", "method.kwargs.pred_hidden_dim=64"],
    "simsiam": [
        *RESNET,
        "method.kwargs.proj_hidden_dim=32",
        "method.kwargs.proj_out_dim=32",
        "method.kwargs.pred_hidden_dim=8",
    ],
    "swav": [
        *RESNET,
        "data.image_size=16",
        "method.kwargs.queue_length=32",
        "method.kwargs.queue_start_epoch=0",
        "method.kwargs.freeze_prototypes_niters=3",
        "method.kwargs.num_prototypes=32",
        "method.kwargs.proj_hidden_dim=32",
        "method.kwargs.proj_out_dim=16",
    ],
}
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 64 synthetic images, batch 16
#: torch.optim keeps its ``step`` counters on the host unless ``capturable``/``fused`` (AdamW's bias correction reads
#: them with ``.item()``): those reads never wait for a device, so they are not counted
HOST_RESIDENT_CALLER = f"{os.sep}torch{os.sep}optim{os.sep}"


class CountDeviceReads(CountHostReads):
    """:class:`CountHostReads` without the reads that torch.optim makes of its host-resident step counters."""

    def __init__(self, monkeypatch, first: int) -> None:
        super().__init__(monkeypatch, first)
        for name in HOST_READS:
            counted = getattr(torch.Tensor, name)

            def filtered(t, *args, _counted=counted, **kwargs):
                if self.on and HOST_RESIDENT_CALLER in sys._getframe(1).f_code.co_filename:
                    self.on = False  # a read of a host tensor: through, uncounted
                    try:
                        return _counted(t, *args, **kwargs)
                    finally:
                        self.on = True
                return _counted(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, filtered)


def simsiam_collapse_reads(steps_per_epoch: int, epochs: int, first: int) -> int:
    """SimSiam's documented collapse check: one read at every ``max(1, steps_per_epoch // 10)``-th step from the
    second epoch on (about 10 per epoch)."""
    every = max(1, steps_per_epoch // 10)
    return sum(1 for s in range(first, steps_per_epoch * epochs) if s >= steps_per_epoch and s % every == 0)


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_training_steps_after_the_first_read_nothing_back(method, make_cfg, monkeypatch):
    """Before: MoCo read its EMA step (``int(last_step)``) and its queue pointer, SwAV its queue fill (twice),
    InstDisc the sample-index range (twice) and its ``z_set`` flag, the NCE loss ``Z > 0``: every step."""
    counter = CountDeviceReads(monkeypatch, first=1)
    cfg = make_cfg(
        [
            f"method={method}",
            *SETTINGS.get(method, RESNET),
            *FAST,
            f"trainer.max_epochs={EPOCHS}",
            "trainer.log_every_n_steps=1000",
            "checkpoint.every_n_epochs=100",
            "trainer.check_val_every_n_epoch=100",
            "eval.final_eval=false",
        ]
    )
    res = run_pretraining(cfg, extra_callbacks=[counter])
    assert res["steps"] == EPOCHS * STEPS_PER_EPOCH and counter.steps == EPOCHS * STEPS_PER_EPOCH - 1
    if method == "simsiam":  # its periodic collapse alarm reads by design, never more often than documented
        allowed = simsiam_collapse_reads(STEPS_PER_EPOCH, EPOCHS, first=1)
        assert 0 < len(counter.reads) <= allowed, counter.reads
        assert set(counter.reads) == {"__float__"}
    else:
        assert counter.reads == [], counter.reads


# ------------------------------------------------------------------------------------------------ MoCo's mirrors
def _moco(make_cfg, tmp_path, name="moco_v2"):
    """A MoCo v2 objective bound to its tiny backbone (``obj.backbone_for_test``), queue K = 64."""
    module = build_module(make_cfg(["method=" + name, *SETTINGS[name], *FAST], tmp_path), num_samples=64)
    obj = module.objective
    obj.backbone_for_test = module.backbone
    return obj


def _train_steps(obj, steps, start=0, batch=16):
    """Run ``steps`` forwards at global steps ``start, start + 1, …`` (one per optimizer step) on random images."""
    for s in range(start, start + steps):
        views = [torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)]
        obj(views, obj.backbone_for_test, StepInfo(global_step=s, total_steps=100, epoch=0, max_epochs=1))


@pytest.fixture
def moco_pair(make_cfg, tmp_path):
    return _moco(make_cfg, tmp_path / "a"), _moco(make_cfg, tmp_path / "b")


def test_moco_mirrors_follow_a_loaded_checkpoint(moco_pair):
    """The failure mode: a module that has used its mirrors (pointer 48, last EMA step 2) gets another state loaded
    (pointer 16, last EMA step 0); the next enqueue must write at the *loaded* pointer and the next EMA update
    must follow the *loaded* step, exactly as the buffers say (stale mirrors would write columns 48..63)."""
    a, b = moco_pair
    a.backbone_for_test.load_state_dict(b.backbone_for_test.state_dict())  # the same online network
    _train_steps(a, 3)  # a: pointer 3·16 = 48, last EMA at step 2
    _train_steps(b, 1)  # b: pointer 16, no EMA yet (step 0 skips it)
    assert (int(a.queue.ptr), int(a.ema_step)) == (48, 2) and (int(b.queue.ptr), int(b.ema_step)) == (16, 0)
    a.load_state_dict(b.state_dict())  # a now *is* b: its mirrors must follow
    ref = {k: v.clone() for k, v in b.state_dict().items()}
    torch.manual_seed(0)
    _train_steps(a, 1, start=1)
    torch.manual_seed(0)
    _train_steps(b, 1, start=1)
    for k, v in b.state_dict().items():  # same step on the same state: bit-identical, pointer at 32
        torch.testing.assert_close(a.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert int(a.queue.ptr) == 32 and int(a.ema_step) == 1
    # the keys went to columns 16..31 (the loaded pointer), columns 32..47 are b's old ones, untouched
    torch.testing.assert_close(a.queue.queue[:, 32:48], ref["queue.queue"][:, 32:48], rtol=0, atol=0)
    assert not torch.equal(a.queue.queue[:, 16:32], ref["queue.queue"][:, 16:32])


def test_moco_fresh_module_from_checkpoint_continues_the_buffers(moco_pair, tmp_path):
    a, b = moco_pair
    _train_steps(a, 3)
    path = tmp_path / "obj.pt"
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path))  # b is fresh (never stepped) and had read nothing
    assert b.queue.host_ptr() == int(a.queue.ptr) == 48
    assert b._ema_step.read(b.ema_step) == int(a.ema_step) == 2
    _train_steps(b, 1, start=3)  # wraps: 48 + 16 = 64 ≡ 0
    assert int(b.queue.ptr) == 0 == b.queue.host_ptr() and int(b.ema_step) == 3 == b._ema_step.read(b.ema_step)


def test_moco_mirror_reads_its_buffer_once(moco_pair, monkeypatch):
    """The mirror is read from the buffer on first use and after a load, never per step."""
    a, _ = moco_pair
    reads = []
    real = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t, _r=torch.Tensor.item: reads.append(1) or _r(t))
    _train_steps(a, 4)
    assert len(reads) == 2  # the pointer and the EMA step, once each
    a.load_state_dict(a.state_dict())
    _train_steps(a, 2, start=4)
    assert len(reads) == 4


# ------------------------------------------------------------------------------------- every mirror follows a load
MIRRORS = [  # (method, kwargs, the owning submodule's path, mirror attribute, buffer, a value the mirror is set to)
    ("moco_v2", dict(queue_size=64, proj_hidden_dim=8), "queue", "_ptr", "ptr", 48),
    ("moco_v2", dict(queue_size=64, proj_hidden_dim=8), "", "_ema_step", "ema_step", 7),
    ("moco_v3", dict(proj_hidden_dim=8, pred_hidden_dim=8, proj_out_dim=4), "", "_ema_step", "ema_step", 7),
    (
        "swav",
        dict(queue_length=32, num_prototypes=8, proj_hidden_dim=8, proj_out_dim=4),
        "",
        "_queue_fill",
        "queue_fill",
        32,
    ),
    ("instdisc", dict(num_samples=16, embed_dim=4), "", "_z_set", "z_set", 1),
]


@pytest.mark.parametrize("method,kwargs,path,mirror,buffer,value", MIRRORS, ids=[f"{m[0]}-{m[4]}" for m in MIRRORS])
def test_every_mirror_is_dropped_by_a_load(method, kwargs, path, mirror, buffer, value):
    """A mirror set on the host (buffer written alongside) must give the *loaded* buffer's value after the owning
    objective loads another state (a fresh objective's: zero / False)."""
    from ssl_vision.objectives import build_objective

    obj, fresh = build_objective(method, 8, **kwargs), build_objective(method, 8, **kwargs)
    owner = obj.get_submodule(path)
    m, buf = getattr(owner, mirror), getattr(owner, buffer)
    m.write(buf, value)
    assert m.read(buf) == value == int(buf)
    obj.load_state_dict(fresh.state_dict())
    buf = getattr(owner, buffer)
    assert int(buf) == 0 and m.read(buf) == 0


# --------------------------------------------------------------------------------- checks that stay on the device
def test_device_side_checks_still_raise_clear_errors():
    """``Z > 0`` for a tensor Z is checked with a device-side assertion now: on the CPU it still raises the ValueError
    naming what is wrong (InstDisc's index range, checked the same way: tests/objectives/test_instdisc.py)."""
    from ssl_vision.losses.nce import nce_loss

    logits = torch.randn(4, 3)
    for z in (torch.tensor(0.0), torch.tensor(-2.0), 0.0, -2.0):
        with pytest.raises(ValueError, match="partition constant Z must be > 0"):
            nce_loss(logits, z, 16)
    ref = nce_loss(logits, 3.5, 16)  # a float Z and the same Z as a tensor: the same loss, bit for bit
    assert torch.equal(nce_loss(logits, torch.tensor(3.5), 16), ref)
