"""One ``logs/metrics.csv`` across the legs of a resumed run: every row names the leg that logged it; a resume drops
what a leg logged after the checkpoint it resumes from (work redone) but keeps the end-of-run record of a leg that
finished there (its final evaluation); the message says which of the two the earlier leg did."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest

from ssl_vision.eval.compare import read_metrics
from ssl_vision.launch import run_pretraining
from ssl_vision.run_record import RunCSVLogger, trim_metrics_csv
from tests.conftest import FAST

# 32 samples / 16 per batch: 2 optimizer steps per epoch. Validation inside fit never comes (every 5th epoch), so
# each leg's final evaluation runs after fit, and Lightning logs it at the step count reached: the row that sits at
# the checkpoint's step, where a resume trims.
STEPS_PER_EPOCH = 2
BASE = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "data.synthetic_size=32",
    "data.num_workers=0",
    "method.kwargs.proj_hidden_dim=32",
    "trainer.check_val_every_n_epoch=5",
    "eval.final_eval=true",
]


def _rows(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], key: str) -> list[tuple[int, int, float]]:
    """``(leg, step, value)`` of every row that holds ``key``, in file order."""
    return [(int(r["leg"]), int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def _train_steps(rows: list[dict]) -> list[tuple[int, int]]:
    return [(int(r["leg"]), int(r["step"])) for r in rows if r.get("train/loss")]


class Crash(L.Callback):
    """Kills the leg (an exception, as a crash or ``scancel`` would end it) once ``step`` optimizer steps are done: no
    checkpoint is written after the one it resumed from, its rows after that one are in metrics.csv."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("killed")


def test_extended_finished_run_keeps_each_legs_end_of_run_rows_once(make_cfg, tmp_path, capsys):
    """Leg 1 trains 1 epoch and finishes (final kNN at step 2, results at step 1); leg 2 resumes it with
    trainer.max_epochs=2; leg 3 resumes the finished run with nothing left to train and evaluates again. metrics.csv
    holds each leg's end-of-run rows once, marked with its leg, and each training step once; no message calls a
    finished leg interrupted; tools/compare.py reads one kNN value per step, the latest."""
    s1, s2 = STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    runs = tmp_path / "outputs" / "simclr-resnet18-synthetic"  # where resume=auto looks
    first = run_pretraining(make_cfg(BASE, runs / "leg1"))
    run_dir = Path(first["run_dir"])
    assert first["steps"] == s1 and first["knn_top1"] is not None
    capsys.readouterr()

    second = run_pretraining(make_cfg([*BASE, "trainer.max_epochs=2", f"resume={first['checkpoint']}"], runs / "leg2"))
    out = capsys.readouterr().out
    assert second["run_dir"] == str(run_dir) and second["steps"] == s2
    assert "interrupted" not in out, out
    assert f"finished at step {s1}" in out, out

    rows = _rows(run_dir)
    assert _train_steps(rows) == [(1, s) for s in range(s1)] + [(2, s) for s in range(s1, s2)]
    # the final evaluation after fit is logged at the step count, the results at the last batch's step
    assert _series(rows, "val/knn_top1") == [(1, s1, first["knn_top1"]), (2, s2, second["knn_top1"])]
    assert _series(rows, "final/knn_top1") == [(1, s1 - 1, first["knn_top1"]), (2, s2 - 1, second["knn_top1"])]
    assert _series(rows, "throughput/wall_s") == [
        (1, s1 - 1, pytest.approx(first["wall_s"], abs=0.01)),
        (2, s2 - 1, pytest.approx(second["wall_s"], abs=0.01)),
    ]

    third = run_pretraining(make_cfg([*BASE, "trainer.max_epochs=2", "resume=auto"], runs / "leg3"))
    out = capsys.readouterr().out
    assert third["run_dir"] == str(run_dir) and third["steps"] == s2
    assert "interrupted" not in out, out
    rows = _rows(run_dir)
    assert _train_steps(rows) == [(1, s) for s in range(s1)] + [(2, s) for s in range(s1, s2)]
    assert _series(rows, "val/knn_top1") == [
        (1, s1, first["knn_top1"]),
        (2, s2, second["knn_top1"]),
        (3, s2, third["knn_top1"]),
    ]
    assert [(leg, step) for leg, step, _ in _series(rows, "final/knn_top1")] == [(1, s1 - 1), (2, s2 - 1), (3, s2 - 1)]

    curves = read_metrics(run_dir / "logs" / "metrics.csv")
    assert [step for step, _ in curves["loss"]] == list(range(s2))
    assert curves["knn"] == [(s1, first["knn_top1"]), (s2, third["knn_top1"])], "one value per step, the latest leg's"
    assert curves["epochs"] == 2


