"""tools/compare.py: the table, CSV and figures of a fake multirun written here, and ``--evaluate`` filling a missing
kNN from a real tiny checkpoint (checked against a brute-force kNN computed in the test)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.test_tools import brute_force_knn, load_tool, pretrained, reference_features  # noqa: F401

KNN_K, KNN_T = 20, 0.07
#: (job dir, results.json values, train losses per step, (step, kNN) per validation, steps per epoch)
FAKE = [
    ("0-simclr-resnet18-synthetic",
     dict(method="simclr", backbone="resnet18", data="synthetic", steps=6, images_seen=96, wall_s=12.345,
          images_per_s=7.777, train_loss=5.5, knn_top1=31.25, knn_top1_init=12.5, probe_top1=25.0),
     [6.3, 6.0, 5.9, 5.7, 5.6, 5.5], [(2, 25.0), (5, 31.25)], 3),
    ("1-byol-resnet18-synthetic",
     dict(method="byol", backbone="resnet18", data="synthetic", steps=4, images_seen=64, wall_s=3.0,
          images_per_s=21.333, train_loss=3.9, knn_top1=18.75, knn_top1_init=None, probe_top1=6.25),
     [4.0, 3.95, 3.93, 3.9], [(3, 18.75)], 4),
    ("2-mae-vit_tiny-synthetic",  # no kNN number; a knn.json with another temperature must not be used
     dict(method="mae", backbone="vit_tiny", data="synthetic", steps=8, images_seen=128, wall_s=40.0,
          images_per_s=3.2, train_loss=0.9, knn_top1=None, knn_top1_init=None, probe_top1=None),
     [1.2, 1.1, 1.05, 1.0, 0.98, 0.95, 0.92, 0.9], [], 2),
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
            f"method:\n  name: {res['method']}\neval:\n  knn_k: [{KNN_K}, 200]\n  knn_temperature: {KNN_T}\n")
        rows = ["epoch,step,train/loss,train/lr,val/knn_top1,val/probe_top1"]
        for step, loss in enumerate(losses):  # the CSV logger's layout: train rows, then a val row at its step
            rows.append(f"{step // per_epoch},{step},{loss},0.1,,")
            rows += [f"{step // per_epoch},{s},,,{v},25.0" for s, v in knns if s == step]
        (d / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "1-byol-resnet18-synthetic" / "checkpoints" / "last.linear.json").write_text(json.dumps(
        {"data": "synthetic", "protocol": "sgd_cosine", "top1": LINEAR_TOP1, "spec": {"epochs": 90}}))
    (sweep / "2-mae-vit_tiny-synthetic" / "checkpoints" / "last.knn.json").write_text(json.dumps(
        {"data": "synthetic", "ks": [KNN_K], "temperature": 0.5, "knn": {str(KNN_K): {"top1": 99.0, "top5": 99.0}}}))
    return sweep


def fmt(v, spec: str) -> str:
    return "–" if v is None else (str(int(v)) if spec == "d" else format(v, spec) if spec != "s" else str(v))


def expected_rows() -> list[dict]:
    rows = []
    for job, res, losses, _, per_epoch in FAKE:
        rows.append({"method": res["method"], "backbone": res["backbone"], "data": res["data"],
                     "epochs": (len(losses) - 1) // per_epoch + 1, "steps": res["steps"],
                     "images/s": res["images_per_s"], "wall s": res["wall_s"], "kNN top-1": res["knn_top1"],
                     "kNN init": res["knn_top1_init"],
                     "linear top-1": LINEAR_TOP1 if job.startswith("1-") else None,
                     "online probe top-1": res["probe_top1"], "run dir": job})
    return rows


FORMATS = {"epochs": "d", "steps": "d", "images/s": ".1f", "wall s": ".1f", "kNN top-1": ".2f", "kNN init": ".2f",
           "linear top-1": ".2f", "online probe top-1": ".2f"}


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
    for (label, curve), (job, res, losses, knns, _) in zip(res["curves"], FAKE):
        assert label == f"{res['method']}/{res['backbone']}"
        assert curve["loss"] == list(enumerate(losses)) and curve["knn"] == knns
    md = (sweep / "comparison.md").read_text()
    assert "linear probe sgd_cosine, 90 epochs" in md and "T=0.5, the run T=0.07" in md
    assert not list(sweep.glob(".*tmp*")), "temporary files must be renamed away"


def test_missing_paths_and_out_dir(tmp_path):
    tool = load_tool("compare")
    with pytest.raises(FileNotFoundError, match="no results.json"):
        tool.main([str(tmp_path)])
    sweep = write_fake_multirun(tmp_path)
    with pytest.raises(SystemExit):  # two inputs: --out is required
        tool.main([str(sweep / FAKE[0][0]), str(sweep / FAKE[1][0])])
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
