"""A run's record: throughput timing, ``results.json``, and files written without losing what was there.

Nothing here reads a config.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from pathlib import Path

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn

#: the clock of every duration in a run's record (a module attribute, so a test can drive it)
clock = time.perf_counter

#: keys every results.json carries (other tools and benchmarks read them; keep stable, see README).
RESULT_KEYS = (
    "method",
    "backbone",
    "data",
    "steps",
    "images_seen",
    "wall_s",
    "images_per_s",
    "train_loss",
    "knn_top1",
    "knn_top1_init",
    "knn_protocol",
    "probe_top1",
    "checkpoint",
    "train_s",
    "images_per_s_steady",
    "legs",
)


def warmup_steps(total_steps: float | int) -> int:
    """Optimizer steps at the start of each leg left out of ``images_per_s_steady``: 10 % of the run's steps, at most
    5 and at least 1 (``min(5, max(1, floor(0.1 * total)))``; 5 when the length is unknown)."""
    if total_steps is None or total_steps != total_steps or total_steps == float("inf"):
        return 5
    return min(5, max(1, int(0.1 * total_steps)))


class ThroughputTimer(L.Callback):
    """Images and time of a run, summed over every leg of it (a run resumed N times has N + 1 legs).

    A stateful callback: Lightning saves :meth:`state_dict` in every checkpoint and gives it back to
    :meth:`load_state_dict` on a resume, so the numbers continue from the checkpoint the run resumes from (what a leg
    did after its last checkpoint was lost with it and is redone, so it is not counted twice).

    * ``train_s``: time in training batches only -- each batch from the end of the previous one (or the start of its
      epoch, or the end of a mid-epoch validation) to its own end: loading it (and the loader's start-up for the
      first batch of an epoch), forward, backward, optimizer step, a checkpoint written after a step. Validation,
      kNN evaluation and everything around ``fit`` are left out.
    * ``images_seen``: training samples over all processes; ``images_per_s = images_seen / train_s``.
    * ``images_per_s_steady``: the same over the batches after the first :func:`warmup_steps` optimizer steps of each
      leg (allocation, worker start-up, compilation); None when no batch is left.
    * ``wall_s``: the whole command of every leg (``run_pretraining``: building, evaluation at init, fit, final
      evaluation), from ``start`` (this leg's) to :meth:`finish`; earlier legs as recorded in the checkpoint resumed
      from (or in the run's ``results.json`` when that one describes the same step).
    * ``legs``: one entry per leg: start time, steps from/to, images, train_s, wall_s, the checkpoint it resumed from.
    """

    def __init__(
        self, start: float | None = None, resumed_from: str | None = None, previous_results: dict | None = None
    ) -> None:
        self._previous_results = previous_results  # the run's results.json, adopted if it is of the step resumed
        self._t_leg = clock() if start is None else start
        self._earlier = {"images_seen": 0, "train_s": 0.0, "steady_images": 0, "steady_s": 0.0, "wall_s": 0.0}
        self.earlier_legs: list[dict] = []
        started = time.localtime(time.time() - (clock() - self._t_leg))  # when the leg's command began
        self.leg = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", started),
            "from_step": None,
            "to_step": None,
            "images_seen": 0,
            "train_s": 0.0,
            "steady_images": 0,
            "steady_s": 0.0,
            "wall_s": None,
            "resumed_from": resumed_from,
        }
        self.knn_top1_init: float | None = None  # carried with the run: a resumed leg does not recompute it
        self._t: float | None = None  # start of the interval the next batch end closes
        self._step_before: int | None = None
        self._warmup = 5
        self._wall_end: float | None = None

    # ------------------------------------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self.leg["from_step"] = int(trainer.global_step)
        self._warmup = warmup_steps(trainer.estimated_stepping_batches)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = int(trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        # validation inside fit (epoch end or mid-epoch) is not training time. (``trainer.training`` is False while
        # it runs, even inside fit: the function being run is what says so.)
        if trainer.state.fn == TrainerFn.FITTING:
            self._t = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._t = clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = clock()
        n = int(batch[1].shape[0]) * trainer.world_size
        dt = now - self._t if self._t is not None else 0.0
        self.leg["images_seen"] += n
        self.leg["to_step"] = int(trainer.global_step)
        self.leg["train_s"] += dt
        if (
            self._step_before is not None
            and self.leg["from_step"] is not None
            and self._step_before - self.leg["from_step"] >= self._warmup
        ):
            self.leg["steady_images"] += n
            self.leg["steady_s"] += dt
        self._t = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._t = None

    def state_dict(self) -> dict:
        return {
            "totals": self._totals(clock()),
            "legs": [*self.earlier_legs, self._leg_record()],
            "knn_top1_init": self.knn_top1_init,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        totals = state_dict.get("totals") or {}
        self._earlier = {k: type(v)(totals.get(k, v)) for k, v in self._earlier.items()}
        self.earlier_legs = list(state_dict.get("legs") or [])
        if self.knn_top1_init is None:
            self.knn_top1_init = state_dict.get("knn_top1_init")
        prev, legs = self._previous_results, self.earlier_legs
        if prev and legs and prev.get("steps") is not None and prev.get("steps") == legs[-1].get("to_step"):
            self.adopt_earlier(prev)

    # --------------------------------------------------------------------------------------------------- the record
    def adopt_earlier(self, results: dict) -> None:
        """Take earlier legs' ``wall_s`` and ``legs`` from a ``results.json`` of the same run at the step resumed from:
        it also holds their time after the last checkpoint (final evaluation)."""
        if isinstance(results.get("legs"), list) and results.get("wall_s") is not None:
            self._earlier["wall_s"] = float(results["wall_s"])
            self.earlier_legs = list(results["legs"])

    def finish(self, to_step: int) -> None:
        """Close this leg (its wall time ends now): call after the final evaluation, before writing results."""
        self._wall_end = clock()
        self.leg["to_step"] = int(to_step)
        if self.leg["from_step"] is None:  # nothing was left to train: fit returned before its training loop
            self.leg["from_step"] = int(to_step)

    def _leg_record(self) -> dict:
        now = clock() if self._wall_end is None else self._wall_end
        rec = {k: v for k, v in self.leg.items() if k not in ("steady_images", "steady_s")}
        rec["wall_s"] = round(now - self._t_leg, 3)
        rec["train_s"] = round(self.leg["train_s"], 3)
        return rec

    def _totals(self, now: float) -> dict:
        t = dict(self._earlier)
        for k in ("images_seen", "train_s", "steady_images", "steady_s"):
            t[k] += self.leg[k]
        t["wall_s"] += (now if self._wall_end is None else self._wall_end) - self._t_leg
        return t

    @property
    def images_seen(self) -> int:
        return int(self._totals(clock())["images_seen"])

    @property
    def train_s(self) -> float:
        return self._totals(clock())["train_s"]

    @property
    def wall_s(self) -> float:
        return self._totals(clock())["wall_s"]

    @property
    def images_per_s(self) -> float:
        t = self._totals(clock())
        return t["images_seen"] / t["train_s"] if t["train_s"] > 0 else 0.0

    @property
    def images_per_s_steady(self) -> float | None:
        t = self._totals(clock())
        return t["steady_images"] / t["steady_s"] if t["steady_s"] > 0 else None

    @property
    def legs(self) -> list[dict]:
        return [*self.earlier_legs, self._leg_record()]

    @property
    def leg_number(self) -> int:
        """This leg's place in ``legs`` (1-based; the ``leg`` column of ``metrics.csv``): one more than the legs
        recorded in the checkpoint resumed from (give its state to :meth:`load_state_dict` first). A resumed leg is at
        least leg 2, even from a checkpoint that recorded none."""
        n = len(self.earlier_legs) + 1
        return max(n, 2) if self.leg["resumed_from"] is not None else n


#: the column of ``metrics.csv`` naming the leg that logged each row (its 1-based place in results.json's ``legs``)
LEG_COLUMN = "leg"


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``, but one ``metrics.csv`` per run across resumes, each row marked with its leg.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts (and rewrites the header from the keys of
    its own first rows); here a resumed leg appends to the run's file under the header it has, adding columns only
    when new keys appear (the file is then rewritten atomically). Every row carries ``leg`` (:data:`LEG_COLUMN`): the
    number of the leg that logged it, set by ``run_pretraining`` (:attr:`ThroughputTimer.leg_number`; 1 by default).
    What the previous leg logged after the checkpoint being resumed is dropped first unless it is that leg's
    end-of-run record (:func:`trim_metrics_csv`, called by ``run_pretraining``), so the steps continue without going
    back.
    """

    def __init__(self, *args, leg: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.leg = int(leg)

    @property
    @rank_zero_experiment
    def experiment(self) -> "_AppendingExperimentWriter":
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({**metrics, LEG_COLUMN: self.leg}, step)


class _AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv; keep it and continue its header
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), None)
            self.metrics_keys = list(header or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:  # Lightning's truncates the file in place
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_write(Path(self.metrics_file_path), newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


def trim_metrics_csv(path: Path, before_step: int, results: dict | None = None) -> int:
    """Make ``path`` (a run's ``metrics.csv``) continue from the checkpoint a resume starts from, ``before_step``
    (S) optimizer steps done: drop what the resumed leg logs again, keep what only an earlier leg measured.

    ``results`` is the run's ``results.json`` (:func:`read_results`): written when a leg finishes, so it says whether
    the leg that wrote checkpoint S finished there (``steps == S``; that leg is the last of its ``legs``) or was
    interrupted after it. The rule, per row:

    * ``step < S``: kept, it is work the checkpoint holds. This includes a finished leg's results and throughput
      rows (``final/*``, ``throughput/*``), which are logged at step S - 1, the step of the last batch's rows.
    * ``step >= S`` and ``leg`` is the leg that finished at S: kept. These are that leg's end-of-run record, its final
      evaluation (``val/*`` of the evaluation after ``fit``, which Lightning logs at step S), not redone work.
    * ``step >= S`` otherwise: dropped. It is work after the checkpoint -- of a leg interrupted before its next
      checkpoint, or of a leg that went on past S when a resume starts from an earlier checkpoint -- and the
      resumed leg trains and logs those steps again.
    * a row without ``leg`` (a file written before the column existed) counts as the finished leg's end-of-run row
      when it is at step S, holds no training metric (``train/*``) and comes before any row of a step above S or
      training row at S or later (a later leg's work starts with them).

    Afterwards each step's training rows appear once. An evaluation or summary at one step may appear once per leg
    that made it (a finished run resumed with nothing left to train evaluates again at its last step): ``leg`` tells
    them apart; a reader wanting one value per step takes the row of the highest leg, the latest measurement (as
    ``tools/compare.py`` does for its curves). Prints what was kept and what was dropped and by which leg, saying
    whether that leg finished or was interrupted. Rewritten atomically; returns the number of rows dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields or "step" not in fields:
        return 0
    s = int(before_step)
    results = results if isinstance(results, dict) else {}
    finished_at = results.get("steps") if isinstance(results.get("steps"), int) else None
    legs = results.get("legs")
    finished_leg = str(len(legs)) if isinstance(legs, list) and legs else None

    def step_of(row: dict) -> int | None:
        return None if row.get("step") in (None, "") else int(float(row["step"]))

    def trains(row: dict) -> bool:
        return any(v not in (None, "") for k, v in row.items() if k and k.startswith("train/"))

    keep, dropped, kept_end, later_work = [], [], [], False
    for row in rows:
        step, leg = step_of(row), (row.get(LEG_COLUMN) or "").strip()
        if step is None or step < s:
            keep.append(row)
            continue
        if leg and finished_leg:
            end_row = finished_at == s and leg == finished_leg
        else:  # a file without the leg column: the finished leg's end rows come before any later work
            later_work = later_work or step > s or trains(row)
            end_row = finished_at == s and not later_work
        (kept_end if end_row else dropped).append(row)
        if end_row:
            keep.append(row)
    if kept_end:
        who = f"leg {finished_leg}" if finished_leg else "the leg"
        print(
            f"[ssl_vision] {path}: kept {len(kept_end)} end-of-run row{'s' if len(kept_end) != 1 else ''} (final "
            f"evaluation) of {who}, which finished at step {s}"
        )
    if not dropped:
        return 0
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    by_leg: dict[str, int] = {}
    for row in dropped:
        leg = (row.get(LEG_COLUMN) or "").strip()
        by_leg[leg] = by_leg.get(leg, 0) + 1
    for leg, n in by_leg.items():
        went_on = finished_at is not None and finished_at > s and (leg == finished_leg or not leg)
        who = f"leg {leg}, which" if leg else "the leg that"
        how = f"finished at step {finished_at}" if went_on else "was interrupted"
        print(
            f"[ssl_vision] {path}: dropped {n} row{'s' if n != 1 else ''} logged after step {s - 1} by {who} {how} "
            f"(the checkpoint resumed is of step {s}); the resumed leg logs those steps again"
        )
    return len(dropped)


def adopt_leg_dir(leg_dir: Path, run_dir: Path) -> Path | None:
    """A resumed leg's own Hydra output directory (``.hydra/`` with its config and overrides, its log file) is moved
    into ``<run_dir>/resumes/<its name>/``, so the run directory holds the record of every leg and no near-empty
    timestamped directory is left beside it. Entries already there are merged (a second call moves what appeared
    since, e.g. DDP processes' logs). Returns the new place, or None when there is nothing to move."""
    leg_dir, run_dir = Path(leg_dir), Path(run_dir)
    if not leg_dir.is_dir() or leg_dir.resolve() == run_dir.resolve():
        return None
    dest = run_dir / "resumes" / leg_dir.name
    try:
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(leg_dir, dest)
            return dest
        for entry in list(leg_dir.iterdir()):
            target, n = dest / entry.name, 1
            while target.exists():
                target, n = dest / f"{entry.name}.{n}", n + 1
            os.rename(entry, target)
        leg_dir.rmdir()
    except OSError as exc:  # another file system (EXDEV), permissions: leave it where it is
        print(f"[ssl_vision] could not move this leg's output directory {leg_dir} into {dest} ({exc}); it stays")
        return None
    return dest


@contextlib.contextmanager
def atomic_write(path: Path, **open_kwargs):
    """Open a temporary file beside ``path`` for writing text; on success it is flushed, fsync'ed and renamed onto
    ``path``, on any error removed: a crash never leaves a half-written file, and the previous one stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves a half-written file."""
    with atomic_write(path) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def mtime_stamp(path: Path) -> str:
    """``path``'s modification time as ``YYYYmmdd-HHMMSS`` (local time), the stamp of kept files."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(Path(path).stat().st_mtime))


def keep_previous(path: Path, stamp: str | None = None) -> Path | None:
    """Rename an existing ``path`` to ``<stem>.<stamp><ext>`` (``stamp``: its mtime unless given, e.g. to keep a
    pair of files under one name; ``-1``, ``-2``... when that name is taken, e.g. several runs within one second),
    so nothing is overwritten; returns the new name, or None if nothing was there.
    ``last.knn.json`` -> ``last.knn.20250101-120000.json``."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = stamp or mtime_stamp(path)
    kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    os.replace(path, kept)
    print(f"[ssl_vision] {path} existed; kept the previous one as {kept.name}")
    return kept


def read_results(run_dir: Path) -> dict | None:
    """The run's ``results.json`` as a dict, or None when there is none (or it cannot be read: noted)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"[ssl_vision] cannot read {path} ({exc}); its numbers are not carried over")
        return None
    return data if isinstance(data, dict) else None


def write_results(run_dir: Path, results: dict) -> Path:
    """Write ``run_dir/results.json``; an existing one is kept as ``results.<mtime>.json``, never overwritten."""
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise KeyError(f"results lack the documented keys {missing}")
    path = Path(run_dir) / "results.json"
    keep_previous(path)
    write_json_atomic(path, results)
    return path
