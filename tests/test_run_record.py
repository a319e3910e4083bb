"""A run's record: the run-directory lock, unique run directories, resume from the newest state, one log and one
coherent results file across resumes, throughput numbers without evaluation in them."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import ssl_vision.run_lock as run_lock
from ssl_vision.launch import run_pretraining
from ssl_vision.resume import find_resume_checkpoint
from ssl_vision.run_lock import RunDirInUseError, unique_dir
from tests.conftest import CONF, FAST

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "simclr-resnet18-synthetic"
# 64 samples / 16 per batch: 4 steps per epoch, 8 in all
COMMON = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "data.synthetic_size=64",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "eval.final_eval=false",
    "checkpoint.every_n_steps=4",
    "method.kwargs.proj_hidden_dim=64",
]

HOLD = """
import sys, time
from ssl_vision.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""

TRY = """
import sys
from ssl_vision.run_lock import RunLock, RunDirInUseError
try:
    RunLock(sys.argv[1]).acquire()
except RunDirInUseError as e:
    print(e)
    sys.exit(3)
"""


def _ckpt(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))
    return path


def _metrics(run_dir: Path) -> tuple[list[str], list[dict]]:
    text = (Path(run_dir) / "logs" / "metrics.csv").read_text()
    lines = text.splitlines()
    return lines, list(csv.DictReader(lines))


# ------------------------------------------------------------------------------------------------------------ lock
def test_live_run_holds_its_directory_and_a_resume_into_it_is_refused(make_cfg, tmp_path):
    """While a run lives, another process cannot take its directory's lock; resume=<path> and resume=auto into a
    directory locked by another live process are refused naming the holder's pid; once that process is SIGKILLed
    the lock is free again (nothing stuck)."""
    run_dir = tmp_path / "outputs" / PREFIX / "2025-01-01_00-00-00"
    last = _ckpt(run_dir / "checkpoints" / "last.ckpt", 4, time.time())
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (str(last), "auto"):
            with pytest.raises(RunDirInUseError) as err:
                run_pretraining(make_cfg([*COMMON, f"resume={resume}"], tmp_path / "leg"))
            msg = str(err.value)
            assert f"pid {holder.pid}" in msg and str(run_dir) in msg and "resume=auto" in msg, msg
        assert load_step(last) == 4, "the refused resume wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _try_lock(run_dir).returncode == 0, "the killed holder left nothing stuck"

    class ProbeLock(L.Callback):  # from inside a live run: another process must be refused
        def on_train_start(self, trainer, pl_module):
            self.out = _try_lock(Path(trainer.default_root_dir))

    probe = ProbeLock()
    res = run_pretraining(
        make_cfg([*COMMON, "trainer.max_steps=1", "trainer.limit_val_batches=0"], tmp_path / "live"),
        extra_callbacks=[probe],
    )
    assert probe.out.returncode == 3 and f"pid {os.getpid()}" in probe.out.stdout, probe.out.stdout + probe.out.stderr
    assert _try_lock(Path(res["run_dir"])).returncode == 0, "released when the run returned"


def _try_lock(run_dir: Path) -> subprocess.CompletedProcess:
    """Take and drop ``run_dir``'s lock from another process (a POSIX lock never conflicts within one process)."""
    return subprocess.run([sys.executable, "-c", TRY, str(run_dir)], cwd=ROOT, capture_output=True, text=True)


def load_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def test_new_run_directories_are_unique_within_one_second(tmp_path, monkeypatch):
    """Two runs composed in the same second get different run (and multirun sweep) directories."""
    monkeypatch.setattr(run_lock.time, "strftime", lambda pattern, *a: "2025-01-01_00-00-00")
    dirs = []
    for _ in range(3):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(
                "pretrain", overrides=[f"paths.output_root={tmp_path}", "data=synthetic"], return_hydra_config=True
            )
        dirs.append((str(cfg.hydra.run.dir), str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)))
    GlobalHydra.instance().clear()
    assert all(a == b for a, b, _ in dirs), "one config resolves its run directory once"
    runs = [a for a, _, _ in dirs]
    assert runs == [
        str(tmp_path / PREFIX / name)
        for name in ("2025-01-01_00-00-00", "2025-01-01_00-00-00-1", "2025-01-01_00-00-00-2")
    ]
    assert len({s for _, _, s in dirs}) == 3 and all(Path(d).is_dir() for d in runs)


def test_unique_dir_under_concurrent_processes(tmp_path):
    """Processes racing for one name: each gets its own directory (exclusive mkdir)."""
    code = "import sys; from ssl_vision.run_lock import unique_dir; print(unique_dir(sys.argv[1], 'fixed'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    got = sorted(p.communicate()[0].strip() for p in procs)
    assert got == sorted(str(tmp_path / n) for n in ("fixed", "fixed-1", "fixed-2", "fixed-3"))
    assert unique_dir(str(tmp_path), "fixed") == str(tmp_path / "fixed-4")


