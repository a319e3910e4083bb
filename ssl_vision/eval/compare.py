"""Compare pretraining runs: one table (Markdown + CSV) and two figures from the files the runs left behind.

A run is any directory holding ``results.json`` (written by :func:`ssl_vision.launch.run_pretraining`); a Hydra
multirun directory is searched recursively. Per run this reads

* ``results.json`` -- method, backbone, data, steps, images/s, wall s, the online kNN (``knn_top1``, the last
  validation), ``knn_top1_init`` and the online probe (``probe_top1``);
* ``.hydra/config.yaml`` -- the kNN protocol of the run (``eval.knn_k[0]``, ``eval.knn_temperature``);
* the CSV logger's ``metrics.csv`` (``logs/metrics.csv`` with ``conf/logger/csv.yaml``) -- ``train/loss`` per
  logged step and ``val/knn_top1`` per validation, and the epochs reached (last logged ``epoch`` + 1);
* beside the checkpoint, what the offline tools wrote: ``<stem>.knn.json`` (tools/knn_eval.py) fills a missing
  online kNN when it used the run's k and T on the run's data, ``<stem>.linear.json`` (tools/linear_probe.py)
  gives the linear top-1.

Missing numbers stay missing (``–`` in the Markdown, an empty CSV cell); where a number came from is listed under
the table. A sweep job that left no ``results.json`` (a directory with Hydra's ``.hydra/`` but no results: the job
failed or was stopped; or one whose run still holds its ``.lock``: running), or one whose ``results.json`` cannot be
read, is a row of its own with ``status`` ``failed`` / ``running`` and the reason under the table, never dropped.

The figures keep apart what is not comparable:

* ``accuracy.png`` -- one bar series per (metric, protocol): kNN numbers with another k, T, bank or source (the
  run's online kNN vs. tools/knn_eval.py) are separate series with their own legend entry, as are linear probes of
  different protocols / epochs; the random-init kNN (``knn_top1_init``) is drawn on each run's bars as a black tick.
* ``curves.png`` -- one panel of training loss per objective (losses of different objectives are not on one scale)
  and one panel of online kNN per kNN protocol. The x-axis is optimizer steps when every run takes the same number
  of images per step, otherwise images seen (steps × images per step, from ``results.json``).
* labels -- ``method/backbone`` (``/data`` when the data sets differ); runs that share one are told apart by the
  config keys whose values differ between them (``method.kwargs.temperature=0.2``), or by their run directory's
  name when the configs do not say.

Evaluations that are missing can be run through the ``evaluate_knn`` / ``evaluate_linear`` callables
(tools/compare.py passes the kNN and linear-probe tools); they write their JSON beside the checkpoint, which is
then read like any other. All outputs are written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssl_vision.eval.checkpoints import beside

__all__ = [
    "COLUMNS",
    "Run",
    "FailedRun",
    "find_runs",
    "find_failed",
    "load_run",
    "read_metrics",
    "build_rows",
    "failed_rows",
    "format_cell",
    "render_markdown",
    "render_csv",
    "run_labels",
    "accuracy_series",
    "curve_panels",
    "accuracy_figure",
    "curves_figure",
    "plot_accuracy",
    "plot_curves",
    "compare",
]

#: (header, row key, Markdown format) of the table, in order
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("label", "label", "s"),
    ("status", "status", "s"),
    ("method", "method", "s"),
    ("backbone", "backbone", "s"),
    ("data", "data", "s"),
    ("epochs", "epochs", "d"),
    ("steps", "steps", "d"),
    ("images/s", "images_per_s", ".1f"),
    ("wall s", "wall_s", ".1f"),
    ("kNN top-1", "knn_top1", ".2f"),
    ("kNN init", "knn_top1_init", ".2f"),
    ("kNN protocol", "knn_protocol", "s"),
    ("linear top-1", "linear_top1", ".2f"),
    ("linear protocol", "linear_protocol", "s"),
    ("online probe top-1", "probe_top1", ".2f"),
    ("run dir", "run_dir", "s"),
)
#: config keys that never tell two recipes apart (where the run went, how it was started)
_LABEL_IGNORE = ("hydra", "paths", "resume")
MISSING = "–"
KnnRunner = Callable[[Path, "int | None", "float | None"], dict]
LinearRunner = Callable[[Path], dict]


@dataclasses.dataclass
class Run:
    """What one run directory holds (paths absolute; ``None`` where a file is absent)."""

    run_dir: Path
    results: dict[str, Any]
    config: dict[str, Any] | None
    metrics_csv: Path | None
    checkpoint: Path | None

    @property
    def knn_protocol(self) -> tuple[int | None, float | None]:
        """``(k, T)`` of the run's online kNN: results.json's ``knn_protocol`` record, else its Hydra config
        (``(None, None)`` without either)."""
        rec = self.results.get("knn_protocol")
        if isinstance(rec, dict) and rec.get("k") is not None:
            return rec.get("k"), rec.get("temperature")
        ev = (self.config or {}).get("eval") or {}
        ks = ev.get("knn_k") or [None]
        return ks[0], ev.get("knn_temperature")

    @property
    def knn_bank(self) -> int | None:
        """Train images in the online kNN bank: results.json's ``knn_protocol.bank_size``, else the config's
        ``data.knn_train_subset`` when set; None when neither says."""
        rec = self.results.get("knn_protocol")
        if isinstance(rec, dict) and isinstance(rec.get("bank_size"), int):
            return rec["bank_size"]
        bank = ((self.config or {}).get("data") or {}).get("knn_train_subset")
        return bank if isinstance(bank, int) and not isinstance(bank, bool) else None

    @property
    def images_per_step(self) -> float | None:
        """Images per optimizer step over all processes (``images_seen / steps`` of results.json)."""
        seen, steps = self.results.get("images_seen"), self.results.get("steps")
        if isinstance(seen, (int, float)) and isinstance(steps, (int, float)) and steps > 0 and seen > 0:
            return seen / steps
        return None


@dataclasses.dataclass
class FailedRun:
    """A sweep job directory without usable results: ``status`` ``failed`` or ``running``, and why."""

    run_dir: Path
    status: str
    reason: str
    config: dict[str, Any] | None


# ----------------------------------------------------------------------------------------------- discovery
def _natural(path: Path) -> list:
    """Sort key that puts job 10 after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory at or below ``paths`` holding a ``results.json`` (deduplicated, natural order)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(
                f"{p} does not exist (give a sweep directory such as outputs/multirun/<time>, "
                f"run directories, or any folder above them)"
            )
        if p.is_file():
            p = p.parent
        found.update(r.parent.resolve() for r in p.rglob("results.json"))
    return sorted(found, key=_natural)


