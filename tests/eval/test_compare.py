"""tools/compare.py: the table, CSV and figures of a fake multirun written here, and ``--evaluate`` filling a missing
kNN from a real tiny checkpoint (checked against a brute-force kNN computed in the test)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.test_tools import brute_force_knn, load_tool, pretrained, reference_features  # noqa: F401

KNN_K, KNN_T = 20, 0.07
#: (job dir, results.json values, train losses per step, (step, kNN) per validation, steps per epoch)
FAKE = [
    (
        "0-simclr-resnet18-synthetic",
        dict(
            method="simclr",
            backbone="resnet18",
            data="synthetic",
            steps=6,
            images_seen=96,
            wall_s=12.345,
            images_per_s=7.777,
            train_loss=5.5,
            knn_top1=31.25,
            knn_top1_init=12.5,
            probe_top1=25.0,
        ),
        [6.3, 6.0, 5.9, 5.7, 5.6, 5.5],
        [(2, 25.0), (5, 31.25)],
        3,
    ),
    (
        "1-byol-resnet18-synthetic",
        dict(
            method="byol",
            backbone="resnet18",
            data="synthetic",
            steps=4,
            images_seen=64,
            wall_s=3.0,
            images_per_s=21.333,
            train_loss=3.9,
            knn_top1=18.75,
            knn_top1_init=None,
            probe_top1=6.25,
        ),
        [4.0, 3.95, 3.93, 3.9],
        [(3, 18.75)],
        4,
    ),
    (
        "2-mae-vit_tiny-synthetic",  # no kNN number; a knn.json with another temperature must not be used
        dict(
            method="mae",
            backbone="vit_tiny",
            data="synthetic",
            steps=8,
            images_seen=128,
            wall_s=40.0,
            images_per_s=3.2,
            train_loss=0.9,
            knn_top1=None,
            knn_top1_init=None,
            probe_top1=None,
        ),
        [1.2, 1.1, 1.05, 1.0, 0.98, 0.95, 0.92, 0.9],
        [],
        2,
    ),
]
LINEAR_TOP1 = 41.5  # a tools/linear_probe.py result beside run 1's checkpoint


def write_fake_multirun(root: Path) -> Path:
    sweep = root / "multirun" / "2025-01-01_12-00-00"
    for job, res, losses, knns, per_epoch in FAKE:
        d = sweep / job
        (d / "logs").mkdir(parents=True)
        (d / ".hydra").mkdir()
        (d / "checkpoints").mkdir()
        ckpt = d / "checkpoints" / "last.ckpt"
        ckpt.write_bytes(b"not loaded by compare")
        (d / "results.json").write_text(json.dumps({**res, "checkpoint": str(ckpt), "run_dir": str(d)}))
        (d / ".hydra" / "config.yaml").write_text(
            f"method:\n  name: {res['method']}\neval:\n  knn_k: [{KNN_K}, 200]\n  knn_temperature: {KNN_T}\n"
        )
        rows = ["epoch,step,train/loss,train/lr,val/knn_top1,val/probe_top1"]
        for step, loss in enumerate(losses):  # the CSV logger's layout: train rows, then a val row at its step
            rows.append(f"{step // per_epoch},{step},{loss},0.1,,")
            rows += [f"{step // per_epoch},{s},,,{v},25.0" for s, v in knns if s == step]
        (d / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "1-byol-resnet18-synthetic" / "checkpoints" / "last.linear.json").write_text(
        json.dumps({"data": "synthetic", "protocol": "sgd_cosine", "top1": LINEAR_TOP1, "spec": {"epochs": 90}})
    )
    (sweep / "2-mae-vit_tiny-synthetic" / "checkpoints" / "last.knn.json").write_text(
        json.dumps(
            {"data": "synthetic", "ks": [KNN_K], "temperature": 0.5, "knn": {str(KNN_K): {"top1": 99.0, "top5": 99.0}}}
        )
    )
    return sweep


def fmt(v, spec: str) -> str:
    return "–" if v is None else (str(int(v)) if spec == "d" else format(v, spec) if spec != "s" else str(v))


def expected_rows() -> list[dict]:
    rows = []
    for job, res, losses, _, per_epoch in FAKE:
        rows.append(
            {
                "label": f"{res['method']}/{res['backbone']}",
                "status": "ok",
                "method": res["method"],
                "backbone": res["backbone"],
                "data": res["data"],
                "epochs": (len(losses) - 1) // per_epoch + 1,
                "steps": res["steps"],
                "images/s": res["images_per_s"],
                "wall s": res["wall_s"],
                "kNN top-1": res["knn_top1"],
                "kNN init": res["knn_top1_init"],
                "kNN protocol": f"k={KNN_K} T={KNN_T}, online" if res["knn_top1"] is not None else None,
                "linear top-1": LINEAR_TOP1 if job.startswith("1-") else None,
                "linear protocol": "sgd_cosine, 90 ep" if job.startswith("1-") else None,
                "online probe top-1": res["probe_top1"],
                "run dir": job,
            }
        )
    return rows


FORMATS = {
    "epochs": "d",
    "steps": "d",
    "images/s": ".1f",
    "wall s": ".1f",
    "kNN top-1": ".2f",
    "kNN init": ".2f",
    "linear top-1": ".2f",
    "online probe top-1": ".2f",
}


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert set("".join(cells[1])) == {"-"}  # the separator row
    return cells[0], cells[2:]


def test_fake_multirun_table_csv_and_figures(tmp_path):
    sweep = write_fake_multirun(tmp_path)
    res = load_tool("compare").main([str(sweep)])
    exp = expected_rows()
    header, body = markdown_table((sweep / "comparison.md").read_text())
    assert header == list(exp[0])
    assert body == [[fmt(r[h], FORMATS.get(h, "s")) for h in header] for r in exp]
    assert body[2][header.index("kNN top-1")] == "–" and body[1][header.index("kNN init")] == "–"

    with open(sweep / "comparison.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [list(r) for r in got] == [header] * 3
    for g, e in zip(got, exp):
        for h in header:
            if e[h] is None:
                assert g[h] == "", (h, g[h])
            elif isinstance(e[h], (int, float)):
                assert float(g[h]) == pytest.approx(e[h], abs=0), h  # full precision, not the rounded text
            else:
                assert g[h] == e[h], h

    for name in ("accuracy.png", "curves.png"):
        with Image.open(sweep / name) as im:
            im.verify()
        with Image.open(sweep / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    # the curves plotted are exactly the logged ones
    for (label, curve), (job, values, losses, knns, _) in zip(res["curves"], FAKE):
        assert label == f"{values['method']}/{values['backbone']}"
        assert curve["loss"] == list(enumerate(losses)) and curve["knn"] == knns
    md = (sweep / "comparison.md").read_text()
    assert "linear probe sgd_cosine, 90 epochs" in md and "T=0.5, the run T=0.07" in md
    assert not list(sweep.glob(".*tmp*")), "temporary files must be renamed away"


def test_missing_paths_and_out_dir(tmp_path, capsys):
    tool = load_tool("compare")
    with pytest.raises(SystemExit) as exc:  # nothing there: one line, exit 2
        tool.main([str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[ssl_vision] error: no results.json") and str(tmp_path) in err[0]
    with pytest.raises(SystemExit) as exc:  # a path that does not exist is named, one line, exit 2
        tool.main([str(tmp_path / "no_such_sweep")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"[ssl_vision] error: {tmp_path / 'no_such_sweep'} does not exist: give a sweep directory (e.g. "
        f"outputs/multirun/<time>), run directories, or any folder above them"
    ]
    sweep = write_fake_multirun(tmp_path)
    with pytest.raises(SystemExit) as exc:  # two inputs: --out is required
        tool.main([str(sweep / FAKE[0][0]), str(sweep / FAKE[1][0])])
    assert exc.value.code == 2 and "--out DIR" in capsys.readouterr().err
    out = tmp_path / "report"
    res = tool.main([str(sweep / FAKE[0][0]), str(sweep / FAKE[1][0]), "--out", str(out)])
    assert [r["run_dir"] for r in res["rows"]] == [f"../multirun/2025-01-01_12-00-00/{FAKE[i][0]}" for i in (0, 1)]
    assert (out / "comparison.md").is_file() and (out / "curves.png").is_file()


def test_evaluate_fills_a_missing_knn_from_a_real_checkpoint(pretrained, tmp_path):  # noqa: F811
    run = tmp_path / "sweep" / "0-simclr-resnet18-synthetic"
    shutil.copytree(pretrained.parents[1], run)  # run dir with results.json (no kNN: 2 steps, no validation)
    assert json.loads((run / "results.json").read_text())["knn_top1"] is None
    tool = load_tool("compare")
    args = [str(tmp_path / "sweep"), "--knn-k", "5", "--knn-temperature", "0.07", "--knn-override", "num_workers=0"]
    plain = tool.main(args)
    assert plain["rows"][0]["knn_top1"] is None and plain["rows"][0]["linear_top1"] is None

    filled = tool.main([*args, "--evaluate"])
    ckpt = run / "checkpoints" / "last.ckpt"  # the copy's own checkpoint, not the fixture's
    written = json.loads((run / "checkpoints" / "last.knn.json").read_text())
    assert written["ks"] == [5] and written["temperature"] == 0.07 and Path(written["checkpoint"]) == ckpt.resolve()
    train, ytr = reference_features(ckpt, "train")
    test, yte = reference_features(ckpt, "test")
    assert filled["rows"][0]["knn_top1"] == brute_force_knn(train, ytr, test, yte, 5, 0.07)["top1"]
    assert "offline kNN k=5 T=0.07" in (tmp_path / "sweep" / "comparison.md").read_text()

    again = tool.main([*args, "--evaluate"])  # reused, not recomputed (no kept-old copy appears)
    assert again["rows"][0]["knn_top1"] == filled["rows"][0]["knn_top1"]
    assert not list((run / "checkpoints").glob("last.knn.2*.json"))


# ------------------------------------------------------------------------------- what the figures are drawn from
def _job(root: Path, name: str, results: dict | None, config: str | None, losses=(), knns=(), per_epoch=10) -> Path:
    """A sweep job directory: results.json (None: none, as a failed job leaves), .hydra/config.yaml, metrics.csv."""
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    if config is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(config)
    if results is not None:
        ckpt = d / "checkpoints" / "last.ckpt"
        ckpt.write_bytes(b"x")
        (d / "results.json").write_text(json.dumps({**results, "checkpoint": str(ckpt), "run_dir": str(d)}))
    if losses or knns:
        (d / "logs").mkdir()
        rows = ["epoch,step,train/loss,val/knn_top1"]
        rows += [f"{s // per_epoch},{s},{v}," for s, v in enumerate(losses)]
        rows += [f"{s // per_epoch},{s},,{v}" for s, v in knns]
        (d / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return d


def _cfg(method: str, temperature: float, batch: int = 16, knn_k: int = 20, knn_t: float = 0.07) -> str:
    return (
        f"method:\n  name: {method}\n  kwargs:\n    temperature: {temperature}\nbackbone:\n  name: resnet18\n"
        f"data:\n  name: synthetic\n  batch_size: {batch}\neval:\n  knn_k: [{knn_k}]\n  knn_temperature: {knn_t}\n"
        f"paths:\n  output_root: /somewhere/{method}{temperature}\n"
    )


def _res(method: str, steps: int, images: int, knn=None, init=None, probe=None) -> dict:
    return dict(
        method=method,
        backbone="resnet18",
        data="synthetic",
        steps=steps,
        images_seen=images,
        wall_s=1.0,
        images_per_s=10.0,
        train_loss=1.0,
        knn_top1=knn,
        knn_top1_init=init,
        probe_top1=probe,
    )


def test_protocols_never_share_a_series_and_init_is_drawn(tmp_path):
    """Online kNN (k=20, T=0.07), an offline kNN with another bank, a kNN with another k, and two linear-probe
    protocols: each its own bar series; knn_top1_init drawn as a tick at its value on its run's bars."""
    sweep = tmp_path / "sweep"
    _job(sweep, "0-simclr", _res("simclr", 10, 160, knn=40.0, init=12.5, probe=30.0), _cfg("simclr", 0.1))
    _job(
        sweep,
        "1-byol",
        {
            **_res("byol", 10, 160, knn=50.0, probe=35.0),
            "knn_protocol": {  # results.json's record
                "k": 200,
                "ks": [200],
                "temperature": 0.07,
                "bank_size": 1000,
                "test_size": 100,
            },
        },
        _cfg("byol", 0.1),
    )
    d = _job(sweep, "2-mae", _res("mae", 10, 160, init=9.0), _cfg("mae", 0.1))  # kNN only from knn_eval.py
    (d / "checkpoints" / "last.knn.json").write_text(
        json.dumps(
            {
                "data": "synthetic",
                "ks": [20],
                "temperature": 0.07,
                "train_samples": 500,
                "knn": {"20": {"top1": 33.0, "top5": 80.0}},
            }
        )
    )
    for job, proto, top1 in (("0-simclr", "sgd_cosine", 45.0), ("1-byol", "lars_bn", 55.0)):
        (sweep / job / "checkpoints" / "last.linear.json").write_text(
            json.dumps({"data": "synthetic", "protocol": proto, "top1": top1, "spec": {"epochs": 90}})
        )
    res = load_tool("compare").main([str(sweep)])
    got = {s["name"]: s["values"] for s in res["series"]}
    assert got == {
        "kNN (k=20 T=0.07, online)": [40.0, None, None],
        "kNN (k=200 T=0.07 bank 1000, online)": [None, 50.0, None],
        "kNN (k=20 T=0.07 bank 500, offline)": [None, None, 33.0],
        "linear (sgd_cosine, 90 ep)": [45.0, None, None],
        "linear (lars_bn, 90 ep)": [None, 55.0, None],
        "online probe": [30.0, 35.0, None],
    }
    assert [r["kNN protocol"] for r in csv.DictReader(io.StringIO((sweep / "comparison.csv").read_text()))] == [
        "k=20 T=0.07, online",
        "k=200 T=0.07 bank 1000, online",
        "k=20 T=0.07 bank 500, offline",
    ]

    from ssl_vision.eval.compare import accuracy_figure

    fig, _ = accuracy_figure(res["rows"], [r["label"] for r in res["rows"]])
    ax = fig.axes[0]
    ticks = [seg for coll in ax.collections for seg in coll.get_segments()]  # the hlines of knn_top1_init
    assert sorted((round(float(s[0][0])), float(s[0][1])) for s in ticks) == [(0, 12.5), (2, 9.0)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(got) <= set(legend) and any("random init" in t for t in legend)
    bars = {(round(p.get_x() + p.get_width() / 2, 6), p.get_height()) for p in ax.patches}
    n = len(got)
    for j, (name, values) in enumerate(got.items()):  # each bar at its run's slot within the group, at its value
        for i, v in enumerate(values):
            if v is not None:
                assert (round(i + (j - (n - 1) / 2) * 0.8 / n, 6), v) in bars, (name, i)
    with Image.open(sweep / "accuracy.png") as im:
        assert im.format == "PNG" and im.size[0] > 400 and len(set(im.convert("L").getdata())) > 10


def test_failed_and_running_jobs_are_listed_not_dropped(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, "0-simclr", _res("simclr", 4, 64, knn=20.0), _cfg("simclr", 0.1), losses=[5, 4, 3, 2])
    _job(sweep, "1-byol", None, _cfg("byol", 0.1))  # failed: no results.json
    bad = _job(sweep, "2-dino", None, _cfg("dino", 0.1))
    (bad / "results.json").write_text('{"method": "dino", "ste')  # cut short
    running = _job(sweep, "3-mae", None, _cfg("mae", 0.1))
    (running / ".lock").write_text("")
    ok_resumed = _job(sweep, "4-swav", _res("swav", 4, 64), _cfg("swav", 0.1))
    (ok_resumed / "resumes" / "2025-01-02_00-00-00" / ".hydra").mkdir(parents=True)  # a resumed leg: not a job
    (ok_resumed / "resumes" / "2025-01-02_00-00-00" / ".hydra" / "config.yaml").write_text(_cfg("swav", 0.1))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(running / '.lock')!r}, os.O_RDWR)\n"
                "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = load_tool("compare").main([str(sweep)])
    finally:
        holder.kill()
        holder.wait()
    got = [(r["run_dir"], r["status"], r["method"]) for r in res["rows"]]
    assert got == [
        ("0-simclr", "ok", "simclr"),
        ("1-byol", "failed", "byol"),
        ("2-dino", "failed", "dino"),
        ("3-mae", "running", "mae"),
        ("4-swav", "ok", "swav"),
    ]
    assert res["notes"]["1-byol"] == [
        "failed: no results.json: the job failed or was stopped before the end (see its log)"
    ]
    assert res["notes"]["2-dino"][0].startswith("failed: results.json cannot be read (JSONDecodeError")
    assert "still running" in res["notes"]["3-mae"][0]
    md = (sweep / "comparison.md").read_text()
    assert md.startswith("# Comparison of 5 runs (2 failed, 1 running)\n")
    header, body = markdown_table(md)
    assert [b[header.index("status")] for b in body] == ["ok", "failed", "failed", "running", "ok"]
    assert [b[header.index("kNN top-1")] for b in body] == ["20.00", "–", "–", "–", "–"]
    assert "- `1-byol`: failed: no results.json" in md
    with open(sweep / "comparison.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "failed", "failed", "running", "ok"]


def test_labels_tell_recipes_apart(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, "0-simclr", _res("simclr", 4, 64), _cfg("simclr", 0.1))
    _job(sweep, "1-simclr", _res("simclr", 4, 64), _cfg("simclr", 0.5))  # differs in temperature (and paths)
    _job(sweep, "2-byol", _res("byol", 4, 64), _cfg("byol", 0.1))
    _job(sweep, "3-mae", _res("mae", 4, 64), None)  # no config: run dir name
    _job(sweep, "4-mae", _res("mae", 4, 64), None)
    res = load_tool("compare").main([str(sweep)])
    assert [r["label"] for r in res["rows"]] == [
        "simclr/resnet18 method.kwargs.temperature=0.1",
        "simclr/resnet18 method.kwargs.temperature=0.5",
        "byol/resnet18",
        "mae/resnet18 3-mae",
        "mae/resnet18 4-mae",
    ]


def test_curves_one_loss_panel_per_objective_and_images_seen_when_batches_differ(tmp_path):
    from ssl_vision.eval.compare import curves_figure

    sweep = tmp_path / "sweep"
    _job(
        sweep,
        "0-simclr",
        _res("simclr", 4, 64, knn=20.0),
        _cfg("simclr", 0.1, batch=16),
        losses=[6, 5, 4, 3],
        knns=[(3, 20.0)],
    )
    _job(
        sweep,
        "1-simclr",
        _res("simclr", 2, 64, knn=22.0),
        _cfg("simclr", 0.1, batch=32),
        losses=[6.5, 5.5],
        knns=[(1, 22.0)],
    )
    _job(sweep, "2-mae", _res("mae", 4, 64), _cfg("mae", 0.1, batch=16), losses=[0.9, 0.8, 0.7, 0.6])
    res = load_tool("compare").main([str(sweep)])
    spec = res["panels"]
    assert spec["x"] == "images seen"  # 16 vs 32 images per step: steps are not comparable
    lab = [r["label"] for r in res["rows"]]
    assert lab == ["simclr/resnet18 data.batch_size=16", "simclr/resnet18 data.batch_size=32", "mae/resnet18"]
    panels = {p["title"]: p["lines"] for p in spec["panels"]}
    assert panels == {
        "train loss: mae": [(lab[2], [0, 16, 32, 48], [0.9, 0.8, 0.7, 0.6])],
        "train loss: simclr": [(lab[0], [0, 16, 32, 48], [6, 5, 4, 3]), (lab[1], [0, 32], [6.5, 5.5])],
        "online kNN (k=20 T=0.07, online)": [(lab[0], [48], [20.0]), (lab[1], [32], [22.0])],
    }
    fig = curves_figure(spec)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == [p["title"] for p in spec["panels"]]
    for ax, p in zip(axes, spec["panels"]):  # each objective's losses on axes of their own
        assert ax.get_xlabel() == "images seen"
        assert [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()] == p["lines"]
    with Image.open(sweep / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and len(set(im.convert("L").getdata())) > 10

    same = tmp_path / "same"  # equal images per step: x stays the optimizer step
    _job(same, "0-simclr", _res("simclr", 4, 64), _cfg("simclr", 0.1), losses=[6, 5, 4, 3])
    _job(same, "1-byol", _res("byol", 4, 64), _cfg("byol", 0.1), losses=[2, 1, 1, 1])
    spec = load_tool("compare").main([str(same)])["panels"]
    assert spec["x"] == "step" and [p["title"] for p in spec["panels"]] == ["train loss: byol", "train loss: simclr"]
    assert spec["panels"][1]["lines"][0][1] == [0, 1, 2, 3]
