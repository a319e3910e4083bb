"""Exact resume after a real SIGKILL in the middle of an epoch (tools/pretrain.py as a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_vision.launch import run_pretraining
from ssl_vision.checkpoint_io import load_checkpoint
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "simclr-resnet18-synthetic"
# 96 samples / 16 per batch = 6 steps per epoch, 12 in all; a checkpoint (and last.ckpt) every 4 optimizer steps:
# steps 4, 8 (neither on an epoch boundary) and the end. No validation: it plays no part here and costs time.
COMMON = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "data.synthetic_size=96",
    "trainer.max_epochs=2",
    "trainer.limit_val_batches=0",
    "eval.final_eval=false",
    "checkpoint.every_n_steps=4",
]
STEPS_PER_EPOCH, TOTAL = 6, 12


def _cli(args: list[str], cwd: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools/pretrain.py"), *args]


def _same_threads() -> dict[str, str]:
    """The subprocesses' environment with this process's torch thread count: the in-process reference run must use
    the same number of threads (float sums are split differently with another count)."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _kill_after_checkpoint(cmd: list[str], root: Path, min_step: int, timeout: float = 240.0) -> tuple[Path, int]:
    """Start ``cmd``, SIGKILL it as soon as a ``last.ckpt`` with ``global_step >= min_step`` exists; return that
    checkpoint's path and the step it holds after the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root, env=_same_threads())
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = list(root.glob(f"{PREFIX}/*/checkpoints/last.ckpt"))
            # last.ckpt is replaced atomically (AtomicCheckpointIO), so reading it while the run writes is safe
            if found and load_checkpoint(found[0])["global_step"] >= min_step:
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before it was killed: {proc.stderr.read().decode()[-3000:]}"
                )
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return found[0], int(load_checkpoint(found[0])["global_step"])


def test_sigkill_mid_epoch_then_resume_auto_equals_uninterrupted(make_cfg, tmp_path):
    """Kill a 2-epoch run with SIGKILL after its step-4 (or step-8) checkpoint, inside an epoch, resume with
    ``resume=auto``, and compare with an uninterrupted run of the same config computed here in-process.

    The killed and resumed runs use 2 loader workers, the reference none: data order comes from (seed, epoch) and each
    sample's augmentation from (seed, epoch, index), so the worker count must not matter. What must match: every
    weight and buffer of backbone and objective (so every batch and augmentation was the same, in the same order),
    the online probe, the optimizer state, the lr schedule position, the step count and the data position.
    """
    root = tmp_path / "cli"
    root.mkdir()
    args = [*COMMON, "data.num_workers=2", f"paths.output_root={root}"]
    ckpt, killed_at = _kill_after_checkpoint(_cli(args, root), root, min_step=4)
    assert killed_at % STEPS_PER_EPOCH != 0 and killed_at < TOTAL, "the checkpoint must fall inside an epoch"
    run_dir = ckpt.parent.parent
    assert not (run_dir / "results.json").exists()

    out = subprocess.run(
        _cli([*args, "resume=auto"], root), capture_output=True, text=True, cwd=root, timeout=300, env=_same_threads()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert f"resuming {ckpt}" in out.stdout
    assert resumed["steps"] == TOTAL and Path(resumed["run_dir"]) == run_dir.resolve()
    # the run's record counts every leg: the killed one up to its checkpoint, the resumed one the batches after it
    assert resumed["images_seen"] == TOTAL * 16
    assert [(leg["from_step"], leg["to_step"], leg["images_seen"]) for leg in resumed["legs"]] == [
        (0, killed_at, killed_at * 16),
        (killed_at, TOTAL, (TOTAL - killed_at) * 16),
    ]

    straight = run_pretraining(make_cfg([*COMMON, "data.num_workers=0"], tmp_path / "straight"))
    assert straight["steps"] == TOTAL
    a, b = load_checkpoint(Path(straight["checkpoint"])), load_checkpoint(Path(resumed["checkpoint"]))
    assert a["global_step"] == b["global_step"] == TOTAL and a["epoch"] == b["epoch"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and any(k.startswith("objective.") for k in sa)
    assert any(k.startswith("online_probe.") for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    # the lr schedule continued from the checkpoint's step, not from 0
    assert b["lr_schedulers"][0]["last_epoch"] == a["lr_schedulers"][0]["last_epoch"] == TOTAL
    torch.testing.assert_close(b["lr_schedulers"][0]["_last_lr"], a["lr_schedulers"][0]["_last_lr"])
    for key, state in a["optimizer_states"][0]["state"].items():  # momentum buffers
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer_states"][0]["state"][key][name], value, rtol=1e-5, atol=1e-6)
    pos = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] for c in (a, b)]
    assert pos[0] == pos[1] and pos[0]["epoch"] == 1 and pos[0]["batches_done"] == STEPS_PER_EPOCH
