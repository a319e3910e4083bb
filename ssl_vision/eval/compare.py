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
the table. Evaluations that are missing can be run through the ``evaluate_knn`` / ``evaluate_linear`` callables
(tools/compare.py passes the kNN and linear-probe tools); they write their JSON beside the checkpoint, which is
then read like any other. All outputs are written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import dataclasses
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

__all__ = ["COLUMNS", "Run", "find_runs", "load_run", "read_metrics", "build_rows", "format_cell",
           "render_markdown", "render_csv", "plot_accuracy", "plot_curves", "compare"]

#: (header, row key, Markdown format) of the table, in order
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "s"), ("backbone", "backbone", "s"), ("data", "data", "s"), ("epochs", "epochs", "d"),
    ("steps", "steps", "d"), ("images/s", "images_per_s", ".1f"), ("wall s", "wall_s", ".1f"),
    ("kNN top-1", "knn_top1", ".2f"), ("kNN init", "knn_top1_init", ".2f"), ("linear top-1", "linear_top1", ".2f"),
    ("online probe top-1", "probe_top1", ".2f"), ("run dir", "run_dir", "s"),
)
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
        """``(k, T)`` of the run's online kNN, from its Hydra config (``(None, None)`` without one)."""
        ev = (self.config or {}).get("eval") or {}
        ks = ev.get("knn_k") or [None]
        return ks[0], ev.get("knn_temperature")