# ---------------------------------------------------------------------------------------------- resume=auto choice
def test_resume_auto_takes_the_newest_state_by_step(tmp_path, capsys):
    """last-v1.ckpt (written after a moved run or a resume from a periodic checkpoint) holds a later step than the
    stale last.ckpt: it is chosen. init.ckpt and unreadable files never are; equal steps go to the newer file; the
    run is the one written last, even if an older run has more steps."""
    t = time.time() - 1000
    old_run = tmp_path / PREFIX / "2025-01-01_00-00-00" / "checkpoints"
    _ckpt(old_run / "last.ckpt", 100, t)
    run = tmp_path / PREFIX / "2025-01-02_00-00-00" / "checkpoints"
    _ckpt(run / "last.ckpt", 4, t + 10)
    newest = _ckpt(run / "last-v1.ckpt", 8, t + 20)
    _ckpt(run / "epoch000-step0000006.ckpt", 6, t + 15)
    _ckpt(run / "init.ckpt", 0, t + 50)
    (run / "last-v2.ckpt").write_bytes(b"truncated")
    os.utime(run / "last-v2.ckpt", (t + 40, t + 40))
    assert find_resume_checkpoint("auto", tmp_path, PREFIX) == newest
    out = capsys.readouterr().out
    assert "skipping" in out and "last-v2.ckpt" in out
    periodic = _ckpt(run / "epoch001-step0000008.ckpt", 8, t + 30)  # same step, written later
    assert find_resume_checkpoint("auto", tmp_path, PREFIX) == periodic
    _ckpt(run / "epoch001-step0000010.ckpt", 10, t + 25)
    assert find_resume_checkpoint("auto", tmp_path, PREFIX) == run / "epoch001-step0000010.ckpt"


def test_unreadable_candidate_is_skipped_with_a_note(tmp_path, capsys):
    run = tmp_path / PREFIX / "2025-01-02_00-00-00" / "checkpoints"
    good = _ckpt(run / "last.ckpt", 4, 1000)
    (run / "last-v1.ckpt").write_bytes(b"not a checkpoint")
    assert find_resume_checkpoint("auto", tmp_path, PREFIX) == good
    out = capsys.readouterr().out
    assert "skipping" in out and "last-v1.ckpt" in out


# ------------------------------------------------------------------------------- one log, one results file per run
def test_resumed_run_keeps_one_log_and_one_coherent_results_file(make_cfg, tmp_path):
    """Leg 1 trains 1 epoch, 4 steps (and, as a killed leg would, its log has rows past its checkpoint); leg 2 resumes
    with resume=auto and trainer.max_epochs=2 from another Hydra directory and trains to 8; leg 3 resumes the
    finished run. The run directory's
    metrics.csv has one header and each step once; results.json counts all 8 steps' images and time; leg 3 keeps the
    numbers; each resumed leg's own directory is moved under resumes/."""
    runs = tmp_path / "outputs" / PREFIX
    # the log's training rows are what matters here; checkpoints at steps 3 and 6 and at the end of each leg
    common = [*COMMON, "trainer.limit_val_batches=0", "checkpoint.every_n_steps=3"]
    first = run_pretraining(make_cfg([*common, "trainer.max_epochs=1"], runs / "t1"))
    run_dir = Path(first["run_dir"])
    assert first["steps"] == 4 and first["images_seen"] == 64
    with open(run_dir / "logs" / "metrics.csv", "a", newline="") as f:  # rows of lost work after the checkpoint
        lines, rows = _metrics(run_dir)
        writer = csv.DictWriter(f, fieldnames=lines[0].split(","))
        writer.writerow({"epoch": 1, "step": 4, "train/loss": 999.0})
        writer.writerow({"epoch": 1, "step": 5, "train/loss": 999.0})
    (runs / "t2" / ".hydra").mkdir(parents=True)
    (runs / "t2" / ".hydra" / "overrides.yaml").write_text("- resume=auto\n")
    second = run_pretraining(make_cfg([*common, "resume=auto"], runs / "t2"))
    assert second["run_dir"] == first["run_dir"] and second["steps"] == 8
    assert second["images_seen"] == 8 * 16, "images of every leg"
    assert [(leg["from_step"], leg["to_step"], leg["images_seen"]) for leg in second["legs"]] == [
        (0, 4, 64),
        (4, 8, 64),
    ]
    assert second["train_s"] == pytest.approx(sum(leg["train_s"] for leg in second["legs"]), abs=0.02)
    assert second["images_per_s"] == pytest.approx(second["images_seen"] / second["train_s"], rel=0.02)
    assert second["wall_s"] >= sum(leg["wall_s"] for leg in second["legs"]) - 0.02
    assert second["wall_s"] > second["train_s"]

    lines, rows = _metrics(run_dir)
    assert sum(1 for line in lines if line.startswith("epoch,")) == 1, "one header"
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == list(range(8)), train_steps  # every step once, in order, across both legs
    assert all(float(r["train/loss"]) != 999.0 for r in rows if r.get("train/loss"))
    assert not (runs / "t2").exists() and (run_dir / "resumes" / "t2" / ".hydra" / "overrides.yaml").is_file()

    third = run_pretraining(make_cfg([*common, "resume=auto"], runs / "t3"))  # nothing left to train
    for key in ("steps", "images_seen", "train_s", "images_per_s", "images_per_s_steady", "train_loss"):
        assert third[key] == second[key], key
    assert len(third["legs"]) == 3 and third["legs"][-1]["from_step"] == third["legs"][-1]["to_step"] == 8
    assert third["wall_s"] >= second["wall_s"]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["images_seen"] == 128 and on_disk["train_loss"] == second["train_loss"]
    assert len(list(run_dir.glob("results.*.json"))) == 2, "earlier results kept"