def _lock_held(run_dir: Path) -> bool:
    """Whether a live process holds ``<run_dir>/.lock`` (the run's POSIX lock; see ssl_vision/run_lock.py). Read
    only: a shared lock is asked for and given back at once, the file is not written."""
    path = run_dir / ".lock"
    if not path.is_file():
        return False
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        os.close(fd)


def _load_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / ".hydra" / "config.yaml"
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None
    except Exception:  # noqa: BLE001 - a damaged config (any YAML / OmegaConf error): the run is still listed
        return None


def find_failed(paths: Iterable[str | Path], run_dirs: Iterable[Path] = ()) -> list[FailedRun]:
    """Sweep jobs at or below ``paths`` that left no usable results: a directory with Hydra's ``.hydra/config.yaml``
    and no ``results.json`` (``failed``, or ``running`` while its run holds ``.lock``), outside every run directory
    in ``run_dirs`` (a resumed run keeps its legs' ``.hydra/`` under ``resumes/``); and every run directory in
    ``run_dirs`` whose ``results.json`` is not a JSON object or records an ``error``."""
    run_dirs = [Path(d).resolve() for d in run_dirs]
    out: dict[Path, FailedRun] = {}
    for p in map(Path, paths):
        p = p.parent if p.is_file() else p
        if not p.is_dir():
            continue
        for cfg in p.rglob(".hydra/config.yaml"):
            job = cfg.parent.parent.resolve()
            if (job / "results.json").exists() or any(job == d or d in job.parents for d in run_dirs):
                continue
            if _lock_held(job):
                out[job] = FailedRun(
                    job, "running", "no results.json yet: its run holds .lock (still running)", _load_config(job)
                )
            else:
                out[job] = FailedRun(
                    job,
                    "failed",
                    "no results.json: the job failed or was stopped before the end (see its log)",
                    _load_config(job),
                )
    for d in run_dirs:
        try:
            results = json.loads((d / "results.json").read_text())
        except (OSError, ValueError) as exc:
            out[d] = FailedRun(
                d, "failed", f"results.json cannot be read ({type(exc).__name__}: {exc})", _load_config(d)
            )
            continue
        if not isinstance(results, dict):
            out[d] = FailedRun(
                d, "failed", f"results.json holds a {type(results).__name__}, not an object", _load_config(d)
            )
        elif results.get("error"):
            out[d] = FailedRun(d, "failed", f"error: {results['error']}", _load_config(d))
    return sorted(out.values(), key=lambda f: _natural(f.run_dir))


