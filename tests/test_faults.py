"""Faults and bad input: crashes while saving, non-finite losses, wrong or hostile checkpoints, results that must not
be overwritten, clear errors. (Bad image files: tests/data/test_bad_images.py; SIGKILL + resume:
tests/test_resume_kill.py; data position and workers: tests/data/test_sampling.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import ssl_vision.checkpoint_io as checkpoint_io
import ssl_vision.run_record as run_record
from ssl_vision.launch import build_trainer, run_pretraining
from ssl_vision.checkpoint_io import AtomicCheckpointIO, load_checkpoint
from ssl_vision.resume import find_resume_checkpoint
from ssl_vision.run_record import write_results
from tests.conftest import CONF, FAST

ROOT = Path(__file__).resolve().parents[1]
BASE = ["method=simclr", "backbone=resnet18", "backbone.width=0.125", *FAST, "eval.final_eval=false"]


# ------------------------------------------------------------------------------------------- atomic checkpoint writes
def _half_then_raise(real_save):
    def save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # the crash comes half-way through the write
        raise OSError(28, "No space left on device")

    return save


@pytest.mark.parametrize("crash", ["in torch.save", "in fsync"])
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"global_step": 4, "state_dict": {"w": torch.arange(1000.0)}}
    io_.save_checkpoint(good, path)
    if crash == "in torch.save":
        monkeypatch.setattr(checkpoint_io.torch, "save", _half_then_raise(torch.save))
    else:

        def broken_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(checkpoint_io.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        io_.save_checkpoint({"global_step": 8, "state_dict": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    back = load_checkpoint(path)  # intact and loadable: the previous good one
    assert back["global_step"] == 4 and torch.equal(back["state_dict"]["w"], good["state_dict"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file is left behind"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1080960 vs 1080848"),
        OSError(28, "No space left on device"),
    ],
)
def test_full_disk_while_saving_says_so(tmp_path, monkeypatch, error):
    """What torch.save raises when the disk fills mid-write (the RuntimeError is the one a full disk gave in CI)
    becomes an
    ENOSPC OSError that says the disk is full, how much is free, and what to do; the previous checkpoint survives."""
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 4}, path)

    def short_write(obj, f, *args, **kwargs):
        f.write(b"x" * 3 * 2**20)
        raise error

    monkeypatch.setattr(checkpoint_io.torch, "save", short_write)
    with pytest.raises(OSError) as info:
        io_.save_checkpoint({"global_step": 8}, path)
    monkeypatch.undo()
    msg = str(info.value)
    assert info.value.errno == 28 and info.value.__cause__ is error
    assert "disk looks full" in msg and "MiB free" in msg and "after 3 MiB" in msg and "paths.output_root" in msg
    assert load_checkpoint(path)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_other_save_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def bad(obj, f, *args, **kwargs):
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(checkpoint_io.torch, "save", bad)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_trainer_writes_checkpoints_through_atomic_io(make_cfg, tmp_path, trainer):
    cfg = make_cfg([*BASE, f"trainer={trainer}"])
    t = build_trainer(cfg, tmp_path, [])
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------------------------------------------- non-finite loss
def test_inf_loss_names_step_and_likely_causes(make_cfg, monkeypatch, tmp_path):
    """NaN (tests/test_module.py also checks that the last good checkpoint survives) and Inf alike stop training with
    the step and what to change."""
    from ssl_vision.objectives.simclr import SimCLR

    real_forward = SimCLR.forward

    def overflow(self, views, backbone, step):
        out = real_forward(self, views, backbone, step)
        if step.global_step >= 2:
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(SimCLR, "forward", overflow)
    with pytest.raises(FloatingPointError) as err:
        run_pretraining(make_cfg([*BASE, "trainer.max_steps=4", "checkpoint.every_n_steps=1"], tmp_path / "run"))
    msg = str(err.value)
    assert "non-finite loss inf at global step 2" in msg
    for hint in ("learning rate too high", "method.optim.base_lr", "fp16 overflow", "bf16-mixed", "resume=auto"):
        assert hint in msg, hint
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2  # the last good one


# ------------------------------------------------------------------------------------------------ hostile checkpoints
class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "ssl_vision": {"run_info": {"method": "simclr"}}, "payload": Evil(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_hostile_pickle_as_resume_is_refused_and_never_runs(make_cfg, tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt.*weights_only=True.*can run code"):
        run_pretraining(make_cfg([*BASE, f"resume={path}"]))
    assert not marker.exists(), "the pickle's payload ran"


def _knn_tool():
    spec = importlib.util.spec_from_file_location("knn_eval_tool", ROOT / "tools" / "knn_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hostile_pickle_given_to_knn_eval_is_refused_and_never_runs(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("knn", overrides=[f"checkpoint={path}", "device=cpu"])
    GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt.*can run code"):
        _knn_tool().run(cfg)
    assert not marker.exists(), "the pickle's payload ran"
    assert not list(tmp_path.glob("*.json")), "nothing is written for a refused checkpoint"


# -------------------------------------------------------------------------------------------------- wrong checkpoints
@pytest.fixture(scope="module")
def simclr_checkpoint(tmp_path_factory) -> Path:
    """One 1-step SimCLR run (resnet18 at width 0.125, 32 px synthetic data) shared by the tests below."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    tmp = tmp_path_factory.mktemp("simclr")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[f"paths.output_root={tmp / 'outputs'}", *BASE, "trainer.max_steps=1"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return Path(run_pretraining(cfg)["checkpoint"])


