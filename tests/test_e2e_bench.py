"""The whole command at the speed of its step: benchmarks/e2e.py, no host reads of device values per training step,
the lazy non-finite-loss guard, the online probe without a per-step read, the GPU trainers' loader and logging
defaults."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ssl_vision.checkpoint_io import load_checkpoint
from ssl_vision.launch import build_trainer, run_pretraining
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
BASE = ["method=simclr", "backbone=resnet18", "backbone.width=0.125", *FAST, "eval.final_eval=false"]


# ------------------------------------------------------------------------------------------------ benchmarks/e2e.py
def test_e2e_script_tiny_run(tmp_path):
    out_json = tmp_path / "sub" / "e2e.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "e2e.py"),
        "data=synthetic",
        "data.synthetic_size=96",
        "data.batch_size=16",
        "data.num_workers=0",
        "backbone.width=0.125",
        "augment.backend=batched",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(out_json),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("whole", "step", "loader", "aug", "synthetic_gen"):
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
        assert k in proc.stdout.split("{")[0]  # the table names every stage
    for k in ("whole", "loader", "aug"):
        assert res[f"{k}_over_step"] == pytest.approx(res[k] / res["step"], rel=1e-3)
    assert (res["method"], res["data"], res["backend"], res["batch_size"]) == ("simclr", "synthetic", "batched", 16)
    assert res["threads"] == 1 and res["steps"] == 2 and res["warmup"] == 1 and res["precision"] == "32-true"
    assert json.loads(out_json.read_text()) == res
    assert [p.name for p in out_json.parent.iterdir()] == ["e2e.json"]  # written atomically: no temp file left
    assert not list(tmp_path.glob("outputs")), "the benchmark's run directory is temporary, not in the cwd"


def test_e2e_rejects_unknown_stage():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--stages", "whole,bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown ['bogus']" in proc.stderr and "synthetic_gen" in proc.stderr


def test_steady_timer_counts_only_the_window():
    from benchmarks.e2e import SteadyTimer

    class Mod:
        device = torch.device("cpu")

    timer = SteadyTimer(warmup=2, steps=3)
    batch = (None, torch.zeros(5))
    for i in range(7):  # batches 1..2 warm-up, 3..5 timed, 6..7 after the window
        timer.on_train_batch_end(None, Mod(), None, batch, i)
    assert timer.images == 15 and timer.elapsed > 0
    with pytest.raises(RuntimeError, match="did not complete: 1 batches ran, 2 \\+ 3 needed"):
        short = SteadyTimer(warmup=2, steps=3)
        short.on_train_batch_end(None, Mod(), None, batch, 0)
        short.images_per_s


# -------------------------------------------------------------------------------------- no host reads per training step
HOST_READS = ("item", "__bool__", "__int__", "__float__", "tolist")


class CountHostReads(L.Callback):
    """Counts tensor -> Python conversions (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()``: on a GPU,
    each waits for the device) between ``on_train_batch_start`` and ``on_train_batch_end`` of the batches from
    ``first`` on: training_step, backward, the optimizer step, the probe, logging, the progress bar."""

    def __init__(self, monkeypatch, first: int = 2) -> None:
        self.first, self.on, self.reads, self.steps = first, False, [], 0
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, _name=name, **kwargs):
                if self.on:
                    self.reads.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = trainer.global_step >= self.first
        self.steps += self.on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.on = False


@pytest.mark.parametrize("progress_bar", [False, True])
def test_training_step_reads_nothing_back_between_log_steps(make_cfg, monkeypatch, progress_bar):
    """Before: the non-finite check (``if not torch.isfinite(loss)``), the probe's ``bool(keep.any())`` and
    ``int(keep.sum())`` and the progress bar's loss each read a device value every step."""
    counter = CountHostReads(monkeypatch)
    cfg = make_cfg(
        [
            *BASE,
            "trainer.max_steps=6",
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=100",
            f"trainer.enable_progress_bar={str(progress_bar).lower()}",
            "checkpoint.every_n_epochs=100",
            "trainer.check_val_every_n_epoch=100",
        ]
    )
    run_pretraining(cfg, extra_callbacks=[counter])
    assert counter.steps == 4
    assert counter.reads == [], counter.reads