def _checkpoint(run_dir: Path, results: dict) -> Path | None:
    """The checkpoint results.json names, looked for first in this run directory's ``checkpoints/`` (so a
    moved or copied run uses its own files), then at the stored path, then ``checkpoints/last.ckpt``."""
    named = results.get("checkpoint")
    cands = [run_dir / "checkpoints" / Path(named).name, Path(named)] if named else []
    for cand in [*cands, run_dir / "checkpoints" / "last.ckpt"]:
        if cand.is_file():
            return cand
    return None


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir).resolve()
    results = json.loads((run_dir / "results.json").read_text())
    config = _load_config(run_dir)
    metrics = run_dir / "logs" / "metrics.csv"
    if not metrics.is_file():
        metrics = next(iter(sorted(run_dir.rglob("metrics.csv"))), None)
    return Run(run_dir, results, config, metrics, _checkpoint(run_dir, results))


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_metrics(path: Path | None) -> dict[str, list]:
    """``{"loss": [(step, value)], "knn": [(step, value)], "epochs": int | None}`` from a CSV-logger file, in step
    order, one value per step: a step several legs of a resumed run logged (a finished run resumed and evaluated
    again at its last step) takes the later row, the latest measurement (see ``run_record.trim_metrics_csv``)."""
    out: dict[str, Any] = {"loss": [], "knn": [], "epochs": None}
    if path is None:
        return out
    losses: dict[int, float] = {}
    knns: dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _float(row.get("step"))
            if step is None:
                continue
            loss, knn, epoch = _float(row.get("train/loss")), _float(row.get("val/knn_top1")), _float(row.get("epoch"))
            if loss is not None:
                losses[int(step)] = loss
                if epoch is not None:
                    out["epochs"] = max(out["epochs"] or 0, int(epoch) + 1)
            if knn is not None:
                knns[int(step)] = knn
    out["loss"], out["knn"] = sorted(losses.items()), sorted(knns.items())
    return out


# ------------------------------------------------------------------------------------------ offline numbers
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _knn_from(payload: dict | None, k: int | None, temperature: float | None, data: str | None):
    """``(top1, note)`` from a knn.json that used protocol (k, T) on ``data``; ``(None, why)`` otherwise."""
    if payload is None:
        return None, None
    if data is not None and payload.get("data") != data:
        return None, f"knn.json is on {payload.get('data')!r}, not {data!r}"
    if temperature is not None and not math.isclose(float(payload.get("temperature", math.nan)), temperature):
        return None, f"knn.json used T={payload.get('temperature')}, the run T={temperature}"
    key = str(k if k is not None else (payload.get("ks") or [None])[0])
    top1 = ((payload.get("knn") or {}).get(key) or {}).get("top1")
    if top1 is None:
        return None, f"knn.json has no k={key}"
    return float(top1), f"offline kNN k={key} T={payload.get('temperature')}"