def test_resume_from_another_kind_of_run_says_what_would_be_right(make_cfg, simclr_checkpoint):
    cases = {
        "method=byol": r"method=simclr \(this run: method=byol\)",
        "backbone.width=0.25": r"backbone\.width=0\.125 \(this run: 0\.25\)",
        "backbone=resnet50": r"backbone\.name=resnet18 \(this run: resnet50\)",
        "data.image_size=24": r"data\.image_size=32 \(this run: 24\)",
    }
    for override, expected in cases.items():
        with pytest.raises(ValueError, match=r"was written by another kind of run: .*" + expected) as err:
            run_pretraining(make_cfg([*BASE, override, f"resume={simclr_checkpoint}"]))
        assert "Resume it with the same settings (method=simclr backbone=resnet18" in str(err.value)
        assert "resume=null" in str(err.value)


def test_resume_from_something_else_is_clear(make_cfg, tmp_path, simclr_checkpoint):
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match="is not an ssl_vision pretraining checkpoint"):
        run_pretraining(make_cfg([*BASE, f"resume={plain}"]))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(simclr_checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.ckpt: it is truncated"):
        run_pretraining(make_cfg([*BASE, f"resume={cut}"]))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file; pass a path to a .ckpt or resume=auto"):
        run_pretraining(make_cfg([*BASE, f"resume={tmp_path / 'missing.ckpt'}"]))


def test_bad_checkpoint_interval_is_clear(make_cfg):
    with pytest.raises(ValueError, match="checkpoint.every_n_steps must be a positive number"):
        run_pretraining(make_cfg([*BASE, "checkpoint.every_n_steps=0"]))


def test_empty_train_set_is_clear():
    from ssl_vision.data.datamodule import SSLDataModule

    dm = SSLDataModule(
        name="synthetic",
        root=None,
        image_size=8,
        in_chans=3,
        num_classes=2,
        mean=[0.5],
        std=[0.25],
        batch_size=2,
        num_workers=0,
        views=[{}],
    )
    dm.train_dataset = torch.utils.data.TensorDataset(torch.zeros(0))
    with pytest.raises(ValueError, match="the synthetic train set is empty"):
        dm.train_dataloader()


# ------------------------------------------------------------------------------------------- never overwrite silently
def test_results_are_never_overwritten_even_within_one_second(tmp_path):
    payloads = [{k: i for k in run_record.RESULT_KEYS} for i in range(4)]
    for p in payloads:  # usually within one second, so the kept names share one time stamp
        write_results(tmp_path, p)
    files = sorted(tmp_path.glob("results*.json"))
    assert len(files) == 4
    assert sorted(json.loads(f.read_text())["steps"] for f in files) == [0, 1, 2, 3]
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 3  # the newest under the plain name
    # a stamp that is already taken (an earlier run's kept file from the same second) is not taken over either
    other = tmp_path / "other"
    other.mkdir()
    write_results(other, payloads[0])
    os.utime(other / "results.json", (1e9, 1e9))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1e9))
    (other / f"results.{stamp}.json").write_text('{"kept": true}')
    write_results(other, payloads[1])
    assert json.loads((other / f"results.{stamp}.json").read_text()) == {"kept": True}
    assert json.loads((other / f"results.{stamp}-1.json").read_text())["steps"] == 0
    assert json.loads((other / "results.json").read_text())["steps"] == 1


def test_resume_auto_also_finds_multirun_jobs(tmp_path):
    single = tmp_path / "simclr-resnet18-synthetic" / "2024-01-01_00-00-00" / "checkpoints" / "last.ckpt"
    job = tmp_path / "multirun" / "2024-01-02_00-00-00" / "1-simclr-resnet18-synthetic" / "checkpoints" / "last.ckpt"
    other = tmp_path / "multirun" / "2024-01-03_00-00-00" / "0-byol-resnet18-synthetic" / "checkpoints" / "last.ckpt"
    for i, p in enumerate((single, job, other)):
        p.parent.mkdir(parents=True)
        torch.save({"global_step": 4}, p)  # resume=auto reads the step of each candidate
        os.utime(p, (1000 + i, 1000 + i))
    assert find_resume_checkpoint("auto", tmp_path, "simclr-resnet18-synthetic") == job
    os.utime(single, (5000, 5000))
    assert find_resume_checkpoint("auto", tmp_path, "simclr-resnet18-synthetic") == single
    assert find_resume_checkpoint("auto", tmp_path, "dino-vit_tiny-synthetic") is None
