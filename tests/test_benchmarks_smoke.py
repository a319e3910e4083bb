"""The performance benchmark scripts run end to end in their --quick form (subprocesses; numbers are not checked)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None,
    reason="lightly is not installed (optional extra: pip install -e '.[bench]')",
)
def test_vs_lightly_quick_simclr():
    res = run_script("vs_lightly.py", "--quick", "--methods", "simclr", "--steps", "1", "--peak-tflops", "2")
    (row,) = res["rows"]
    assert row["method"] == "simclr" and row["views"] == "2x32" and row["timed_steps"] == 1
    assert row["ours_img_s"] > 0 and row["lightly_img_s"] > 0 and row["ratio"] > 0
    # one round: its paired ratio is the overall one (up to rounding)
    assert len(row["ratio_per_round"]) == 1 and abs(row["ratio_per_round"][0] - row["ratio"]) < 2e-3
    # FLOPs of a step: resnet18 x0.25 (small stem) on 2 x 16 32-px views, fwd + bwd = 3 x forward; a forward of
    # the full-width net at 32 px is ~0.56 GMAC = 1.1 GFLOP, / 16 for width 0.25 -> ~6.7 GFLOP per step (+ heads)
    assert 5.0 < row["gflop_per_step"] < 9.0
    for side in ("ours", "lightly"):
        rate = row["gflop_per_step"] * row[f"{side}_img_s"] / 16 / 1e3  # TFLOP/s = GFLOP/step x steps/s / 1000
        assert abs(row[f"{side}_tflop_s"] - rate) <= 0.02 * rate + 1e-4
        assert abs(row[f"{side}_mfu"] - row[f"{side}_tflop_s"] / 2) < 1e-4


def test_knn_bench_quick():
    res = run_script("knn_bench.py", "--quick")
    assert res["bank"] == 20_000 and res["queries"] == 1_000
    assert res["knn_gflops"] > 0 and res["matmul_gflops_before"] > 0 and 0 < res["efficiency"]


def load_script(name: str):
    """A benchmark script as a module, to call its ``main`` in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


AB_BASE = [
    "data=synthetic",
    "data.synthetic_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "backbone.width=0.125",
    "--steps",
    "1",
    "--rounds",
    "1",
    "--warmup",
    "1",
]


def test_options_ab_quick_with_a_compiled_variant(tmp_path):
    out_json = tmp_path / "ab.json"
    res = load_script("options_ab").main(
        [*AB_BASE, "--variant", "compiled=perf.compile=true,perf.compile_backend=eager", "--json", str(out_json)]
    )
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(res))
    base, compiled = res["rows"]
    assert (base["variant"], compiled["variant"]) == ("base", "compiled")
    assert compiled["overrides"] == ["perf.compile=true", "perf.compile_backend=eager"]
    assert base["vs_base"] == 1.0
    for row in res["rows"]:
        assert row["model_step"] > 0 and row["bare_fwd_bwd"] > 0 and row["first_steps_s"] > 0


def test_options_ab_refuses_a_variant_that_changes_the_data():
    ab = load_script("options_ab")
    with pytest.raises(RuntimeError, match="got another first batch than the baseline"):
        ab.main([*AB_BASE, "--variant", "other=seed=1"])
    with pytest.raises(SystemExit) as exc:
        ab.main([*AB_BASE, "--variant", "no-overrides"])
    assert exc.value.code == 2


def test_loader_epochs_quick():
    res = load_script("loader_epochs").main(
        [
            "data=synthetic",
            "data.synthetic_size=32",
            "data.batch_size=8",
            "data.num_workers=1",
            "--epochs",
            "2",
            "--rounds",
            "1",
        ]
    )
    off, on = res["rows"]
    assert (off["persistent_workers"], on["persistent_workers"]) == (False, True)
    for row in res["rows"]:
        assert all(
            row[k] > 0 for k in ("first_epoch_first_batch_s", "later_epochs_first_batch_s", "later_epochs_epoch_s")
        )