def knn_protocol_label(k: Any, temperature: Any, bank: Any = None, source: str = "online") -> str:
    """How a kNN number was measured, e.g. ``k=200 T=0.1, online`` or ``k=20 T=0.07 bank 10000, offline``."""
    if k is None and temperature is None:
        text = "k, T unknown"
    else:
        text = f"k={k} T={temperature:g}" if isinstance(temperature, (int, float)) else f"k={k} T={temperature}"
    if bank is not None:
        text += f" bank {bank}"
    return f"{text}, {source}"


def _offline_knn_protocol(payload: dict, k: int | None) -> str:
    key = k if k is not None else (payload.get("ks") or [None])[0]
    bank = (payload.get("knn_protocol") or {}).get("bank_size") or payload.get("train_samples")
    return knn_protocol_label(key, payload.get("temperature"), bank, "offline")


def _linear_protocol(payload: dict) -> str:
    spec = payload.get("spec") or {}
    return f"{payload.get('protocol')}, {spec.get('epochs')} ep"


def _linear_from(payload: dict | None, data: str | None):
    if payload is None or payload.get("top1") is None:
        return None, None
    if data is not None and payload.get("data") != data:
        return None, f"linear.json is on {payload.get('data')!r}, not {data!r}"
    spec = payload.get("spec") or {}
    return float(payload["top1"]), f"linear probe {payload.get('protocol')}, {spec.get('epochs')} epochs"


def _offline(
    run: Run,
    evaluate_knn: KnnRunner | None,
    evaluate_linear: LinearRunner | None,
    knn_protocol: tuple[int | None, float | None],
) -> tuple[dict, list[str]]:
    """Fill the kNN (if the run has none) and the linear top-1 from the files beside the checkpoint, running
    the evaluations first where asked for and still missing. Returns (values, notes)."""
    values, notes, data = {}, [], run.results.get("data")
    if run.checkpoint is None:
        return values, (["no checkpoint found"] if evaluate_knn or evaluate_linear else [])
    k, temperature = knn_protocol
    if run.results.get("knn_top1") is None:
        payload = _read_json(beside(run.checkpoint, ".knn.json"))
        top1, note = _knn_from(payload, k, temperature, data)
        if top1 is None and evaluate_knn is not None:
            payload = evaluate_knn(run.checkpoint, k, temperature)
            top1, note = _knn_from(payload, k, temperature, data)
        values["knn_top1"] = top1
        if top1 is not None:
            values["knn_protocol"] = _offline_knn_protocol(payload, k)
        if note:
            notes.append(f"kNN top-1: {note}" + ("" if top1 is not None else " (not used)"))
    payload = _read_json(beside(run.checkpoint, ".linear.json"))
    top1, note = _linear_from(payload, data)
    if top1 is None and evaluate_linear is not None:
        payload = evaluate_linear(run.checkpoint)
        top1, note = _linear_from(payload, data)
    values["linear_top1"] = top1
    if top1 is not None:
        values["linear_protocol"] = _linear_protocol(payload)
    if note:
        notes.append(f"linear top-1: {note}" + ("" if top1 is not None else " (not used)"))
    return values, notes


