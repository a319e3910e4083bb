"""Checkpoints that are never poisoned, verified on load, and kept tidy: a diverged state is never written (nor named
as the one to continue from), evaluation refuses non-finite weights, a flipped bit or a file that is no checkpoint is
named for what it is, stale temporary files and ``-vN`` copies do not pile up."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ssl_vision.checkpoint_io as checkpoint_io
from ssl_vision.checkpoint_io import (
    AtomicCheckpointIO,
    describe_newest_finite,
    load_checkpoint,
    periodic_prune_plan,
    remove_stale_temporaries,
)
from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.launch import run_pretraining
from tests.conftest import FAST

BASE = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    "method.kwargs.proj_hidden_dim=64",
    *FAST,
    "eval.final_eval=false",
    "trainer.limit_val_batches=0",
]  # small checkpoints (a 64-wide projector)


def _all_float_tensors(obj, name=""):
    """Every floating tensor of a nested checkpoint, by name (the test's own walk, not the code under test's)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _all_float_tensors(v, f"{name}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _all_float_tensors(v, f"{name}/{i}")


def _nonfinite_names(path: Path) -> list[str]:
    """Non-finite tensors of the training state: weights, buffers, optimizer and method state (not the checkpoint
    callback's bookkeeping, where "no score yet" is ±inf)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in ckpt.items() if k not in ("callbacks", "loops")}
    return [n for n, t in _all_float_tensors(state) if not bool(torch.isfinite(t).all())]


def _named_checkpoint(message: str) -> tuple[Path, int] | None:
    m = re.search(r"The newest finite checkpoint is (\S+) \(global step (\d+)\)", message)
    if m:
        return Path(m.group(1)), int(m.group(2))
    assert "There is no finite checkpoint in" in message, message
    return None


# ------------------------------------------------------------------------------------- diverged runs write no poison
def test_diverged_run_leaves_only_finite_checkpoints_and_names_one(make_cfg, tmp_path):
    """An absurd lr (1e9, no warmup) blows the BN statistics up to inf at step 3. Before, that step's checkpoint and
    last.ckpt held inf and the loss guard called last.ckpt "the last good checkpoint"; now the writer refuses that
    state, the run stops with a FloatingPointError naming a checkpoint that loads finite, and none on disk is
    poisoned."""
    cfg = make_cfg(
        [
            *BASE,
            "data.synthetic_size=256",
            "method.optim.base_lr=1e9",
            "method.optim.warmup_epochs=0",
            "trainer.max_steps=4",
            "checkpoint.every_n_steps=1",
        ],
        tmp_path / "run",
    )
    with pytest.raises(FloatingPointError) as err:
        run_pretraining(cfg)
    msg = str(err.value)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert files, f"the early, finite checkpoints are written: {msg}"
    for f in files:
        assert _nonfinite_names(f) == [], f"{f.name} holds non-finite tensors"
    named = _named_checkpoint(msg)
    assert named is not None, msg
    path, step = named
    assert path.is_file() and _nonfinite_names(path) == []
    newest = max(int(torch.load(f, weights_only=True)["global_step"]) for f in files)
    assert step == newest == int(torch.load(path, weights_only=True)["global_step"])
    assert not [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]


def test_writer_refuses_a_nan_state_and_leaves_the_previous_file(tmp_path):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    sd = {"backbone.w": torch.ones(4), "backbone.bn.running_var": torch.ones(3)}
    opt = {"state": {0: {"momentum_buffer": torch.zeros(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    io_.save_checkpoint({"global_step": 4, "state_dict": sd, "optimizer_states": [opt]}, path)
    before = path.read_bytes()

    poisoned_opt = {
        "state": {0: {"momentum_buffer": torch.tensor([0.0, float("nan"), 1.0, 2.0])}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    with pytest.raises(FloatingPointError) as err:
        io_.save_checkpoint({"global_step": 8, "state_dict": sd, "optimizer_states": [poisoned_opt]}, path)
    msg = str(err.value)
    assert f"refusing to write checkpoint {path}" in msg
    assert "optimizer_states[0]['state'][0]['momentum_buffer']" in msg and "1 NaN" in msg
    assert f"The newest finite checkpoint is {path} (global step 4)" in msg
    assert path.read_bytes() == before, "the previous checkpoint is untouched"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file is left"

    # an inf in the state_dict, in a directory without any checkpoint: nothing written, "none" said
    other = tmp_path / "fresh" / "epoch000-step0000002.ckpt"
    with pytest.raises(FloatingPointError) as err:
        io_.save_checkpoint({"global_step": 2, "state_dict": {"a": torch.tensor([1.0, float("inf")])}}, other)
    assert "state_dict['a'] (shape (2,): 0 NaN and 1 infinite of 2 values)" in str(err.value)
    assert f"There is no finite checkpoint in {other.parent}" in str(err.value)
    assert list(other.parent.iterdir()) == []


def test_newest_finite_skips_poisoned_files_and_init(tmp_path):
    """A last.ckpt holding NaN (as older versions wrote) is not named; the newest finite periodic one is; init.ckpt
    (not resumable) never is."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    good = {"w": torch.ones(2)}
    torch.save({"global_step": 2, "state_dict": good}, d / "epoch000-step0000002.ckpt")
    torch.save({"global_step": 4, "state_dict": good}, d / "epoch000-step0000004.ckpt")
    torch.save({"global_step": 6, "state_dict": {"w": torch.tensor([1.0, float("nan")])}}, d / "last.ckpt")
    torch.save({"global_step": 0, "state_dict": good, "ssl_vision": {"init": True}}, d / "init.ckpt")
    assert _named_checkpoint(describe_newest_finite(d)) == (d / "epoch000-step0000004.ckpt", 4)
    for f in d.glob("epoch*.ckpt"):
        f.unlink()
    assert _named_checkpoint(describe_newest_finite(d)) is None


def test_loss_guard_names_the_newest_finite_checkpoint_not_last_ckpt(make_cfg, monkeypatch, tmp_path):
    """Before, the non-finite-loss message always called checkpoints/last.ckpt "the last good checkpoint". Here
    last.ckpt is poisoned behind the run's back (as an older version could leave it) before the loss turns NaN at
    step 3: the message names the step-2 periodic file, which is finite, and says the weights are finite or not."""
    from ssl_vision.objectives.simclr import SimCLR

    run = tmp_path / "run"
    real_forward = SimCLR.forward

    def poisoned(self, views, backbone, step):
        out = real_forward(self, views, backbone, step)
        if step.global_step == 3:
            last = run / "checkpoints" / "last.ckpt"
            ckpt = torch.load(last, weights_only=True)
            ckpt["state_dict"]["backbone.conv1.weight"].fill_(float("nan"))
            torch.save(ckpt, last)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "forward", poisoned)
    with pytest.raises(FloatingPointError) as err:
        run_pretraining(make_cfg([*BASE, "trainer.max_steps=4", "checkpoint.every_n_steps=2"], run))
    msg = str(err.value)
    assert "non-finite loss nan at global step 3" in msg
    assert "last good checkpoint" not in msg and "resume=auto" not in msg  # resume=auto would take the poisoned file
    assert _named_checkpoint(msg) == (run / "checkpoints" / "epoch000-step0000002.ckpt", 2)
    assert "weights themselves are already non-finite" not in msg  # the weights are fine, only the loss is not