def test_killed_legs_rows_after_its_checkpoint_are_dropped_as_interrupted(make_cfg, tmp_path, capsys):
    """Leg 1 finishes after 1 epoch; leg 2 resumes with trainer.max_epochs=2 and is killed after 1 more step, before
    its next checkpoint; the next leg resumes from the same checkpoint. The killed leg's rows are dropped with a
    message that says it was interrupted; leg 1's end-of-run rows stay; every training step appears once."""
    s1, s2 = STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    first = run_pretraining(make_cfg(BASE, tmp_path / "leg1"))
    run_dir = Path(first["run_dir"])
    with pytest.raises(RuntimeError, match="killed"):
        run_pretraining(
            make_cfg([*BASE, "trainer.max_epochs=2", f"resume={first['checkpoint']}"], tmp_path / "leg2"),
            extra_callbacks=[Crash(s2)],  # in the last batch of epoch 2, before the epoch's checkpoint
        )
    killed = [r for r in _rows(run_dir) if int(r["step"]) >= s1 and r.get("train/loss")]
    assert killed and all(r["leg"] == "2" for r in killed), "the killed leg logged training rows after step s1"
    capsys.readouterr()

    third = run_pretraining(
        make_cfg([*BASE, "trainer.max_epochs=2", f"resume={first['checkpoint']}"], tmp_path / "leg3")
    )
    out = capsys.readouterr().out
    assert third["steps"] == s2
    dropped = [line for line in out.splitlines() if "dropped" in line]
    assert len(dropped) == 1 and f"dropped {len(killed)} row{'s' if len(killed) != 1 else ''} " in dropped[0], out
    assert "leg 2, which was interrupted" in dropped[0], dropped

    rows = _rows(run_dir)
    # the checkpoint resumed (step s1) recorded one leg: the leg redoing the killed one's work is leg 2 again
    assert _train_steps(rows) == [(1, s) for s in range(s1)] + [(2, s) for s in range(s1, s2)]
    assert _series(rows, "val/knn_top1") == [(1, s1, first["knn_top1"]), (2, s2, third["knn_top1"])]
    assert [leg for leg, _, _ in _series(rows, "final/knn_top1")] == [1, 2]


# ------------------------------------------------------------------------------------------------ the rule, by file
HEADER = ["epoch", "final/knn_top1", "step", "train/loss", "val/knn_top1"]


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _legs(n: int) -> list[dict]:
    return [{"from_step": None, "to_step": None} for _ in range(n)]


def test_file_without_leg_column_keeps_the_finished_legs_evaluation(tmp_path, capsys):
    """A metrics.csv written before rows carried their leg: leg 1 finished at step 2 (results.json of step 2), a later
    leg logged steps 2 and 3 and an evaluation, then died. The resume from step 2 keeps leg 1's evaluation at step 2,
    which came before that later work, and drops the later leg's rows as interrupted."""
    path = tmp_path / "metrics.csv"
    leg1 = [
        {"epoch": 0, "step": 0, "train/loss": 5.0},
        {"epoch": 0, "step": 1, "train/loss": 4.0},
        {"epoch": 1, "step": 2, "val/knn_top1": 30.0},  # leg 1's final evaluation, after fit
        {"step": 1, "final/knn_top1": 30.0},
    ]
    later = [
        {"epoch": 1, "step": 2, "train/loss": 3.5},
        {"epoch": 1, "step": 3, "train/loss": 3.0},
        {"epoch": 1, "step": 3, "val/knn_top1": 40.0},
    ]
    _write(path, HEADER, leg1 + later)
    n = trim_metrics_csv(path, before_step=2, results={"steps": 2, "legs": _legs(1)})
    out = capsys.readouterr().out
    assert n == len(later)
    assert "the leg that was interrupted" in out and "finished at step 2" in out, out
    with open(path, newline="") as f:
        got = [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]
    assert got == [{k: str(v) for k, v in r.items()} for r in leg1]