# ----------------------------------------------------------------------------------------------- discovery
def _natural(path: Path) -> list:
    """Sort key that puts job 10 after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory at or below ``paths`` holding a ``results.json`` (deduplicated, natural order)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_file():
            p = p.parent
        found.update(r.parent.resolve() for r in p.rglob("results.json"))
    return sorted(found, key=_natural)


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
    cfg_path = run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False) if cfg_path.is_file() else None
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
    """``{"loss": [(step, value)], "knn": [(step, value)], "epochs": int | None}`` from a CSV-logger file."""
    out: dict[str, Any] = {"loss": [], "knn": [], "epochs": None}
    if path is None:
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _float(row.get("step"))
            if step is None:
                continue
            loss, knn, epoch = _float(row.get("train/loss")), _float(row.get("val/knn_top1")), _float(row.get("epoch"))
            if loss is not None:
                out["loss"].append((int(step), loss))
                if epoch is not None:
                    out["epochs"] = max(out["epochs"] or 0, int(epoch) + 1)
            if knn is not None:
                out["knn"].append((int(step), knn))
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


def _linear_from(payload: dict | None, data: str | None):
    if payload is None or payload.get("top1") is None:
        return None, None
    if data is not None and payload.get("data") != data:
        return None, f"linear.json is on {payload.get('data')!r}, not {data!r}"
    spec = payload.get("spec") or {}
    return float(payload["top1"]), f"linear probe {payload.get('protocol')}, {spec.get('epochs')} epochs"


def _offline(run: Run, evaluate_knn: KnnRunner | None, evaluate_linear: LinearRunner | None,
             knn_protocol: tuple[int | None, float | None]) -> tuple[dict, list[str]]:
    """Fill the kNN (if the run has none) and the linear top-1 from the files beside the checkpoint, running
    the evaluations first where asked for and still missing. Returns (values, notes)."""
    values, notes, data = {}, [], run.results.get("data")
    if run.checkpoint is None:
        return values, (["no checkpoint found"] if evaluate_knn or evaluate_linear else [])
    k, temperature = knn_protocol
    if run.results.get("knn_top1") is None:
        top1, note = _knn_from(_read_json(beside(run.checkpoint, ".knn.json")), k, temperature, data)
        if top1 is None and evaluate_knn is not None:
            top1, note = _knn_from(evaluate_knn(run.checkpoint, k, temperature), k, temperature, data)
        values["knn_top1"] = top1
        if note:
            notes.append(f"kNN top-1: {note}" + ("" if top1 is not None else " (not used)"))
    top1, note = _linear_from(_read_json(beside(run.checkpoint, ".linear.json")), data)
    if top1 is None and evaluate_linear is not None:
        top1, note = _linear_from(evaluate_linear(run.checkpoint), data)
    values["linear_top1"] = top1
    if note:
        notes.append(f"linear top-1: {note}" + ("" if top1 is not None else " (not used)"))
    return values, notes


# ----------------------------------------------------------------------------------------------------- table
def build_rows(runs: Sequence[Run], out_dir: Path, evaluate_knn: KnnRunner | None = None,
               evaluate_linear: LinearRunner | None = None, knn_k: int | None = None,
               knn_temperature: float | None = None) -> tuple[list[dict], dict[str, list[str]]]:
    """One row per run (keys of :data:`COLUMNS`, ``None`` where missing) and ``{run dir: notes}``.

    ``run_dir`` is relative to ``out_dir`` (so the Markdown's links work from there). ``knn_k`` /
    ``knn_temperature`` replace the run's own kNN protocol for the offline numbers.
    """
    rows, notes = [], {}
    for run in runs:
        r = run.results
        row = {key: r.get(key) for key in ("method", "backbone", "data", "steps", "images_per_s", "wall_s",
                                           "knn_top1", "knn_top1_init", "probe_top1")}
        row["epochs"] = read_metrics(run.metrics_csv)["epochs"]
        row["run_dir"] = os.path.relpath(run.run_dir, out_dir)
        run_k, run_t = run.knn_protocol
        protocol = (knn_k if knn_k is not None else run_k, knn_temperature if knn_temperature is not None else run_t)
        filled, run_notes = _offline(run, evaluate_knn, evaluate_linear, protocol)
        row.update({k: v for k, v in filled.items() if v is not None})
        row.setdefault("linear_top1", None)
        if run.metrics_csv is None:
            run_notes.append("no metrics.csv: no curves, epochs unknown")
        if run_notes:
            notes[row["run_dir"]] = run_notes
        rows.append(row)
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


def render_markdown(rows: Sequence[dict], notes: dict[str, list[str]], sources: Sequence[str],
                    figures: Sequence[str] = ("accuracy.png", "curves.png")) -> str:
    head = [c[0] for c in COLUMNS]
    lines = [f"# Comparison of {len(rows)} run{'s' * (len(rows) != 1)}", "",
             f"From {', '.join(f'`{s}`' for s in sources)}. kNN top-1: the run's last online kNN (its own k, T) "
             f"unless noted; linear top-1: tools/linear_probe.py; online probe: the linear head trained during "
             f"pretraining on detached features; `{MISSING}`: not available.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
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
def _labels(rows: Sequence[dict]) -> list[str]:
    """``method/backbone``, with ``#2``... appended where several runs share one."""
    base = [f"{r.get('method')}/{r.get('backbone')}" for r in rows]
    seen: dict[str, int] = {}
    out = []
    for b in base:
        seen[b] = seen.get(b, 0) + 1
        out.append(b if base.count(b) == 1 else f"{b} #{seen[b]}")
    return out


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_accuracy(rows: Sequence[dict], path: Path) -> None:
    """Grouped bars per run: kNN, linear and online-probe top-1; a missing value is a ``–`` at the base."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend choice

    series = (("kNN", "knn_top1"), ("linear", "linear_top1"), ("online probe", "probe_top1"))
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (name, key) in enumerate(series):
        for i, row in enumerate(rows):
            x, v = i + (j - 1) * width, row.get(key)
            if v is None:
                ax.text(x, 1, MISSING, ha="center", va="bottom", fontsize=8, color=f"C{j}")
                continue
            ax.bar(x, v, width, color=f"C{j}", label=name if not any(
                r.get(key) is not None for r in rows[:i]) else None)
            ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), _labels(rows), rotation=20, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy per run")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_curves(curves: Sequence[tuple[str, dict]], path: Path) -> None:
    """Train loss over steps (left) and online kNN top-1 over steps (right), one line per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (label, m) in enumerate(curves):
        if m["loss"]:
            left.plot(*zip(*m["loss"]), color=f"C{i % 10}", label=label, linewidth=1)
        if m["knn"]:
            right.plot(*zip(*m["knn"]), color=f"C{i % 10}", label=label, marker="o", markersize=3)
    for ax, title, ylabel in ((left, "train loss", "loss"), (right, "online kNN", "top-1 (%)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def compare(paths: Sequence[str | Path], out_dir: str | Path, evaluate_knn: KnnRunner | None = None,
            evaluate_linear: LinearRunner | None = None, knn_k: int | None = None,
            knn_temperature: float | None = None) -> dict[str, Any]:
    """Find the runs under ``paths``, write ``comparison.md``, ``comparison.csv``, ``accuracy.png`` and
    ``curves.png`` into ``out_dir``; returns ``{"rows", "notes", "curves", "files"}`` (curves: ``[(label,
    {"loss": [(step, v)], "knn": [(step, v)], "epochs"})]`` as plotted)."""
    out_dir = Path(out_dir)
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    rows, notes = build_rows(runs, out_dir.resolve(), evaluate_knn, evaluate_linear, knn_k, knn_temperature)
    curves = list(zip(_labels(rows), (read_metrics(r.metrics_csv) for r in runs)))
    files = {name: out_dir / name for name in ("comparison.md", "comparison.csv", "accuracy.png", "curves.png")}
    _write_text(files["comparison.md"], render_markdown(rows, notes, [str(p) for p in paths]))
    _write_text(files["comparison.csv"], render_csv(rows))
    plot_accuracy(rows, files["accuracy.png"])
    plot_curves(curves, files["curves.png"])
    return {"rows": rows, "notes": notes, "curves": curves, "files": {k: str(v) for k, v in files.items()}}
