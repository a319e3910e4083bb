"""benchmarks/throughput.py end to end: a tiny synthetic run as a subprocess, its JSON line and its --json file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATES = ("full_step", "no_aug_step", "aug_only", "bare_fwd_bwd")
KEYS = {"method", "backbone", "data", "batch_size", "precision", "device", "steps", *RATES, "aug_share",
        "method_overhead"}


def test_throughput_script_tiny_run(tmp_path):
    out_json = tmp_path / "sub" / "throughput.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "data=synthetic", "data.synthetic_size=64",
           "data.batch_size=16", "data.num_workers=0", "backbone.width=0.125", "--steps", "2", "--warmup", "1",
           "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(res), KEYS - set(res)
    assert (res["method"], res["backbone"], res["data"]) == ("simclr", "resnet18", "synthetic")
    assert res["batch_size"] == 16 and res["steps"] == 2 and res["precision"] == "32-true"
    assert isinstance(res["device"], str) and res["device"]
    for k in RATES:
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    for k in ("aug_share", "method_overhead"):
        assert math.isfinite(res[k]), (k, res[k])
    assert res["method_overhead"] > 0
    assert json.loads(out_json.read_text()) == res
    assert [p.name for p in out_json.parent.iterdir()] == ["throughput.json"]  # no temp file left behind
    for k in RATES:  # the human-readable table is printed too
        assert k in proc.stdout


def test_throughput_script_batched_backend(tmp_path):
    """``augment.backend=batched``: raw uint8 batches become views on the device inside the timed steps."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "data=synthetic", "data.synthetic_size=64",
           "data.batch_size=16", "data.num_workers=0", "backbone.width=0.125", "augment.backend=batched",
           "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["backend"] == "batched"
    for k in RATES:
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