def test_progress_bar_refreshes_with_the_loggers(make_cfg, tmp_path):
    for every in (1, 50):
        trainer = build_trainer(
            make_cfg([*BASE, f"trainer.log_every_n_steps={every}", "trainer.enable_progress_bar=true"]), tmp_path, []
        )
        bars = [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]
        assert len(bars) == 1 and bars[0].refresh_rate == every
    trainer = build_trainer(make_cfg([*BASE, "trainer.enable_progress_bar=false"]), tmp_path, [])
    assert not any(isinstance(c, TQDMProgressBar) for c in trainer.callbacks)


# ------------------------------------------------------------------------------------------- lazy non-finite guard
def _poison_from(monkeypatch, step: int) -> None:
    from ssl_vision.objectives.simclr import SimCLR

    real_forward = SimCLR.forward

    def poisoned(self, views, backbone, info):
        out = real_forward(self, views, backbone, info)
        if info.global_step >= step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "forward", poisoned)


def test_nonfinite_loss_read_at_the_next_log_step_names_its_own_step(make_cfg, monkeypatch, tmp_path):
    _poison_from(monkeypatch, 1)
    cfg = make_cfg(
        [*BASE, "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "checkpoint.every_n_epochs=1"], tmp_path / "run"
    )
    with pytest.raises(FloatingPointError) as err:
        run_pretraining(cfg)
    msg = str(err.value)
    assert "non-finite loss nan at global step 1 (epoch 0)" in msg and "noticed at global step 3" in msg
    assert "trainer.log_every_n_steps" in msg and "base_lr" in msg
    assert not list((tmp_path / "run").rglob("*.ckpt")), "no checkpoint of a state after the bad step"


def test_no_checkpoint_after_a_nonfinite_loss_between_log_steps(make_cfg, monkeypatch, tmp_path):
    """The loss goes NaN at step 3, the next read would be at step 50: the checkpoint after step 4 is refused, the
    one after step 2 is what stays, and the error names step 3."""
    _poison_from(monkeypatch, 3)
    cfg = make_cfg(
        [*BASE, "trainer.max_epochs=2", "trainer.log_every_n_steps=50", "checkpoint.every_n_steps=2"], tmp_path / "run"
    )
    with pytest.raises(FloatingPointError, match="non-finite loss nan at global step 3"):
        run_pretraining(cfg)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------- the online probe
def test_probe_on_partly_unlabelled_batch_matches_the_labelled_subset(make_cfg):
    """STL-10's unlabelled images (label -1) are left out of the probe's loss; the masked mean used now (no gather,
    no read) must give the update the probe would get on the labelled rows alone."""
    from ssl_vision.launch import build_module

    cfg = make_cfg(BASE)
    module = build_module(cfg, num_samples=64)
    feats, labels = torch.randn(8, module.online_probe.in_features), torch.tensor([3, -1, 0, 9, -1, -1, 2, 5])
    keep = labels >= 0
    ref = torch.nn.Linear(module.online_probe.in_features, module.online_probe.out_features)
    ref.load_state_dict({"weight": module.online_probe.weight, "bias": module.online_probe.bias})
    ref_opt = torch.optim.SGD(ref.parameters(), lr=module.eval_spec.probe_lr, momentum=module.eval_spec.probe_momentum)
    torch.nn.functional.cross_entropy(ref(feats[keep]), labels[keep]).backward()
    ref_opt.step()
    # the labelled count as SSLDataModule.on_before_batch_transfer takes it from the host labels
    module.online_probe.train_step(feats, labels, labeled=int(keep.sum()))
    assert torch.allclose(module.online_probe.weight, ref.weight, atol=1e-6)
    assert torch.allclose(module.online_probe.bias, ref.bias, atol=1e-6)


# --------------------------------------------------------------------------------------- GPU trainers' loader options
@pytest.mark.parametrize("trainer", ["gpu", "ddp_gpu"])
def test_gpu_trainers_pin_memory_and_log_every_50(make_cfg, trainer):
    cfg = make_cfg([f"trainer={trainer}"])
    assert cfg.data.pin_memory is True and cfg.trainer.log_every_n_steps == 50
    assert make_cfg([f"trainer={trainer}", "data.pin_memory=false"]).data.pin_memory is False
    assert make_cfg(["trainer=cpu"]).data.pin_memory is False  # nothing to pin for on the CPU
    assert set(cfg.trainer) >= {"accelerator", "devices", "precision"} and "pin_memory" not in cfg.trainer
