"""What may change between the legs of a resumed run, and what happens then: a longer run, other optimizer values, a
refused optimizer change, another global batch or data size; and the collective timeout of multi-process runs."""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from ssl_vision import distributed as dist
from ssl_vision.checkpoint_io import load_checkpoint, normalize_fit_position
from ssl_vision.data.datamodule import SSLDataModule
from ssl_vision.launch import build_trainer, run_pretraining
from tests.conftest import FAST

# 96 samples / 16 per batch = 6 batches per epoch; LARS (SimCLR's default optimizer), base_lr 0.3 scaled × B/256.
BASE = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "data.synthetic_size=96",
    "trainer.limit_val_batches=0",
    "eval.final_eval=false",
    "method.kwargs.proj_hidden_dim=64",
    "trainer.max_epochs=100",
]
BASE_LR = 0.3


class Record(L.Callback):
    """The optimizer's param groups (lr, momentum, weight decay) and the sample indices at every training step."""

    def __init__(self) -> None:
        self.groups: dict[int, list[dict]] = {}
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.groups[trainer.global_step] = [
            {k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups
        ]
        self.indices.append(batch[2].tolist())


def _expected_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then half cosine to 0 at ``total``, written out."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _leg(
    make_cfg, overrides: list[str], run_dir: Path | None = None, stop_at: int | None = None
) -> tuple[dict, Record]:
    rec = Record()
    extra = [rec] if stop_at is None else [rec, StopAt(stop_at)]
    results = run_pretraining(make_cfg([*BASE, *overrides], run_dir=run_dir), extra_callbacks=extra)
    return results, rec


class StopAt(L.Callback):
    """Sets ``trainer.should_stop`` once ``step`` optimizer steps are done, as ``trainer.max_time``, a signal handler or
    any other callback that ends a run early does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _last_ckpt(results: dict) -> Path:
    return Path(results["checkpoint"])


# ------------------------------------------------------------------------------------ lr schedule and optimizer values
def test_extending_a_finished_run_continues_the_cosine_over_the_new_length(make_cfg, tmp_path, capsys):
    """8 steps, then the same run extended to 12: steps 8-11 follow the 12-step warmup-cosine (warmup 0.5 epoch = 3
    steps), not the 8-step schedule's end (lr 0.0, what the old code trained at), and a notice says so."""
    first, _ = _leg(
        make_cfg,
        ["trainer.max_steps=8", "checkpoint.every_n_steps=4", "method.optim.warmup_epochs=0.5"],
        run_dir=tmp_path / "a",
    )
    capsys.readouterr()
    second, rec = _leg(
        make_cfg,
        [
            "trainer.max_steps=12",
            "checkpoint.every_n_steps=4",
            "method.optim.warmup_epochs=0.5",
            f"resume={_last_ckpt(first)}",
        ],
        run_dir=tmp_path / "b",
    )
    assert second["steps"] == 12 and sorted(rec.groups) == [8, 9, 10, 11]
    peak = BASE_LR * 16 / 256
    for step in range(8, 12):
        want = _expected_lr(step, total=12, warmup=3, peak=peak)
        assert want > 0
        assert [g["lr"] for g in rec.groups[step]] == pytest.approx([want] * len(rec.groups[step]), rel=1e-9), step
    assert "[ssl_vision] resume: schedule rebuilt for 12 steps (was 8)" in capsys.readouterr().out
    saved = load_checkpoint(_last_ckpt(second))["lr_schedulers"][0]
    assert saved["total_steps"] == 12 and saved["last_epoch"] == 12