def test_aug_ab_quick_checks_the_variants_agree():
    res = run_script("aug_ab.py", "--quick", "--variants", "subsets:8", "grouped:3", "auto:0", "--kernels")
    assert [r["variant"] for r in res["rows"]] == ["subsets:8", "grouped:3", "auto:0"]
    assert all(math.isfinite(r["ms_per_image"]) and r["ms_per_image"] > 0 for r in res["rows"])
    pairs = [
        ("index_copy_224px", "row_copy_loop_224px"),
        ("index_copy_96px", "row_copy_loop_96px"),
        ("where_bool_mask", "minimum"),
        ("remainder", "floor"),
        ("addcmul_c11", "mul_then_add_c11"),
        ("saturation_mul_add", "saturation_lerp"),
        ("gray_kornia", "gray_ours"),
        ("blur_k23_kornia", "blur_k23_ours"),
    ]  # (replaced, ours)
    others = {"index_select_4d", "index_select_2d", "sub_mul_float_ops"}
    assert {k for pair in pairs for k in pair} | others == set(res["kernels"])
    assert all(math.isfinite(v) and v > 0 for v in res["kernels"].values())


@pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None,
    reason="lightly is not installed (optional extra: pip install -e '.[bench]')",
)
def test_parity_two_steps_of_simclr_on_tiny_data(tmp_path):
    """Both sides train 2 steps on the same batches (checked by sample index inside the script) and are evaluated by
    the same kNN; the summary is computed from the per-seed numbers."""
    out_json = tmp_path / "parity.json"
    res = load_script("parity").main(
        [
            "--methods",
            "simclr",
            "--steps",
            "2",
            "--seeds",
            "0",
            "--recipe",
            "none",
            "--json",
            str(out_json),
            "--override",
            "data=synthetic",
            "data.synthetic_size=48",
            "data.batch_size=16",
            "data.eval_batch_size=64",
            "backbone.width=0.125",
            "method.kwargs.proj_hidden_dim=64",
            "eval.knn_k=[5]",
        ]
    )
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(res))
    (row,) = res["rows"]
    (run,) = row["runs"]
    assert run["same_batches"] and run["steps"] == 2 and run["seed"] == 0
    for side in ("ours", "lightly"):
        assert 0.0 <= run[f"{side}_knn_top1"] <= 100.0
        assert all(math.isfinite(x) for x in run[f"{side}_loss_first_last"])
        assert row[f"{side}_spread"] == 0.0 and row[f"{side}_mean"] == run[f"{side}_knn_top1"]
    assert row["diff"] == round(run["ours_knn_top1"] - run["lightly_knn_top1"], 2)


@pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None,
    reason="lightly is not installed (optional extra: pip install -e '.[bench]')",
)
def test_parity_byol_loss_scale_gives_lightly_our_gradient():
    """BYOL's symmetric loss (Grill et al. 2020, eq. 2: ℓ = 2 − 2·cos, summed over the two directions) equals
    4 + 4 × lightly's 0.5·(NegativeCosineSimilarity + NegativeCosineSimilarity): the parity script's factor on lightly's
    loss gives both sides the same gradient; other methods are left unscaled."""
    from lightly.loss import NegativeCosineSimilarity
    from omegaconf import OmegaConf

    parity = load_script("parity")
    cfg = OmegaConf.create({"method": {"kwargs": {"temperature": 0.2}}})
    assert parity.lightly_loss_scale("byol", cfg) == 4.0
    assert parity.lightly_loss_scale("moco_v3", cfg) == pytest.approx(0.8)
    assert parity.lightly_loss_scale("simclr", cfg) == 1.0
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16, generator=g) for _ in range(4))
    p1.requires_grad_(True)
    cos = lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # noqa: E731
    ours = (2 - 2 * cos(p1, z2)).mean() + (2 - 2 * cos(p2, z1)).mean()  # the paper's formula, written out
    neg = NegativeCosineSimilarity()
    theirs = parity.lightly_loss_scale("byol", cfg) * 0.5 * (neg(p1, z2) + neg(p2, z1))
    assert float(ours) == pytest.approx(4.0 + float(theirs), abs=1e-5)
    (g_ours,) = torch.autograd.grad(ours, p1)
    (g_theirs,) = torch.autograd.grad(theirs, p1)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None,
    reason="lightly is not installed (optional extra: pip install -e '.[bench]')",
)
def test_parity_lightly_mae_starts_from_our_initialisation():
    """lightly's masked ViT wrapper re-initialises the ViT by default; the parity side must keep the weights it is
    given (ours: MAE's initialisation, fixed sin-cos position embedding), so both sides start from one backbone."""
    import copy

    from ssl_vision.launch import build_module

    parity = load_script("parity")
    over = ["data=synthetic", "data.synthetic_size=32", "data.image_size=28", "data.batch_size=8", "eval.knn_k=[5]"]
    cfg = parity.compose_cfg("mae", "fmnist_{method}", 0, 2, over)
    module = build_module(cfg, num_samples=32)
    init = copy.deepcopy(module.backbone.state_dict())
    model = parity.LightlyMethod("mae", cfg, module.backbone, 192, lr=0.0, with_optimizer=False)
    after = model.encoder.vit.state_dict()
    assert after.keys() == init.keys()
    for name, tensor in init.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None,
    reason="lightly is not installed (optional extra: pip install -e '.[bench]')",
)
def test_parity_rows_file_keeps_finished_pairs_and_reuses_only_the_same_measurement(tmp_path, monkeypatch):
    """Each finished pair is appended to --rows at once; a rerun reuses a pair only when method, seed, steps, recipe
    and overrides all match, and a line cut off by a kill is skipped."""
    parity = load_script("parity")
    rows_file = tmp_path / "rows.jsonl"
    calls = []

    def fake_pair(method, seed, args):
        calls.append((method, seed, args.steps))
        return {
            "method": method,
            "seed": seed,
            "ours_knn_top1": 50.0 + seed,
            "lightly_knn_top1": 49.0 + seed,
            "init_knn_top1": 40.0,
            "ours_loss_first_last": [1.0, 0.5],
            "lightly_loss_first_last": [1.0, 0.6],
        }

    monkeypatch.setattr(parity, "run_pair", fake_pair)
    monkeypatch.setattr(parity, "emit", lambda res, path: res)
    argv = ["--methods", "simclr", "--seeds", "0", "1", "--steps", "3", "--rows", str(rows_file)]
    first = parity.main(argv)
    assert calls == [("simclr", 0, 3), ("simclr", 1, 3)]
    assert len(rows_file.read_text().splitlines()) == 2
    with open(rows_file, "a") as f:
        f.write('{"method": "simclr", "seed": 2, "ke')  # a pair cut off mid-line by a kill
    second = parity.main(argv)
    assert calls == [("simclr", 0, 3), ("simclr", 1, 3)], "the same measurement must be reused, not rerun"
    assert second["rows"] == first["rows"]
    parity.main([*argv[:-4], "--steps", "4", "--rows", str(rows_file)])  # another length: a new measurement
    assert calls[2:] == [("simclr", 0, 4), ("simclr", 1, 4)]
    parity.main([*argv, "--heads", "ours"])  # lightly's loss on our head: another measurement
    assert calls[4:] == [("simclr", 0, 3), ("simclr", 1, 3)]
    with pytest.raises(SystemExit) as err:  # one projection head to copy: SimCLR only
        parity.main(["--methods", "byol", "--heads", "ours", "--steps", "3"])
    assert err.value.code == 2
    assert first["rows"][0]["diff"] == 1.0 and first["rows"][0]["ours_spread"] == 1.0