def test_resume_from_before_a_finished_legs_end_says_it_finished(tmp_path, capsys):
    """Leg 2 finished at step 4 (results.json of step 4, 2 legs); a resume from the periodic checkpoint of step 2 drops
    its rows at steps 2..4 -- the resumed leg trains them again -- and says that leg finished at step 4, not that it
    was interrupted. Without a results.json the same rows are dropped as an interrupted leg's."""
    header = ["leg", *HEADER]
    rows = [
        {"leg": 1, "epoch": 0, "step": 0, "train/loss": 5.0},
        {"leg": 1, "epoch": 0, "step": 1, "train/loss": 4.0},
        {"leg": 2, "epoch": 1, "step": 2, "train/loss": 3.5},
        {"leg": 2, "epoch": 1, "step": 3, "train/loss": 3.0},
        {"leg": 2, "epoch": 2, "step": 4, "val/knn_top1": 40.0},
        {"leg": 2, "step": 3, "final/knn_top1": 40.0},
    ]
    for results, wording in (
        ({"steps": 4, "legs": _legs(2)}, "leg 2, which finished at step 4"),
        (None, "leg 2, which was interrupted"),
    ):
        path = tmp_path / str(bool(results)) / "metrics.csv"
        _write(path, header, rows)
        assert trim_metrics_csv(path, before_step=2, results=results) == 4
        out = capsys.readouterr().out
        assert wording in out and ("interrupted" in out) == (results is None), out
        with open(path, newline="") as f:
            assert [(r["leg"], r["step"]) for r in csv.DictReader(f)] == [("1", "0"), ("1", "1")]


def test_new_column_rewrites_the_log_atomically(tmp_path, monkeypatch):
    """A leg whose rows bring a new column (a metric the earlier legs did not log, or ``leg`` into a file written
    without it) rewrites metrics.csv with the wider header; a crash during that rewrite leaves the previous file whole
    (Lightning's writer truncates it in place first, losing every earlier row)."""
    path = tmp_path / "logs" / "metrics.csv"
    old = [{"epoch": 0, "step": s, "train/loss": 5.0 - s} for s in range(3)]
    _write(path, HEADER, old)
    before = path.read_bytes()
    logger = RunCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=3)

    real = csv.DictWriter.writerows

    def crash(self, rowdicts):
        rowdicts = list(rowdicts)
        if "train/lr" in self.fieldnames and len(rowdicts) == len(old):  # the rewrite of the earlier rows
            raise OSError(28, "No space left on device")
        return real(self, rowdicts)

    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(OSError):
        logger.save()
    assert path.read_bytes() == before, "the earlier rows are all there"
    assert not [p.name for p in path.parent.iterdir() if p.name != "metrics.csv"], "no temporary file left"
    monkeypatch.setattr(csv.DictWriter, "writerows", real)
    logger = RunCSVLogger(save_dir=str(tmp_path), name="logs", version="", leg=2)  # the leg run again
    logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step=3)
    logger.save()
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert [(r["leg"], r["step"], r["train/loss"], r["train/lr"]) for r in got] == [
        ("", "0", "5.0", ""),
        ("", "1", "4.0", ""),
        ("", "2", "3.0", ""),
        ("2", "3", "1.0", "0.1"),
    ]