def test_optimizer_values_given_on_resume_reach_the_optimizer(make_cfg, tmp_path, capsys):
    first, _ = _leg(
        make_cfg,
        ["trainer.max_steps=4", "checkpoint.every_n_steps=4", "method.optim.warmup_epochs=0.5"],
        run_dir=tmp_path / "a",
    )
    capsys.readouterr()
    _, rec = _leg(
        make_cfg,
        [
            "trainer.max_steps=6",
            "checkpoint.every_n_steps=4",
            "method.optim.warmup_epochs=0.5",
            "method.optim.base_lr=0.6",
            "method.optim.weight_decay=0.001",
            "method.optim.momentum=0.8",
            "method.optim.trust_coefficient=0.02",
            f"resume={_last_ckpt(first)}",
        ],
        run_dir=tmp_path / "b",
    )
    peak = 0.6 * 16 / 256
    for step in (4, 5):
        groups = rec.groups[step]
        assert [g["lr"] for g in groups] == pytest.approx([_expected_lr(step, 6, 3, peak)] * len(groups), rel=1e-9)
        assert {g["momentum"] for g in groups} == {0.8}
        assert {g["trust_coefficient"] for g in groups} == {0.02}
        # weight decay on the decayed groups only (1-D tensors never decay)
        assert {g["weight_decay"] for g in groups if not g["lars_exclude"]} == {0.001}
        assert {g["weight_decay"] for g in groups if g["lars_exclude"]} == {0.0}
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if line.startswith("[ssl_vision] resume:")]
    assert len(notice) == 1, out
    for part in (
        "schedule rebuilt for 6 steps (was 4)",
        "base_lr 0.3 -> 0.6",
        "weight_decay 1e-06 -> 0.001",
        "momentum 0.9 -> 0.8",
        "trust_coefficient 0.001 -> 0.02",
    ):
        assert part in notice[0]


def test_plain_resume_prints_no_notice_and_keeps_the_schedule(make_cfg, tmp_path, capsys):
    first, _ = _leg(make_cfg, ["trainer.max_steps=6", "checkpoint.every_n_steps=4"], run_dir=tmp_path / "a")
    ckpt = tmp_path / "mid.ckpt"
    ckpt.write_bytes((_last_ckpt(first).parent / "epoch000-step0000004.ckpt").read_bytes())
    capsys.readouterr()
    _, rec = _leg(
        make_cfg, ["trainer.max_steps=6", "checkpoint.every_n_steps=4", f"resume={ckpt}"], run_dir=tmp_path / "b"
    )
    assert "[ssl_vision] resume:" not in capsys.readouterr().out
    warmup = 6  # SimCLR's 10 warmup epochs, capped at the run's 6 steps
    assert rec.groups[4][0]["lr"] == pytest.approx(_expected_lr(4, 6, warmup, BASE_LR * 16 / 256), rel=1e-12)


def test_changed_optimizer_name_is_refused_before_training(make_cfg, tmp_path):
    first, _ = _leg(make_cfg, ["trainer.max_steps=2", "checkpoint.every_n_steps=2"], run_dir=tmp_path / "a")
    before = _last_ckpt(first).read_bytes()
    for other in ("sgd", "adamw"):
        with pytest.raises(ValueError) as err:
            _leg(
                make_cfg,
                ["trainer.max_steps=4", f"method.optim.name={other}", f"resume={_last_ckpt(first)}"],
                run_dir=tmp_path / "b",
            )
        msg = str(err.value)
        assert f"method.optim.name=lars, this run asks for method.optim.name={other}" in msg
        assert "Resume with method.optim.name=lars" in msg and "resume=null" in msg
    assert _last_ckpt(first).read_bytes() == before, "the checkpoint is untouched"


# ------------------------------------------------------------------------------------ global batch and data size
def _order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The epoch's sample order, written out: randperm from (seed, epoch)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