# ------------------------------------------------------------------------------------ evaluation refuses NaN weights
# the shared 1-step SimCLR checkpoint (resnet18 at width 0.125, 32 px synthetic) of tests/test_faults.py
from tests.test_faults import simclr_checkpoint  # noqa: E402,F401  (a pytest fixture)


@pytest.mark.parametrize("fmt", ["checkpoint", "export"])
def test_load_backbone_refuses_non_finite_weights(simclr_checkpoint, tmp_path, fmt):
    """Before, an inf weight loaded silently: kNN printed chance level with exit 0 and the linear probe said
    "lower the lr". Now load_backbone (which every evaluation tool calls) raises naming the file and the tensor."""
    ckpt = torch.load(simclr_checkpoint, weights_only=True)
    ckpt["state_dict"]["backbone.layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    if fmt == "checkpoint":
        path = tmp_path / "diverged.ckpt"
        torch.save(ckpt, path)  # what an older version could write
    else:
        model, _, info = load_backbone(simclr_checkpoint)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
        path = tmp_path / "diverged.backbone.safetensors"
        save_file(state, str(path))
        import json

        json.dump(
            {
                "format": "ssl_vision.backbone/1",
                "create_kwargs": info["create_kwargs"],
                "feature_dim": info["feature_dim"],
                "weights": "student",
                "method": "simclr",
            },
            open(path.with_suffix(".json"), "w"),
        )
    with pytest.raises(ValueError) as err:
        load_backbone(path)
    msg = str(err.value)
    assert str(path) in msg and "layer1.0.conv1.weight" in msg and "not finite" in msg and "1 infinite" in msg
    load_backbone(simclr_checkpoint)  # the intact one still loads


# ------------------------------------------------------------------------------------------ integrity on load (CRC)
def test_a_flipped_bit_is_detected_and_the_file_named(tmp_path):
    io_ = AtomicCheckpointIO()
    weight = torch.arange(4096, dtype=torch.float32) * 0.5 + 0.25  # a pattern that occurs once in the file
    path = tmp_path / "epoch000-step0000004.ckpt"
    io_.save_checkpoint({"global_step": 4, "state_dict": {"backbone.w": weight}}, path)
    io_.save_checkpoint(
        {"global_step": 2, "state_dict": {"backbone.w": weight}}, tmp_path / "epoch000-step0000002.ckpt"
    )
    assert torch.equal(load_checkpoint(path)["state_dict"]["backbone.w"], weight)  # intact: loads

    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 4 * 1000 + 2] ^= 0x10  # one bit of the exponent of element 1000
    path.write_bytes(bytes(raw))
    silently = torch.load(path, weights_only=True)["state_dict"]["backbone.w"]
    assert not torch.equal(silently, weight), "torch's own reader does not notice (the reason for the check)"
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert re.search(
        rf"checkpoint {re.escape(str(path))} is damaged: entry \S+/data/0 fails its CRC check \(a bit "
        r"flipped on disk or in transfer\); use another checkpoint",
        msg,
    ), msg
    assert "epoch000-step0000002.ckpt" in msg  # the siblings to use instead