# ----------------------------------------------------------------------------------------------------- table
def build_rows(
    runs: Sequence[Run],
    out_dir: Path,
    evaluate_knn: KnnRunner | None = None,
    evaluate_linear: LinearRunner | None = None,
    knn_k: int | None = None,
    knn_temperature: float | None = None,
) -> tuple[list[dict], dict[str, list[str]]]:
    """One row per run (keys of :data:`COLUMNS`, ``None`` where missing) and ``{run dir: notes}``.

    ``run_dir`` is relative to ``out_dir`` (so the Markdown's links work from there). ``knn_k`` /
    ``knn_temperature`` replace the run's own kNN protocol for the offline numbers.
    """
    rows, notes = [], {}
    for run in runs:
        r = run.results
        row = {
            key: r.get(key)
            for key in (
                "method",
                "backbone",
                "data",
                "steps",
                "images_per_s",
                "wall_s",
                "knn_top1",
                "knn_top1_init",
                "probe_top1",
            )
        }
        row["status"] = "ok"
        row["epochs"] = read_metrics(run.metrics_csv)["epochs"]
        row["run_dir"] = os.path.relpath(run.run_dir, out_dir)
        run_k, run_t = run.knn_protocol
        row["knn_protocol"] = (
            knn_protocol_label(run_k, run_t, run.knn_bank, "online") if row["knn_top1"] is not None else None
        )
        protocol = (knn_k if knn_k is not None else run_k, knn_temperature if knn_temperature is not None else run_t)
        filled, run_notes = _offline(run, evaluate_knn, evaluate_linear, protocol)
        row.update({k: v for k, v in filled.items() if v is not None})
        row.setdefault("linear_top1", None)
        row.setdefault("linear_protocol", None)
        if run.metrics_csv is None:
            run_notes.append("no metrics.csv: no curves, epochs unknown")
        if run_notes:
            notes[row["run_dir"]] = run_notes
        rows.append(row)
    return rows, notes


def failed_rows(failed: Sequence[FailedRun], out_dir: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """A row per failed / running job (method, backbone, data from its config where it has one; no numbers) and
    its reason as a note."""
    rows, notes = [], {}
    for f in failed:
        cfg = f.config or {}

        def name(group: str, cfg: dict = cfg) -> Any:
            node = cfg.get(group)
            return node.get("name") if isinstance(node, dict) else None

        row = {key: None for _, key, _ in COLUMNS}
        row.update(
            method=name("method"),
            backbone=name("backbone"),
            data=name("data"),
            status=f.status,
            run_dir=os.path.relpath(f.run_dir, out_dir),
        )
        rows.append(row)
        notes[row["run_dir"]] = [f"{f.status}: {f.reason}"]
    return rows, notes


def format_cell(value: Any, fmt: str) -> str:
    """``None`` / NaN -> ``–``; numbers with ``fmt`` (``d``: int, ``.2f`` ...), anything else as text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if fmt == "d":
        return str(int(value))
    if fmt == "s":
        return str(value).replace("|", r"\|")
    return format(float(value), fmt)


def render_markdown(
    rows: Sequence[dict],
    notes: dict[str, list[str]],
    sources: Sequence[str],
    figures: Sequence[str] = ("accuracy.png", "curves.png"),
) -> str:
    head = [c[0] for c in COLUMNS]
    unfinished = {st: sum(r.get("status") == st for r in rows) for st in ("failed", "running")}
    extra = ", ".join(f"{n} {st}" for st, n in unfinished.items() if n)
    lines = [
        f"# Comparison of {len(rows)} run{'s' * (len(rows) != 1)}" + (f" ({extra})" if extra else ""),
        "",
        f"From {', '.join(f'`{s}`' for s in sources)}. kNN top-1: the run's last online kNN (its own k, T) "
        f"unless noted, measured as the kNN protocol column says; kNN init: the same kNN at random init; "
        f"linear top-1: tools/linear_probe.py; online probe: the linear head trained during pretraining on "
        f"detached features; `{MISSING}`: not available; status `failed` / `running`: a job without "
        f"results (why: under the table).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key), fmt) for _, key, fmt in COLUMNS) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{d}`: " + "; ".join(n) for d, n in notes.items()]
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def render_csv(rows: Sequence[dict]) -> str:
    """The same columns, full precision, an empty cell where a value is missing."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c[0] for c in COLUMNS])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row[key] for _, key, _ in COLUMNS])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- figures
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of a nested config (lists kept whole, as their text)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(
    rows: Sequence[dict], configs: Sequence[dict[str, Any] | None], run_dirs: Sequence[str | Path], max_keys: int = 2
) -> list[str]:
    """One label per run that tells it from every other run in the comparison.

    ``method/backbone``, plus ``/data`` when the runs' data sets differ. Runs that share that base are told apart by
    the config keys whose values differ among them (``method.kwargs.temperature=0.2``; at most ``max_keys``, then
    ``+N``), ignoring where a run was written (``hydra``, ``paths``, ``resume``); where the configs are missing or
    say nothing different, by the run directory's name. A label that is still not unique gets ``#2``, ``#3``...
    """
    several_data = len({r.get("data") for r in rows}) > 1
    base = [f"{r.get('method')}/{r.get('backbone')}" + (f"/{r.get('data')}" if several_data else "") for r in rows]
    flat = [
        None if c is None else {k: v for k, v in _flatten(c).items() if k.split(".")[0] not in _LABEL_IGNORE}
        for c in configs
    ]
    labels = list(base)
    for b in set(base):
        idx = [i for i, x in enumerate(base) if x == b]
        if len(idx) < 2:
            continue
        known = [flat[i] for i in idx if flat[i] is not None]
        keys = sorted({k for f in known for k in f}) if len(known) == len(idx) else []
        differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in known}) > 1]
        for i in idx:
            if differing:
                parts = [f"{k}={_short(flat[i].get(k))}" for k in differing[:max_keys]]
                more = f" +{len(differing) - max_keys}" if len(differing) > max_keys else ""
                labels[i] = f"{b} " + ", ".join(parts) + more
            else:
                labels[i] = f"{b} {Path(run_dirs[i]).name}"
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if labels.count(lab) == 1 else f"{lab} #{seen[lab]}")
    return out


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