@pytest.mark.parametrize(
    "steps_first, expect_second",
    [
        (4, [(64, 96)]),  # 64 samples seen; the rest of the epoch is one batch of 32
        (3, [(48, 80)]),  # 48 seen: one batch of 32 from sample 48; the last 16 (< one batch) dropped as drop_last does
    ],
)
def test_changed_global_batch_continues_the_epoch_at_the_first_unseen_sample(
    make_cfg, tmp_path, steps_first, expect_second
):
    """Batch 16 for some steps of epoch 0, then batch 32: the resumed leg trains the epoch's remaining samples, each
    once (the old code restarted the epoch and trained the first 64 samples again), with a warning that names both
    global batches, and its schedule spans the steps the run actually takes."""
    first, rec1 = _leg(
        make_cfg,
        ["trainer.max_epochs=1", f"trainer.max_steps={steps_first}", f"checkpoint.every_n_steps={steps_first}"],
        run_dir=tmp_path / "a",
    )
    with pytest.warns(UserWarning, match="global batch 16, 96 samples, seed 0 under global batch 32, 96 samples"):
        second, rec2 = _leg(
            make_cfg,
            [
                "trainer.max_epochs=1",
                "data.batch_size=32",
                "method.optim.warmup_epochs=0",
                f"resume={_last_ckpt(first)}",
            ],
            run_dir=tmp_path / "b",
        )
    order = _order(96, seed=0, epoch=0)
    assert rec1.indices == [order[i : i + 16] for i in range(0, 16 * steps_first, 16)]
    assert rec2.indices == [order[a:b] for a, b in expect_second]
    seen = [i for batch in rec1.indices + rec2.indices for i in batch]
    assert len(seen) == len(set(seen)), "no sample of the epoch is trained twice"
    assert sorted(seen) == sorted(order[: expect_second[-1][1]]), "none is skipped before the dropped tail"
    assert second["steps"] == steps_first + len(expect_second)
    # one epoch = the steps taken plus the batches left; the lr at the resumed step is this schedule's (warmup 0)
    total = steps_first + len(expect_second)
    want = _expected_lr(steps_first, total, 0, BASE_LR * 32 / 256)
    assert rec2.groups[steps_first][0]["lr"] == pytest.approx(want, rel=1e-9) and want > 0


def _fit_loop_checkpoint(batches_done: int, global_batch: int, num_samples: int, seed: int = 5) -> dict:
    """The part of a Lightning checkpoint that holds the data position, saved after ``batches_done`` batches of
    epoch 1 (at on_train_batch_end: ``completed`` one behind)."""

    def counters(n):
        return {"ready": n, "started": n, "processed": n, "completed": n - 1}

    return {
        "loops": {
            "fit_loop": {
                "state_dict": {
                    "combined_loader": [
                        {
                            "epoch": 1,
                            "batches_done": batches_done,
                            "global_batch": global_batch,
                            "num_samples": num_samples,
                            "seed": seed,
                        }
                    ]
                },
                "epoch_loop.batch_progress": {
                    "total": counters(10 + batches_done),
                    "current": counters(batches_done),
                    "is_last_batch": False,
                },
            }
        }
    }


def _datamodule(batch_size: int, size: int) -> SSLDataModule:
    dm = SSLDataModule(
        name="synthetic",
        root=None,
        image_size=16,
        in_chans=3,
        num_classes=4,
        mean=[0.5],
        std=[0.25],
        batch_size=batch_size,
        num_workers=0,
        views=[{"count": 2}],
        synthetic_size=size,
        seed=5,
    )
    dm.setup("fit")
    return dm


def test_changed_batch_rewrites_the_trainer_position_in_samples():
    ckpt = _fit_loop_checkpoint(batches_done=6, global_batch=8, num_samples=80)  # 48 of 80 samples seen
    with pytest.warns(UserWarning, match="global batch 8, 80 samples, seed 5 under global batch 16, 80 samples"):
        pos = _datamodule(16, 80).adapt_resume_position(ckpt)
    assert pos["changed"] and (pos["epoch"], pos["samples_done"], pos["batches_done"]) == (1, 48, 3)
    fit = ckpt["loops"]["fit_loop"]
    assert fit["state_dict"]["combined_loader"][0]["samples_done"] == 48
    assert fit["state_dict"]["combined_loader"][0]["global_batch"] == 16
    assert fit["epoch_loop.batch_progress"]["current"] == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    assert fit["epoch_loop.batch_progress"]["total"]["ready"] == 13
    # the loader, given that state, yields the rest of epoch 1's order in batches of 16
    loader = _datamodule(16, 80).train_dataloader()
    loader.load_state_dict(fit["state_dict"]["combined_loader"][0])
    loader.sampler.skip_batches(3)  # what the train loader does with the trainer's (rewritten) count
    got = [i for i, _ in loader.sampler]
    assert got == _order(80, seed=5, epoch=1)[48:80]


def test_changed_data_size_warns_that_the_order_differs():
    ckpt = _fit_loop_checkpoint(batches_done=4, global_batch=8, num_samples=64)  # 32 samples seen
    with pytest.warns(
        UserWarning,
        match=r"global batch 8, 64 samples, seed 5 under global batch 8, 80 samples.*not "
        r"an exact continuation",
    ):
        pos = _datamodule(8, 80).adapt_resume_position(ckpt)
    assert (pos["epoch"], pos["samples_done"], pos["batches_done"]) == (1, 32, 4)


