"""The online evaluator (ssl_vision/eval/online.py): its state in checkpoints, old checkpoints, one kNN protocol."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ssl_vision.checkpoint_io import load_checkpoint
from ssl_vision.launch import run_pretraining
from tests.conftest import CONF, FAST

ROOT = Path(__file__).resolve().parents[2]
# 96 images / 16 per batch = 6 steps in one epoch; a checkpoint every 3 steps; no validation (not needed here)
RESUME = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "data.synthetic_size=96",
    "trainer.limit_val_batches=0",
    "eval.final_eval=false",
    "checkpoint.every_n_steps=3",
]


def _old_layout(ckpt: dict) -> dict:
    """The checkpoint as the module wrote it before the evaluator held its own state: the probe's SGD state dict
    in ``checkpoint["ssl_vision"]["probe_optimizer"]`` and nothing of it in the state_dict."""
    old = dict(ckpt)
    old["state_dict"] = dict(ckpt["state_dict"])
    weight, bias = (old["state_dict"].pop(f"online_probe.{n}_momentum") for n in ("weight", "bias"))
    sgd = {
        "state": {0: {"momentum_buffer": weight}, 1: {"momentum_buffer": bias}},
        "param_groups": [
            {
                "lr": 0.1,
                "momentum": 0.9,
                "dampening": 0,
                "weight_decay": 0.0,
                "nesterov": False,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
                "params": [0, 1],
            }
        ],
    }
    old["ssl_vision"] = {**ckpt["ssl_vision"], "probe_optimizer": sgd}
    return old


def _resume(make_cfg, tmp_path: Path, name: str, ckpt: dict) -> dict:
    path = tmp_path / name / "checkpoints" / "mid.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    res = run_pretraining(make_cfg([*RESUME, f"resume={path}"], tmp_path / f"{name}-leg"))
    return load_checkpoint(Path(res["checkpoint"]))


def test_probe_optimizer_state_is_in_the_state_dict_and_old_checkpoints_resume_bit_exact(make_cfg, tmp_path):
    straight = run_pretraining(make_cfg(RESUME, tmp_path / "straight"))
    assert straight["steps"] == 6
    final = load_checkpoint(Path(straight["checkpoint"]))
    mid = load_checkpoint(Path(straight["checkpoint"]).parent / "epoch000-step0000003.ckpt")
    # the probe's momentum buffers travel in the module's own state_dict, as tensors, not beside it
    sd = mid["state_dict"]
    assert all(torch.is_tensor(v) for v in sd.values())
    for name in ("weight", "bias"):
        momentum = sd[f"online_probe.{name}_momentum"]
        assert momentum.shape == sd[f"online_probe.{name}"].shape and momentum.abs().sum() > 0
    assert "probe_optimizer" not in mid["ssl_vision"]

    for name, ckpt in (("new", mid), ("old", _old_layout(mid))):
        resumed = _resume(make_cfg, tmp_path, name, ckpt)
        assert resumed["global_step"] == 6
        assert resumed["state_dict"].keys() == final["state_dict"].keys()
        for k, v in final["state_dict"].items():  # weights, buffers and the probe's optimizer state: bit for bit
            torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=0, msg=f"{name}: {k}")

    # the probe's optimizer state matters: without it the resumed probe ends elsewhere (so the check above has teeth)
    lost = _old_layout(mid)
    lost["ssl_vision"]["probe_optimizer"] = None
    resumed = _resume(make_cfg, tmp_path, "lost", lost)
    assert not torch.equal(resumed["state_dict"]["online_probe.weight"], final["state_dict"]["online_probe.weight"])
    torch.testing.assert_close(
        resumed["state_dict"]["backbone.conv1.weight"], final["state_dict"]["backbone.conv1.weight"], rtol=0, atol=0
    )


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def test_online_knn_and_knn_eval_have_one_default_protocol():
    pre, tool = _compose("pretrain", []), _compose("knn", ["checkpoint=x"])
    assert (pre.eval.knn_k[0], pre.eval.knn_temperature) == (tool.ks[0], tool.temperature) == (200, 0.1)
    assert pre.data.knn_train_subset == 10_000  # the online bank is capped by default; the tool's is the full split
    assert tool.train_subset is None


def test_online_knn_equals_knn_eval_on_the_same_checkpoint_and_bank(make_cfg, tmp_path):
    """One protocol, one number: the run's final online kNN and tools/knn_eval.py on its last.ckpt with the same
    bank (train_subset = the run's data.knn_train_subset, drawn with the run's seed) give the same top-1."""
    bank, seed = 40, 3
    res = run_pretraining(
        make_cfg(
            [
                "method=simclr",
                "backbone=resnet18",
                "backbone.width=0.125",
                *FAST,
                "trainer.max_steps=2",
                f"data.knn_train_subset={bank}",
                f"seed={seed}",
                "eval.knn_k=[7,3]",
                "eval.knn_temperature=0.2",
            ]
        )
    )
    protocol = {"k": 7, "ks": [7, 3], "temperature": 0.2, "bank_size": bank, "test_size": 16}
    assert res["knn_protocol"] == protocol
    spec = importlib.util.spec_from_file_location("tool_knn_eval", ROOT / "tools" / "knn_eval.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ckpt = Path(shutil.copy(res["checkpoint"], tmp_path / "last.ckpt"))
    out = tool.run(
        _compose(
            "knn",
            [
                f"checkpoint={ckpt}",
                "ks=[7,3]",
                "temperature=0.2",
                f"train_subset={bank}",
                "num_workers=0",
                "device=cpu",
            ],
        )
    )
    assert out["knn_protocol"] == protocol
    assert out["knn"]["7"]["top1"] == res["knn_top1"]
    # another bank (the seed picks other images) is another protocol, and says so
    other = tool.run(
        _compose(
            "knn",
            [
                f"checkpoint={ckpt}",
                "ks=[7,3]",
                "temperature=0.2",
                "num_workers=0",
                "device=cpu",
                "output_dir=" + str(tmp_path / "full"),
            ],
        )
    )
    assert other["knn_protocol"]["bank_size"] == 64 and other["knn_protocol"]["temperature"] == 0.2


def test_module_imports_nothing_from_the_data_package():
    code = "import sys, ssl_vision.module; print(sorted(m for m in sys.modules if m.startswith('ssl_vision.data')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_batched_views_come_from_the_data_module_without_hook_warnings(make_cfg):
    """augment.backend=batched: the data module's on_after_batch_transfer makes the views; neither hook is
    overridden in the LightningModule, so Lightning has nothing to warn about (no filter hides it)."""
    import lightning as L

    from ssl_vision.data.datamodule import SSLDataModule
    from ssl_vision.module import SSLModule

    for hook in ("on_before_batch_transfer", "on_after_batch_transfer"):
        assert getattr(SSLModule, hook) is getattr(L.LightningModule, hook), hook
        assert hook in SSLDataModule.__dict__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_pretraining(
            make_cfg(
                [
                    "method=simclr",
                    "backbone=resnet18",
                    "backbone.width=0.125",
                    *FAST,
                    "trainer.max_steps=1",
                    "augment.backend=batched",
                    "eval.final_eval=false",
                ]
            )
        )
    assert res["steps"] == 1 and res["train_loss"] is not None
    hooks = [str(w.message) for w in caught if "batch_transfer" in str(w.message)]
    assert hooks == []


def test_raw_batch_without_batched_backend_is_named():
    from ssl_vision.data.datamodule import SSLDataModule
    from ssl_vision.data.raw_batch import RAW_KEY

    dm = SSLDataModule(
        name="synthetic",
        root=None,
        image_size=32,
        in_chans=3,
        num_classes=10,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        batch_size=4,
        num_workers=0,
        views=[{}],
    )
    with pytest.raises(RuntimeError, match=r"augment\.backend='per_sample'.*with_backend\('batched'\)"):
        dm.on_after_batch_transfer({RAW_KEY: torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}, 0)
