"""End-to-end pretraining through the real configs: smoke runs, results.json, resume equality, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from ssl_vision.launch import run_pretraining
from ssl_vision.checkpoint_io import load_checkpoint
from ssl_vision.run_record import RESULT_KEYS
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]

# (method, backbone) combinations meant to work; each gets a one-step smoke run
SMOKE = [
    ("simclr", "resnet18", ["backbone.width=0.125"]),
    ("simclr", "resnet18", ["backbone.width=0.125", "trainer.precision=bf16-mixed", "logger=tensorboard"]),
    ("simclr", "resnet18", ["backbone.width=0.125", "logger=none", "augment=byol"]),
    ("simclr", "resnet18", ["backbone.width=0.125", "augment=moco_v1", "method.optim.name=adamw"]),
    ("simclr", "resnet18", ["backbone.width=0.125", "augment=moco_v2", "method.optim.name=sgd"]),
    ("simclr", "resnet50", ["backbone.channels=[8,16,32,64]"]),
    ("simclr", "vit_tiny", ["backbone.patch_size=8"]),
    ("simclr", "vit_small", []),
    ("simclr", "vit_s", []),
    ("simclr", "vit_b", ["backbone.patch_size=16"]),
]


@pytest.mark.parametrize("method,backbone,extra", SMOKE, ids=[f"{m}-{b}-{i}" for i, (m, b, _) in enumerate(SMOKE)])
def test_one_step_smoke(make_cfg, method, backbone, extra):
    cfg = make_cfg([f"method={method}", f"backbone={backbone}", *FAST, "trainer.max_steps=1", *extra])
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["images_seen"] == 16
    assert res["train_loss"] is not None and res["train_loss"] == res["train_loss"]  # finite, not NaN
    on_disk = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    assert set(RESULT_KEYS) <= set(on_disk)
    assert Path(on_disk["checkpoint"]).is_file() and 0.0 <= on_disk["knn_top1"] <= 100.0


class StopAfter(L.Callback):
    """Stop a run after ``steps`` optimizer steps without changing its schedule length."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def _backbone_state(ckpt_path):
    state = load_checkpoint(Path(ckpt_path))["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith("online_probe")}, state


def test_resume_equals_uninterrupted(make_cfg, tmp_path):
    """N steps straight == N/2 steps, checkpoint, resume, N/2 steps (weights equal within float tolerance)."""
    common = [
        "method=simclr",
        "backbone=resnet18",
        "backbone.width=0.125",
        *FAST,
        "trainer.max_epochs=2",
        "eval.final_eval=false",
        "checkpoint.save_top_k=-1",
    ]
    straight = run_pretraining(make_cfg(common, tmp_path / "straight"))
    assert straight["steps"] == 8  # 64 samples / 16 per batch × 2 epochs
    half = run_pretraining(make_cfg(common, tmp_path / "half"), extra_callbacks=[StopAfter(4)])
    assert half["steps"] == 4
    resumed = run_pretraining(make_cfg([*common, f"resume={half['checkpoint']}"], tmp_path / "other"))
    assert resumed["steps"] == 8
    assert resumed["run_dir"] == half["run_dir"]  # a resumed run continues in its own directory
    a, full_a = _backbone_state(straight["checkpoint"])
    b, full_b = _backbone_state(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the online probe and its own optimizer state continue too
    torch.testing.assert_close(full_a["online_probe.weight"], full_b["online_probe.weight"], rtol=1e-5, atol=1e-6)


def test_resume_auto_finds_last_run(make_cfg, tmp_path):
    common = [
        "method=simclr",
        "backbone=resnet18",
        "backbone.width=0.125",
        *FAST,
        "trainer.max_epochs=2",
        "eval.final_eval=false",
    ]
    runs = tmp_path / "outputs" / "simclr-resnet18-synthetic"  # <output_root>/<method>-<backbone>-<data>/<time>
    first = run_pretraining(make_cfg(common, runs / "t1"), extra_callbacks=[StopAfter(4)])
    again = run_pretraining(make_cfg([*common, "resume=auto"], runs / "t2"))
    assert again["run_dir"] == first["run_dir"] and again["steps"] == 8
    kept = list(Path(first["run_dir"]).glob("results.*.json"))
    assert len(kept) == 1, "the earlier results.json must be kept, not overwritten"


def test_unknown_method_lists_choices(make_cfg):
    with pytest.raises(MissingConfigException) as err:
        make_cfg(["method=simclrr"])
    assert "simclr" in str(err.value) and "Available options" in str(err.value)


def test_unknown_backbone_and_data_list_choices(make_cfg):
    for override in ("backbone=resnet999", "data=imagenett"):
        with pytest.raises(MissingConfigException, match="Available options"):
            make_cfg([override])


def test_misspelt_key_is_an_error(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(["trainer.max_epoch=3"])
    assert "max_epoch" in str(err.value.__cause__ or err.value)


def test_unknown_timm_backbone_name_is_clear(make_cfg):
    cfg = make_cfg([*FAST, "backbone.name=not_a_model"])
    with pytest.raises(ValueError, match="unknown backbone 'not_a_model'"):
        run_pretraining(cfg)


def test_cli_prints_results_json_last_and_cfg_job(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "tools/pretrain.py"),
        *FAST,
        "backbone.width=0.125",
        "trainer.max_steps=1",
        f"paths.output_root={tmp_path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["steps"] == 1 and last["method"] == "simclr"
    job = subprocess.run(
        [sys.executable, str(ROOT / "tools/pretrain.py"), "--cfg", "job"], capture_output=True, text=True, timeout=120
    )
    assert job.returncode == 0 and "method:" in job.stdout and "trainer:" in job.stdout
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools/pretrain.py"), "method=nope", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "Available options in 'method'" in bad.stderr


def test_two_process_cpu_run_end_to_end(tmp_path):
    """trainer=ddp_cpu: Lightning DDP over gloo; one results line, the global step count and images seen."""
    cmd = [
        sys.executable,
        str(ROOT / "tools/pretrain.py"),
        "trainer=ddp_cpu",
        *FAST,
        "data.num_workers=0",
        "backbone.width=0.125",
        "trainer.max_steps=2",
        f"paths.output_root={tmp_path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, "only the global-zero process prints the results line"
    res = json.loads(lines[0])
    assert res["steps"] == 2 and res["images_seen"] == 2 * 2 * 16  # steps × processes × per-process batch
    assert json.loads((Path(res["run_dir"]) / "results.json").read_text())["steps"] == 2


def test_one_step_on_real_fashion_mnist(make_cfg):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    cfg = make_cfg(
        [
            "experiment=fmnist_simclr",
            *FAST,
            "data=fashion_mnist",
            "data.train_subset=64",
            "data.knn_train_subset=256",
            "data.batch_size=16",
            "data.num_workers=0",
            "trainer.max_steps=1",
            "eval.knn_at_init=false",
        ]
    )
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["data"] == "fashion_mnist" and 0 <= res["knn_top1"] <= 100


class RecordStartState(L.Callback):
    """The module's full state when training starts, before any optimizer step."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_init_checkpoint_holds_the_weights_before_the_first_step(make_cfg, tmp_path):
    """``checkpoint.save_init`` (on with ``eval.knn_at_init``): ``checkpoints/init.ckpt`` equals the module's state at
    the start of training, is readable by the evaluation tools' loader, and differs from the trained weights."""
    from ssl_vision.eval.checkpoints import load_backbone

    rec = RecordStartState()
    res = run_pretraining(
        make_cfg(
            [
                "method=byol",
                "backbone=resnet18",
                "backbone.width=0.125",
                *FAST,
                "trainer.max_steps=2",
                "eval.knn_at_init=true",
            ],
            tmp_path,
        ),
        extra_callbacks=[rec],
    )
    init = Path(res["checkpoint"]).parent / "init.ckpt"
    ckpt = load_checkpoint(init)
    assert ckpt["global_step"] == 0 and ckpt["ssl_vision"]["run_info"]["method"] == "byol"
    assert ckpt["state_dict"].keys() == rec.state.keys()
    for k, v in rec.state.items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=0, atol=0, msg=k)
    trained = load_checkpoint(Path(res["checkpoint"]))["state_dict"]
    assert not torch.equal(trained["backbone.conv1.weight"], ckpt["state_dict"]["backbone.conv1.weight"])
    model, dim, info = load_backbone(init)
    torch.testing.assert_close(model.state_dict()["conv1.weight"], rec.state["backbone.conv1.weight"])
    # off: no file
    res2 = run_pretraining(
        make_cfg(
            [
                "method=simclr",
                "backbone=resnet18",
                "backbone.width=0.125",
                *FAST,
                "trainer.max_steps=1",
                "eval.knn_at_init=false",
            ],
            tmp_path / "off",
        )
    )
    assert not (Path(res2["checkpoint"]).parent / "init.ckpt").exists()