def test_same_geometry_leaves_the_checkpoint_alone():
    ckpt = _fit_loop_checkpoint(batches_done=4, global_batch=8, num_samples=64)
    before = repr(ckpt)
    pos = _datamodule(8, 64).adapt_resume_position(ckpt)
    assert not pos["changed"] and repr(ckpt) == before


# ------------------------------------------------------------------------------------ DDP collective timeout
@pytest.mark.parametrize("override, seconds", [([], 300.0), (["distributed.timeout_s=42"], 42.0)])
def test_collective_timeout_reaches_the_ddp_strategy(make_cfg, tmp_path, override, seconds):
    trainer = build_trainer(make_cfg([*BASE, "trainer=ddp_cpu", *override]), tmp_path, [])
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._timeout == timedelta(seconds=seconds)


def test_bad_collective_timeout_is_clear(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="distributed.timeout_s must be a positive number of seconds"):
        build_trainer(make_cfg([*BASE, "trainer=ddp_cpu", "distributed.timeout_s=0"]), tmp_path, [])


def test_strategy_names_where_it_waited(monkeypatch):
    def timed_out(self, *args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation")

    monkeypatch.setattr(DDPStrategy, "backward", timed_out)
    monkeypatch.setattr(dist, "_timeout_s", None)
    strategy = dist.TimeoutDDPStrategy(timeout_s=7)
    with pytest.raises(dist.CollectiveTimeoutError) as err:
        strategy.backward(torch.zeros(()), None)
    msg = str(err.value)
    assert "rank 0 waited 7 s for the other processes at the gradient all-reduce of training step" in msg
    assert "another process stopped or hung" in msg and "distributed.timeout_s=" in msg
    monkeypatch.setattr(DDPStrategy, "backward", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="^boom$"):  # other errors pass through unchanged
        strategy.backward(torch.zeros(()), None)


def _skip_a_collective(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=1))
    message = ""
    try:
        if rank == 0:
            start = time.monotonic()
            try:
                dist.all_reduce_sum(torch.ones(3))
            except dist.CollectiveTimeoutError as exc:
                message = f"{time.monotonic() - start:.1f}|{exc}"
        else:
            time.sleep(3)  # "stopped": never joins the collective, and does not close its connection meanwhile
    finally:
        Path(out_dir, f"rank{rank}.txt").write_text(message)
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_skips_a_collective_gives_the_other_a_clear_error():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_skip_a_collective, args=(_free_port(), d), nprocs=2, join=True, start_method="spawn")
        message = Path(d, "rank0.txt").read_text()
    assert message, "rank 0 got no CollectiveTimeoutError"
    took, text = message.split("|", 1)
    assert float(took) < 2.5, "it fired at the configured timeout (1 s), not gloo's 30 minutes"
    assert text.startswith("rank 0 waited 1 s for the other processes at an all-reduce (all_reduce_sum)")
    assert "another process stopped or hung" in text and "raise distributed.timeout_s=60" in text


# ------------------------------------------------------------------------------------ where a stopped run resumes
RUNS = "outputs/simclr-resnet18-synthetic"  # resume=auto's search place under make_cfg's paths.output_root


def _epochs(count: int, num_samples: int = 96, batch: int = 16, seed: int = 0) -> list[list[int]]:
    """The batches of an uninterrupted run of ``count`` epochs, written out from the epochs' orders."""
    return [
        _order(num_samples, seed, e)[i : i + batch]
        for e in range(count)
        for i in range(0, num_samples - batch + 1, batch)
    ]


def _legs(results: dict) -> list[tuple[int, int, int]]:
    return [(leg["from_step"], leg["to_step"], leg["images_seen"]) for leg in results["legs"]]


def _as_written_before(path: Path, out: Path, epoch_counters: dict, epoch: int) -> Path:
    """``path`` with the epoch counters an older version wrote at that position (the data position unchanged)."""
    ckpt = load_checkpoint(path)
    fit = ckpt["loops"]["fit_loop"]
    fit["epoch_progress"] = {"total": dict(epoch_counters), "current": dict(epoch_counters)}
    ckpt["epoch"] = epoch
    torch.save(ckpt, out)
    return out