# ------------------------------------------------------------------------------------------- honest throughput
class FakeClock:
    """The run record's clock, advanced only by the test: each duration is then known exactly."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Costs(L.Callback):
    """Each training batch costs 1 s of the fake clock, the first one 5 s more; each validation ``val_s``."""

    def __init__(self, clock: FakeClock, val_s: float, sleep_s: float = 0.0):
        self.clock, self.val_s, self.sleep_s, self.validations = clock, val_s, sleep_s, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.now += 1.0 + (5.0 if trainer.global_step == 0 else 0.0)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validations += 1
        self.clock.now += self.val_s
        time.sleep(self.sleep_s)


def test_evaluation_time_is_not_training_time_and_wall_covers_everything(make_cfg, tmp_path, monkeypatch):
    """8 batches of 1 s (the first 6 s) and a validation of 10 s at init and after each of the 2 epochs:
    images_per_s = 128 / 13 s as if validation cost nothing, the steady figure leaves the first step out
    (112 images / 7 s), and wall_s is all of it (13 s + 3 validations)."""
    val_s = 10.0
    from ssl_vision import run_record

    clock = FakeClock()
    monkeypatch.setattr(run_record, "clock", clock)
    costs = Costs(clock, val_s)
    res = run_pretraining(make_cfg([*COMMON, "eval.knn_at_init=true"], tmp_path / "run"), extra_callbacks=[costs])
    assert costs.validations == 3 and res["steps"] == 8 and res["images_seen"] == 128
    assert res["train_s"] == pytest.approx(13.0, abs=0.01)
    assert res["images_per_s"] == pytest.approx(128 / 13, abs=0.01)
    assert res["images_per_s_steady"] == pytest.approx(112 / 7, abs=0.01)
    assert res["wall_s"] == pytest.approx(13.0 + 3 * val_s, abs=0.01)


def test_real_slow_validation_is_in_wall_s_not_in_train_s(make_cfg, tmp_path):
    """The same with the real clock: 1 s of sleep in each of the 3 validations lands in wall_s, not in train_s."""
    costs = Costs(FakeClock(), 0.0, sleep_s=1.0)
    res = run_pretraining(
        make_cfg([*COMMON, "eval.knn_at_init=true", "trainer.max_epochs=1"], tmp_path / "run"), extra_callbacks=[costs]
    )
    assert costs.validations == 2 and res["images_seen"] == 64
    assert res["wall_s"] >= res["train_s"] + 2.0, res


def test_one_step_run_has_no_steady_figure(make_cfg, tmp_path):
    res = run_pretraining(make_cfg([*COMMON, "trainer.max_steps=1", "trainer.limit_val_batches=0"], tmp_path / "one"))
    assert res["steps"] == 1 and res["images_per_s_steady"] is None and res["images_per_s"] > 0
    on_disk = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    assert on_disk["images_per_s_steady"] is None and on_disk["wall_s"] >= on_disk["train_s"] > 0


def test_resume_from_a_directory_names_the_checkpoints_in_it(tmp_path):
    """``resume=<a run's checkpoints/ directory>`` is not "no such file": the error lists the .ckpt files there."""
    from ssl_vision.checkpoint_io import AtomicCheckpointIO
    from ssl_vision.resume import find_resume_checkpoint

    ckpt_dir = tmp_path / "run" / "checkpoints"
    AtomicCheckpointIO().save_checkpoint(
        {"global_step": 4, "state_dict": {"w": torch.zeros(2)}}, ckpt_dir / "last.ckpt"
    )
    with pytest.raises(ValueError, match=r"is a directory.*last\.ckpt.*resume=auto"):
        find_resume_checkpoint(str(ckpt_dir), tmp_path, "simclr-resnet18-synthetic")