def test_files_written_without_crcs_still_load(tmp_path):
    from torch.utils.serialization import config

    path = tmp_path / "nocrc.ckpt"
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save({"global_step": 1, "w": torch.ones(3)}, path)
    finally:
        config.save.compute_crc32 = old
    assert load_checkpoint(path)["global_step"] == 1


# ---------------------------------------------------------------------------------- what a non-checkpoint file is
def _random_bytes(n: int) -> bytes:
    g = torch.Generator().manual_seed(0)
    data = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
    return b"\xcf" + data[1:]  # not the zip magic, not a pickle protocol byte


@pytest.mark.parametrize(
    "kind, expected",
    [
        (
            "text",
            r"cannot read checkpoint .*bad\.ckpt: it is a text file \(starting 'epoch: 3'\), not a torch checkpoint",
        ),
        (
            "random",
            r"cannot read checkpoint .*bad\.ckpt: it is not a torch checkpoint \(a torch checkpoint is a zip "
            r"archive .*this file starts with cf ",
        ),
        ("empty", r"cannot read checkpoint .*bad\.ckpt: the file is empty \(0 bytes"),
        ("plain pickle", r"cannot read checkpoint .*bad\.ckpt: it is a pickle but not a torch checkpoint"),
        ("safetensors", r"cannot read checkpoint .*bad\.ckpt: it is a safetensors file \(an exported backbone\)"),
        ("truncated", r"cannot read checkpoint .*bad\.ckpt: it is truncated"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, kind, expected):
    """Before: text -> KeyError: 101; random bytes -> "refusing to load ... can run code" with torch's advice that
    weights_only=False "will likely succeed". Each now says what the file is, and is a ValueError."""
    path = tmp_path / "bad.ckpt"
    if kind == "text":
        path.write_text("epoch: 3\nloss: 0.5\n")
    elif kind == "random":
        path.write_bytes(_random_bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    elif kind == "safetensors":
        save_file({"w": torch.ones(3)}, str(path))
    else:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(10000)}, tmp_path / "good.ckpt")
        path.write_bytes((tmp_path / "good.ckpt").read_bytes()[:20000])
    with pytest.raises(ValueError, match=expected) as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value) and "can run code" not in str(err.value)