#: (metric name, value key, protocol key) of the accuracy figure's bar groups
ACCURACY_METRICS = (
    ("kNN", "knn_top1", "knn_protocol"),
    ("linear", "linear_top1", "linear_protocol"),
    ("online probe", "probe_top1", None),
)


def accuracy_series(rows: Sequence[dict]) -> list[dict]:
    """The bar series of ``accuracy.png``: one per (metric, protocol) present, in order, each
    ``{"name", "metric", "protocol", "values"}`` with ``values[i]`` the number of ``rows[i]`` measured that way
    (``None`` elsewhere). Numbers measured differently never share a series (nor a colour, nor a legend entry)."""
    series: list[dict] = []
    for metric, key, pkey in ACCURACY_METRICS:
        protocols: list[str | None] = []
        for r in rows:
            if r.get(key) is not None and (r.get(pkey) if pkey else None) not in protocols:
                protocols.append(r.get(pkey) if pkey else None)
        for proto in protocols:
            values = [
                r.get(key) if r.get(key) is not None and (r.get(pkey) if pkey else None) == proto else None
                for r in rows
            ]
            series.append(
                {
                    "name": metric if proto is None else f"{metric} ({proto})",
                    "metric": metric,
                    "protocol": proto,
                    "values": values,
                }
            )
    return series


def plot_accuracy(rows: Sequence[dict], path: Path, labels: Sequence[str] | None = None) -> list[dict]:
    """Write :func:`accuracy_figure` to ``path`` (PNG); returns the series drawn."""
    fig, series = accuracy_figure(rows, labels)
    _save(fig, path)
    return series


