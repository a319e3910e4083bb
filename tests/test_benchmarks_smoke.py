"""Issue 8 benchmark scripts run end to end in their --quick form (subprocesses; numbers are not checked)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aug_speed_quick():
    res = run_script("aug_speed.py", "--quick")
    assert res["preset"] == "multicrop" and res["views"] == "2x56 + 6x24"
    for k in ("per_sample_ms_per_image", "batched_ms_per_image", "batched_views_only_ms_per_image", "speedup"):
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None,
                    reason="lightly is not installed (optional extra: pip install -e '.[bench]')")
def test_vs_lightly_quick_simclr():
    res = run_script("vs_lightly.py", "--quick", "--methods", "simclr", "--steps", "1")
    (row,) = res["rows"]
    assert row["method"] == "simclr" and row["views"] == "2x32" and row["timed_steps"] == 1
    assert row["ours_img_s"] > 0 and row["lightly_img_s"] > 0 and row["ratio"] > 0


def test_knn_bench_quick():
    res = run_script("knn_bench.py", "--quick")
    assert res["bank"] == 20_000 and res["queries"] == 1_000
    assert res["knn_gflops"] > 0 and res["matmul_gflops_before"] > 0 and 0 < res["efficiency"]