def test_a_directory_as_checkpoint_lists_its_checkpoints(simclr_checkpoint, tmp_path):
    """Before: load_backbone said "does not exist" for a directory (which exists)."""
    ckpt_dir = simclr_checkpoint.parent
    for load in (load_checkpoint, load_backbone):
        with pytest.raises(
            ValueError,
            match=rf"checkpoint path {re.escape(str(ckpt_dir))} is a directory, not a "
            r"checkpoint file; pass one file in it, e\.g\. .*last\.ckpt",
        ):
            load(ckpt_dir)
    run_dir = ckpt_dir.parent  # one level up: the files of checkpoints/ are listed
    with pytest.raises(ValueError, match=r"is a directory.*checkpoints/last\.ckpt"):
        load_backbone(run_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing.ckpt")


def test_a_hostile_pickle_is_still_refused_for_safety(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt: .*GLOBAL .*system.*can run code"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------------ housekeeping
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    host = checkpoint_io._host()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale_old = tmp_path / f".last.ckpt.tmp-{dead}"  # the name older versions used
        stale = tmp_path / f".epoch000-step0000004.ckpt.tmp-{dead}@{host}"
        alive = tmp_path / f".last.ckpt.tmp-{live.pid}@{host}"
        elsewhere = tmp_path / f".last.ckpt.tmp-{dead}@another-host.example"
        unrelated = tmp_path / ".notes.txt"
        for p in (stale_old, stale, alive, elsewhere, unrelated):
            p.write_bytes(b"x" * 100)
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([alive.name, elsewhere.name, unrelated.name, "last.ckpt"])
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(tmp_path) == [alive]  # now that its writer is gone


def test_prune_plan_keeps_the_newest_steps_over_all_periodic_files(tmp_path):
    names = [
        "epoch000-step0000002.ckpt",
        "epoch000-step0000004.ckpt",
        "epoch000-step0000004-v1.ckpt",
        "epoch001-step0000006-v1.ckpt",
        "epoch001-step0000008.ckpt",
        "epoch002-step0000010.ckpt",
        "last.ckpt",
        "init.ckpt",
    ]
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(b"x")
        os.utime(tmp_path / n, (1000 + i, 1000 + i))
    keep, remove = periodic_prune_plan(tmp_path, 2, current_step=8)
    assert [(p.name, s) for p, s in keep] == [("epoch001-step0000008.ckpt", 8), ("epoch001-step0000006-v1.ckpt", 6)]
    assert sorted(p.name for p in remove) == [
        "epoch000-step0000002.ckpt",
        "epoch000-step0000004-v1.ckpt",
        "epoch000-step0000004.ckpt",
    ]  # step 10 (not reached yet) is left
    keep, remove = periodic_prune_plan(tmp_path, 2, current_step=8, protect=[tmp_path / "epoch000-step0000002.ckpt"])
    assert "epoch000-step0000002.ckpt" not in [p.name for p in remove]


def _ckpt_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.ckpt"))


RESUMABLE = [*BASE, "data.synthetic_size=256", "checkpoint.every_n_steps=1"]


def test_resume_after_a_kill_between_periodic_and_last_leaves_no_stale_periodic_file(make_cfg, tmp_path):
    """A kill after the step-3 periodic file but before last.ckpt: last.ckpt holds step 2, the resume redoes step 3.
    Before, that wrote epoch000-step0000003-v1.ckpt and the original step-3 file was never pruned; now step 3 is
    rewritten in place and only the newest save_top_k=2 periodic files remain."""
    run = tmp_path / "run"
    run_pretraining(make_cfg([*RESUMABLE, "trainer.max_steps=3", "checkpoint.save_top_k=3"], run))
    d = run / "checkpoints"
    assert _ckpt_names(d) == [
        "epoch000-step0000001.ckpt",
        "epoch000-step0000002.ckpt",
        "epoch000-step0000003.ckpt",
        "last.ckpt",
    ]
    (d / "last.ckpt").write_bytes((d / "epoch000-step0000002.ckpt").read_bytes())  # the state the kill left
    res = run_pretraining(
        make_cfg(
            [*RESUMABLE, "trainer.max_steps=5", "checkpoint.save_top_k=2", f"resume={d / 'last.ckpt'}"],
            tmp_path / "other",
        )
    )
    assert res["steps"] == 5 and Path(res["run_dir"]) == run.resolve()
    assert _ckpt_names(d) == ["epoch000-step0000004.ckpt", "epoch000-step0000005.ckpt", "last.ckpt"]
    assert load_checkpoint(d / "last.ckpt")["global_step"] == 5


def test_resume_from_an_earlier_periodic_file_rewrites_in_place_without_versions(make_cfg, tmp_path):
    """Resuming from the step-1 file of a run that reached step 2: before, Lightning wrote epoch000-step0000002-v1.ckpt
    and last-v1.ckpt (the restored callback state named no last file); now the step-2 file and last.ckpt are
    rewritten, and the file the run resumed from is kept."""
    run = tmp_path / "run"
    run_pretraining(make_cfg([*RESUMABLE, "trainer.max_steps=2", "checkpoint.save_top_k=3"], run))
    d = run / "checkpoints"
    first2 = (d / "epoch000-step0000002.ckpt").stat().st_mtime_ns
    run_pretraining(
        make_cfg(
            [*RESUMABLE, "trainer.max_steps=3", "checkpoint.save_top_k=3", f"resume={d / 'epoch000-step0000001.ckpt'}"],
            tmp_path / "other",
        )
    )
    assert _ckpt_names(d) == [
        "epoch000-step0000001.ckpt",
        "epoch000-step0000002.ckpt",
        "epoch000-step0000003.ckpt",
        "last.ckpt",
    ]
    assert (d / "epoch000-step0000002.ckpt").stat().st_mtime_ns > first2, "step 2 was rewritten in place"
    assert load_checkpoint(d / "epoch000-step0000002.ckpt")["global_step"] == 2
    assert load_checkpoint(d / "last.ckpt")["global_step"] == 3
