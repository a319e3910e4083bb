"""benchmarks/throughput.py end to end: a tiny synthetic run as a subprocess, its JSON line and its --json file."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RATES = ("full_step", "no_aug_step", "aug_only", "bare_fwd_bwd", "backbone_passes")
KEYS = {
    "method",
    "backbone",
    "data",
    "batch_size",
    "precision",
    "device",
    "steps",
    *RATES,
    "aug_share",
    "method_overhead",
    "passes_overhead",
    "passes",
}


def test_throughput_script_tiny_run(tmp_path):
    out_json = tmp_path / "sub" / "throughput.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "data=synthetic",
        "data.synthetic_size=64",
        "data.batch_size=16",
        "data.num_workers=0",
        "backbone.width=0.125",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out_json),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(res), KEYS - set(res)
    assert (res["method"], res["backbone"], res["data"]) == ("simclr", "resnet18", "synthetic")
    assert res["batch_size"] == 16 and res["steps"] == 2 and res["precision"] == "32-true"
    assert isinstance(res["device"], str) and res["device"]
    for k in RATES:
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    for k in ("aug_share", "method_overhead", "passes_overhead"):
        assert math.isfinite(res[k]), (k, res[k])
    assert res["method_overhead"] > 0 and res["passes_overhead"] > 0
    assert res["passes"] == "fwd+bwd 1x(32, 3, 32, 32)"  # SimCLR: both 16-image views in one backbone call
    assert json.loads(out_json.read_text()) == res
    assert [p.name for p in out_json.parent.iterdir()] == ["throughput.json"]  # no temp file left behind
    for k in RATES:  # the human-readable table is printed too
        assert k in proc.stdout


def test_throughput_script_batched_backend(tmp_path):
    """``augment.backend=batched``: raw uint8 batches become views on the device inside the timed steps."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "data=synthetic",
        "data.synthetic_size=64",
        "data.batch_size=16",
        "data.num_workers=0",
        "backbone.width=0.125",
        "augment.backend=batched",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "3",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["backend"] == "batched" and res["rounds"] == 3
    for k in ("method_overhead", "passes_overhead"):  # the median of the 3 paired ratios
        per_round = res[f"{k}_per_round"]
        assert len(per_round) == 3 and all(x > 0 for x in per_round)
        assert abs(res[k] - sorted(per_round)[1]) < 1e-3, (k, res[k], per_round)
    for k in RATES:
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])


# --------------------------------------------------------------------------- backbone passes (in process)
def _throughput():
    """benchmarks/throughput.py as a module (benchmarks/ is scripts, not a package)."""
    if "throughput_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
    return sys.modules["throughput_bench"]


N = 8
TINY = ["data=synthetic", "data.synthetic_size=16", f"data.batch_size={N}", "data.num_workers=0"]
RESNET = ["backbone.width=0.125"]
VIT = ["backbone=vit_tiny", "backbone.name=test_vit", "backbone.patch_size=8"]  # 32 px: a 4 x 4 patch grid


def _passes(overrides):
    tp = _throughput()
    st = tp.build_stepper(tp.compose_cfg(TINY + overrides), total_steps=4)
    views, indices = st.to_device(next(iter(st.dm.train_dataloader())))
    return tp, st, views, tp.record_passes(st.module, lambda: st.train_step(views, indices))


def test_passes_are_the_backbone_calls_each_method_defines():
    """Checked against the methods' definitions, not the code: SimCLR encodes both views in one batch; MoCo v3
    back-propagates both views and runs its momentum encoder on both; MoCo v2 back-propagates the query only and
    encodes the key in shuffle-BN groups under no_grad; MAE's encoder sees 1 + int(16 * 0.25) = 5 tokens."""
    tp, _, views, passes = _passes(RESNET)  # simclr, the default method
    assert [(p.grad, tuple(p.x.shape)) for p in passes] == [(True, (2 * N, 3, 32, 32))]
    assert torch.equal(passes[0].x, torch.cat(views[:2]))

    tp, st, views, passes = _passes(RESNET + ["method=moco_v3", "augment=moco_v3"])
    assert [p.grad for p in passes] == [True, True, False, False]
    assert all(tuple(p.x.shape) == (N, 3, 32, 32) for p in passes)
    assert passes[0].module is passes[1].module is st.module.backbone
    assert passes[2].module is passes[3].module is st.module.objective.momentum_backbone
    assert tp.describe_passes(passes) == "fwd+bwd 2x(8, 3, 32, 32); fwd 2x(8, 3, 32, 32)"

    _, st, _, passes = _passes(RESNET + ["method=moco_v2", "augment=moco_v2"])
    grad = [p for p in passes if p.grad]
    assert len(grad) == 1 and grad[0].module is st.module.backbone and grad[0].x.shape[0] == N
    keys = [p for p in passes if not p.grad]
    assert keys and all(p.module is st.module.objective.key_backbone for p in keys)
    assert sum(p.x.shape[0] for p in keys) == N

    _, st, _, passes = _passes(
        VIT
        + [
            "method=mae",
            "augment=mae",
            "method.kwargs.decoder_dim=32",
            "method.kwargs.decoder_depth=1",
            "method.kwargs.decoder_heads=2",
            "method.kwargs.probe_features=full",
        ]
    )
    dim = st.module.backbone.embed_dim
    assert [(p.grad, tuple(p.x.shape)) for p in passes] == [(True, (N, 1 + 4, dim)), (False, (N, 1 + 16, dim))]
    assert all(p.module is st.module.backbone.blocks for p in passes)


def test_replay_gives_the_gradients_of_the_recorded_passes():
    """The replay's backward = the gradient of the sum of the grad passes' output means, computed by hand here;
    the momentum encoder gets none and is not changed."""
    tp, st, _, passes = _passes(RESNET + ["method=moco_v3", "augment=moco_v3"])
    backbone, teacher = st.module.backbone, st.module.objective.momentum_backbone
    before = {k: v.clone() for k, v in teacher.state_dict().items() if v.is_floating_point() and "running" not in k}
    tp.replay_passes(passes, st.autocast)
    got = {n: p.grad.clone() for n, p in backbone.named_parameters()}
    backbone.zero_grad(set_to_none=True)
    (backbone(passes[0].x).mean() + backbone(passes[1].x).mean()).backward()
    for n, p in backbone.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