def accuracy_figure(rows: Sequence[dict], labels: Sequence[str] | None = None):
    """Grouped bars per run, one series per (metric, protocol) (:func:`accuracy_series`); the random-init kNN of
    each run as a black tick across its bars (``hlines``); a run without any number gets its status
    (``failed``...) or ``–`` at the base. Returns ``(figure, series)``."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend choice

    labels = list(labels) if labels is not None else [str(r.get("label") or r.get("run_dir")) for r in rows]
    series = accuracy_series(rows)
    n = max(1, len(series))
    fig = Figure(figsize=(max(6.5, 0.45 * n * len(rows) + 3), 4.6))
    ax = fig.add_subplot()
    width = 0.8 / n
    for j, s in enumerate(series):
        hatch = "//" if s["protocol"] and s["protocol"].endswith("offline") else None
        xs = [i + (j - (n - 1) / 2) * width for i, v in enumerate(s["values"]) if v is not None]
        vs = [v for v in s["values"] if v is not None]
        ax.bar(xs, vs, width, color=f"C{j % 10}", hatch=hatch, edgecolor="white" if hatch else None, label=s["name"])
        for x, v in zip(xs, vs):
            ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    init_drawn = False
    for i, r in enumerate(rows):
        has_any = any(s["values"][i] is not None for s in series)
        if not has_any:
            failed = r.get("status") not in (None, "ok")
            ax.text(
                i,
                1,
                r.get("status") if failed else MISSING,
                ha="center",
                va="bottom",
                fontsize=8,
                color="C3" if failed else "0.3",
                rotation=90 if failed else 0,
            )
        init = r.get("knn_top1_init")
        if init is not None:
            ax.hlines(
                init,
                i - 0.42,
                i + 0.42,
                colors="black",
                linewidth=2,
                label=None if init_drawn else "kNN at random init (the run's online k, T)",
            )
            ax.text(i + 0.43, init, f"{init:.1f}", ha="left", va="center", fontsize=6)
            init_drawn = True
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    for tick, r in zip(ax.get_xticklabels(), rows):
        if r.get("status") not in (None, "ok"):
            tick.set_color("C3")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy per run (one series per metric and protocol)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return fig, series


def curve_panels(
    curves: Sequence[tuple[str, dict]],
    methods: Sequence[str | None],
    images_per_step: Sequence[float | None],
    knn_protocols: Sequence[str | None],
) -> dict[str, Any]:
    """What ``curves.png`` draws: ``{"x": "step" | "images seen", "panels": [{"title", "kind", "lines": [(label,
    xs, ys)]}]}``: one ``loss`` panel per objective (their losses are on different scales) and one ``knn`` panel
    per kNN protocol. x is the optimizer step when every run takes the same number of images per step (or it is
    unknown for all), otherwise images seen: step × that run's images per step; a run whose images per step is
    unknown is then left out of the panels (named in ``"left_out"``)."""
    known = {round(v, 6) for v in images_per_step if v is not None}
    by_images = len(known) > 1
    panels: dict[tuple[str, str], dict] = {}
    left_out = []
    for (label, m), method, ips, proto in zip(curves, methods, images_per_step, knn_protocols):
        if by_images and ips is None:
            left_out.append(label)
            continue
        scale = ips if by_images else 1
        for kind, key, title in (
            ("loss", "loss", f"train loss: {method}"),
            ("knn", "knn", f"online kNN ({proto or 'k, T unknown'})"),
        ):
            if not m.get(key):
                continue
            panel = panels.setdefault((kind, title), {"title": title, "kind": kind, "lines": []})
            xs = [s * scale for s, _ in m[key]]
            panel["lines"].append((label, xs if by_images else [int(x) for x in xs], [v for _, v in m[key]]))
    ordered = sorted(panels.values(), key=lambda p: (p["kind"] != "loss", p["title"]))
    return {"x": "images seen" if by_images else "step", "panels": ordered, "left_out": left_out}


def plot_curves(spec: dict[str, Any], path: Path) -> None:
    """Write :func:`curves_figure` to ``path`` (PNG)."""
    _save(curves_figure(spec), path)


def curves_figure(spec: dict[str, Any]):
    """Small multiples from :func:`curve_panels`: each objective's loss and each kNN protocol on its own axes (in
    the order of ``spec["panels"]``); a run keeps its colour in every panel."""
    from matplotlib.figure import Figure

    panels = spec["panels"]
    colour: dict[str, str] = {}
    for p in panels:
        for label, _, _ in p["lines"]:
            colour.setdefault(label, f"C{len(colour) % 10}")
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(max(1, len(panels)))]
    if not panels:
        axes[0].text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=axes[0].transAxes)
    for ax, p in zip(axes, panels):
        for label, xs, ys in p["lines"]:
            style = {"marker": "o", "markersize": 3} if p["kind"] == "knn" else {"linewidth": 1}
            ax.plot(xs, ys, color=colour[label], label=label, **style)
        ax.set_title(p["title"], fontsize=9)
        ax.set_xlabel(spec["x"])
        ax.set_ylabel("loss" if p["kind"] == "loss" else "top-1 (%)")
        ax.legend(fontsize=6)
    if spec.get("left_out"):
        fig.suptitle("not drawn (images per step unknown): " + ", ".join(spec["left_out"]), fontsize=8)
    return fig


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def compare(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    evaluate_knn: KnnRunner | None = None,
    evaluate_linear: LinearRunner | None = None,
    knn_k: int | None = None,
    knn_temperature: float | None = None,
) -> dict[str, Any]:
    """Find the runs under ``paths``, write ``comparison.md``, ``comparison.csv``, ``accuracy.png`` and
    ``curves.png`` into ``out_dir``; returns ``{"rows", "notes", "curves", "series", "panels", "files"}``
    (curves: ``[(label, {"loss": [(step, v)], "knn": [(step, v)], "epochs"})]`` of the runs with results;
    series: :func:`accuracy_series`; panels: :func:`curve_panels`). Jobs without results are rows with
    ``status`` ``failed`` / ``running``. Raises FileNotFoundError when a path does not exist or nothing (no run,
    no job) is under them."""
    out_dir = Path(out_dir)
    run_dirs = find_runs(paths)
    failed = find_failed(paths, run_dirs)
    bad = {f.run_dir for f in failed}
    run_dirs = [d for d in run_dirs if d not in bad]
    if not run_dirs and not failed:
        raise FileNotFoundError(f"no results.json (and no sweep job) under {', '.join(map(str, paths))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    rows, notes = build_rows(runs, out_dir.resolve(), evaluate_knn, evaluate_linear, knn_k, knn_temperature)
    frows, fnotes = failed_rows(failed, out_dir.resolve())
    entries = sorted(
        [(r.run_dir, row, r.config) for r, row in zip(runs, rows)]
        + [(f.run_dir, row, f.config) for f, row in zip(failed, frows)],
        key=lambda e: _natural(e[0]),
    )
    all_rows = [row for _, row, _ in entries]
    for row, label in zip(all_rows, run_labels(all_rows, [c for _, _, c in entries], [d for d, _, _ in entries])):
        row["label"] = label
    notes = {**notes, **fnotes}
    curves = [(row["label"], read_metrics(r.metrics_csv)) for row, r in zip(rows, runs)]
    panels = curve_panels(
        curves,
        [r.results.get("method") for r in runs],
        [r.images_per_step for r in runs],
        [knn_protocol_label(*r.knn_protocol, r.knn_bank, "online") for r in runs],
    )
    files = {name: out_dir / name for name in ("comparison.md", "comparison.csv", "accuracy.png", "curves.png")}
    _write_text(files["comparison.md"], render_markdown(all_rows, notes, [str(p) for p in paths]))
    _write_text(files["comparison.csv"], render_csv(all_rows))
    series = plot_accuracy(all_rows, files["accuracy.png"], [r["label"] for r in all_rows])
    plot_curves(panels, files["curves.png"])
    return {
        "rows": all_rows,
        "notes": notes,
        "curves": curves,
        "series": series,
        "panels": panels,
        "files": {k: str(v) for k, v in files.items()},
    }