@pytest.mark.parametrize("save", ["epoch_end", "train_end"])
def test_run_stopped_inside_an_epoch_resumes_with_the_rest_of_that_epoch(make_cfg, tmp_path, capsys, save):
    """A run stopped by ``trainer.should_stop`` after 3 of epoch 0's 6 batches, its checkpoint written as the epoch
    ends (``checkpoint.every_n_epochs``) or as training ends (last.ckpt, ``every_n_steps`` not reached): the resumed
    run trains batches 4-6 of epoch 0, then epoch 1 -- the batches of an uninterrupted run, each once -- and the
    record counts 12 steps and 192 images. (Lightning marks the stopped epoch done; the old code resumed at epoch 1,
    and the run never saw half of epoch 0: 9 steps, 144 images.) A checkpoint written so by the old code is corrected
    when it is resumed."""
    common = ["trainer.max_epochs=2"] + (["checkpoint.every_n_steps=5"] if save == "train_end" else [])
    first, rec1 = _leg(make_cfg, common, run_dir=tmp_path / RUNS / "t1", stop_at=3)
    assert first["steps"] == 3 and rec1.indices == _epochs(2)[:3]
    saved = load_checkpoint(_last_ckpt(first))
    old = None
    if save == "train_end":  # what the old code wrote at train end: epoch 0 counted done
        old = _as_written_before(
            _last_ckpt(first),
            tmp_path / "old.ckpt",
            {"ready": 1, "started": 1, "processed": 1, "completed": 1},
            epoch=1,
        )
    second, rec2 = _leg(make_cfg, [*common, "resume=auto"], run_dir=tmp_path / RUNS / "t2")
    assert rec1.indices + rec2.indices == _epochs(2)
    assert second["steps"] == 12 and second["images_seen"] == 12 * 16
    assert _legs(second) == [(0, 3, 48), (3, 12, 9 * 16)]
    # the checkpoint says where the run stood: inside epoch 0 (not "epoch 0 done")
    assert saved["epoch"] == 0 and saved["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 0
    if old is not None:
        capsys.readouterr()
        again, rec3 = _leg(make_cfg, [*common, f"resume={old}"], run_dir=tmp_path / "from_old")
        assert "loop position corrected (epoch 0 was stopped after 3 of its batches" in capsys.readouterr().out
        assert rec3.indices == rec2.indices and again["steps"] == 12


def test_checkpoints_on_an_epochs_last_batch_resumed_twice_train_the_configured_length(make_cfg, tmp_path, capsys):
    """3 epochs of 6 batches with a checkpoint every 6 steps (each on an epoch's last batch), stopped after epoch 0
    and after epoch 1, resumed with resume=auto each time: 18 steps, 288 images, every batch of an uninterrupted run
    once. (Lightning's resume from such a checkpoint ran the next epoch without counting it as started, so the
    second resume trained epoch 1 again: 24 steps, 384 images.) A checkpoint that such a leg wrote is corrected."""
    common = ["trainer.max_epochs=3", "checkpoint.every_n_steps=6"]
    _, rec1 = _leg(make_cfg, common, run_dir=tmp_path / RUNS / "t1", stop_at=6)
    second, rec2 = _leg(make_cfg, [*common, "resume=auto"], run_dir=tmp_path / RUNS / "t2", stop_at=12)
    assert second["steps"] == 12
    saved = load_checkpoint(_last_ckpt(second))
    # what the old code's second leg wrote there: epoch counters one epoch behind
    old = _as_written_before(
        _last_ckpt(second), tmp_path / "old.ckpt", {"ready": 1, "started": 1, "processed": 1, "completed": 1}, epoch=1
    )
    third, rec3 = _leg(make_cfg, [*common, "resume=auto"], run_dir=tmp_path / RUNS / "t3")
    assert rec1.indices + rec2.indices + rec3.indices == _epochs(3)
    assert third["steps"] == 18 and third["images_seen"] == 18 * 16
    assert _legs(third) == [(0, 6, 96), (6, 12, 96), (12, 18, 96)]
    assert saved["epoch"] == 1 and saved["loops"]["fit_loop"]["epoch_progress"]["current"] == {
        "ready": 2,
        "started": 2,
        "processed": 2,
        "completed": 1,
    }, "as written at the end of epoch 1"
    capsys.readouterr()
    again, rec4 = _leg(make_cfg, [*common, f"resume={old}"], run_dir=tmp_path / "from_old")
    assert "loop position corrected" in capsys.readouterr().out
    assert rec4.indices == rec3.indices and again["steps"] == 18


def _position(epoch_counters, batch_current, is_last, loader_epoch, batches_done, stepped=10):
    c = dict(zip(("ready", "started", "processed", "completed"), epoch_counters))
    b = dict(zip(("ready", "started", "processed", "completed"), batch_current))
    return {
        "epoch": c["completed"],
        "loops": {
            "fit_loop": {
                "epoch_progress": {"total": dict(c), "current": dict(c)},
                "epoch_loop.batch_progress": {
                    "total": {k: v + 20 for k, v in b.items()},
                    "current": b,
                    "is_last_batch": is_last,
                },
                "epoch_loop.state_dict": {"_batches_that_stepped": stepped},
                "state_dict": {
                    "combined_loader": [
                        {
                            "epoch": loader_epoch,
                            "batches_done": batches_done,
                            "global_batch": 16,
                            "num_samples": 96,
                            "seed": 0,
                        }
                    ]
                },
            }
        },
    }


@pytest.mark.parametrize(
    "counters, batches, is_last",
    [
        ((3, 3, 2, 2), (4, 4, 4, 3), False),  # on_train_batch_end inside epoch 2 (a periodic mid-epoch checkpoint)
        ((3, 3, 2, 2), (4, 4, 4, 4), False),  # on_validation_end inside epoch 2 (val_check_interval < 1)
        ((3, 3, 3, 2), (6, 6, 6, 6), True),  # on_train_epoch_end of epoch 2 (every_n_epochs)
        ((3, 3, 3, 3), (6, 6, 6, 6), True),  # on_train_end after the whole of epoch 2
    ],
)
def test_a_checkpoint_whose_loop_position_is_right_is_left_alone(counters, batches, is_last):
    ckpt = _position(counters, batches, is_last, loader_epoch=2, batches_done=batches[0])
    before = repr(ckpt)
    assert normalize_fit_position(ckpt) is None and repr(ckpt) == before


def test_loop_positions_written_wrong_are_set_to_the_data_position():
    """The forms the old code wrote, each next to what an uninterrupted run writes at that position."""
    # stopped after 4 of epoch 2's 6 batches, saved as training ended: "epoch 2 done" -> inside epoch 2
    ckpt = _position((3, 3, 3, 3), (4, 4, 4, 4), False, loader_epoch=2, batches_done=4)
    assert "epoch 2 was stopped after 4 of its batches" in normalize_fit_position(ckpt)
    assert (
        ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
        == {"ready": 3, "started": 3, "processed": 2, "completed": 2}
        and ckpt["epoch"] == 2
    )
    # on epoch 2's last batch (on_train_batch_end): as written at that epoch's end
    ckpt = _position((3, 3, 2, 2), (6, 6, 6, 5), True, loader_epoch=2, batches_done=6)
    assert "last batch of epoch 2" in normalize_fit_position(ckpt)
    fit = ckpt["loops"]["fit_loop"]
    assert fit["epoch_progress"]["total"] == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    assert fit["epoch_loop.batch_progress"]["current"] == {"ready": 6, "started": 6, "processed": 6, "completed": 6}
    assert fit["epoch_loop.batch_progress"]["total"]["completed"] == 26
    assert fit["epoch_loop.state_dict"]["_batches_that_stepped"] == 11
    # inside epoch 2 with counters one epoch behind (a leg resumed from a last-batch checkpoint)
    ckpt = _position((2, 2, 2, 2), (3, 3, 3, 2), False, loader_epoch=2, batches_done=3)
    assert normalize_fit_position(ckpt)
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"] == {
        "ready": 3,
        "started": 3,
        "processed": 2,
        "completed": 2,
    }
    # a checkpoint without our loader position is not ours to rewrite
    other = {"loops": {"fit_loop": {"epoch_progress": {}, "state_dict": {}}}}
    assert normalize_fit_position(other) is None and other == {
        "loops": {"fit_loop": {"epoch_progress": {}, "state_dict": {}}}
    }
