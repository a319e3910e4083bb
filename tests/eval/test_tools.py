"""tools/knn_eval.py, tools/linear_probe.py and tools/export.py on a tiny checkpoint pretrained in this test.

The kNN CLI runs as a subprocess once (the real entry point, last stdout line = JSON); the other checks call the
tools' ``run(cfg)`` in-process on configs composed from the real conf/*.yaml, which is what ``main`` does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torchvision import transforms as T

from ssl_vision.backbones import create_backbone
from ssl_vision.data import build_dataset
from ssl_vision.launch import run_pretraining
from tests.conftest import CONF, FAST

ROOT = Path(__file__).resolve().parents[2]


def compose_cfg(name: str, overrides: list[str], return_hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=return_hydra_config)
    GlobalHydra.instance().clear()
    return cfg


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A real 2-step SimCLR checkpoint (resnet18 at width 1/8 on 32-px synthetic data, 64 train / 16 test)."""
    root = tmp_path_factory.mktemp("pretrain")
    cfg = compose_cfg(
        "pretrain",
        [
            f"paths.output_root={root / 'outputs'}",
            "method=simclr",
            "backbone=resnet18",
            "backbone.width=0.125",
            *FAST,
            "trainer.max_steps=2",
            "eval.final_eval=false",
        ],
        return_hydra_config=True,
    )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return Path(run_pretraining(cfg)["checkpoint"])


@pytest.fixture
def ckpt(pretrained, tmp_path) -> Path:
    """A private copy, so that each test sees its own results files."""
    return Path(shutil.copy(pretrained, tmp_path / "last.ckpt"))


def reference_features(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features computed here without the harness: rebuild by hand, plain transform, one batch."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    info = ckpt["ssl_vision"]["run_info"]
    model, _ = create_backbone("resnet18", in_chans=3, image_size=32, width=info["backbone"]["width"])
    model.load_state_dict(
        {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    )
    data = info["config"]["data"]
    ds = build_dataset(
        "synthetic", split, None, image_size=32, in_chans=3, num_classes=10, synthetic_size=data["synthetic_size"]
    )
    tf = T.Compose([T.ToTensor(), T.Normalize(data["mean"], data["std"])])  # 32-px images: no resize needed
    x = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    with torch.no_grad():
        return model.eval()(x), torch.tensor([ds[i][1] for i in range(len(ds))])


def brute_force_knn(train, ytr, test, yte, k, T, C=10) -> dict[str, float]:
    """Full cosine matrix, top-k, exp(s/T) votes; top-5 by a stable sort (ties -> lowest class index)."""
    a, b = train / train.norm(dim=1, keepdim=True), test / test.norm(dim=1, keepdim=True)
    s, idx = (b @ a.T).topk(k, dim=1)
    votes = torch.zeros(len(test), C).scatter_add_(1, ytr[idx], (s / T).exp())
    ranked = votes.sort(dim=1, descending=True, stable=True).indices
    return {
        "top1": 100.0 * float((ranked[:, 0] == yte).sum()) / len(yte),
        "top5": 100.0 * float((ranked[:, :5] == yte[:, None]).any(1).sum()) / len(yte),
    }


def test_knn_cli_matches_brute_force(ckpt, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "tools/knn_eval.py"),
        f"checkpoint={ckpt}",
        "ks=[1,5,20]",
        "temperature=0.07",
        "batch_size=7",
        "num_workers=0",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "last.knn.json").read_text()) == last
    assert last["ks"] == [1, 5, 20] and set(last["knn"]) == {"1", "5", "20"}
    assert (last["train_samples"], last["test_samples"], last["feature_dim"]) == (64, 16, 64)
    assert "knn k=   5 T=0.07: top1" in out.stdout
    train, ytr = reference_features(ckpt, "train")
    test, yte = reference_features(ckpt, "test")
    for k in (1, 5, 20):
        assert last["knn"][str(k)] == brute_force_knn(train, ytr, test, yte, k, 0.07), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.knn.json"]  # no Hydra debris


def test_knn_tool_keeps_old_results_reads_exports_and_data_overrides(ckpt, tmp_path):
    knn, export = load_tool("knn_eval"), load_tool("export")
    base = [f"checkpoint={ckpt}", "ks=[1,5]", "num_workers=0"]
    first = knn.run(compose_cfg("knn", base))
    second = knn.run(compose_cfg("knn", base))
    assert second["knn"] == first["knn"]
    assert len(list(tmp_path.glob("last.knn.2*.json"))) == 1, "the earlier results file must be kept, renamed"

    meta = export.run(compose_cfg("export", [f"checkpoint={ckpt}"]))
    via_export = knn.run(compose_cfg("knn", [*base[1:], f"checkpoint={meta['weights_path']}"]))
    assert via_export["knn"] == first["knn"] and (tmp_path / "last.backbone.knn.json").is_file()

    other = knn.run(compose_cfg("knn", [*base, "data=synthetic", "data.synthetic_size=40"]))
    assert (other["train_samples"], other["test_samples"]) == (40, 10)
    partial = knn.run(compose_cfg("knn", [*base, "+data.synthetic_size=32"]))  # one key over the checkpoint's
    assert partial["train_samples"] == 32
    with pytest.raises(ValueError, match=r"unknown data keys \['bogus'\]"):
        knn.evaluate(compose_cfg("knn", [*base, "+data.bogus=1"]))
    with pytest.raises(ValueError, match="'resnet18' backbone, but 'resnet50' was expected"):
        knn.evaluate(compose_cfg("knn", [*base, "expect_backbone=resnet50"]))


def test_linear_probe_tool(ckpt, tmp_path):
    probe = load_tool("linear_probe")
    base = [f"checkpoint={ckpt}", "epochs=3", "batch_size=16", "extract_batch_size=32", "num_workers=0"]
    first = probe.run(compose_cfg("linear", [*base, "report_best_on_test=true"]))
    assert json.loads((tmp_path / "last.linear.json").read_text()) == first
    assert first["rule"] == "last" and first["protocol"] == "sgd_cosine" and 0 <= first["top1"] <= 100
    assert first["spec"]["lr"] == pytest.approx(0.1 * 16 / 256) and first["spec"]["epochs"] == 3
    assert "test split" in first["best_on_test"]["note"]
    assert first["feature_cache"] == {"test": "written", "train": "written"}
    assert (tmp_path / "last.features.train.pt").is_file() and (tmp_path / "last.features.test.pt").is_file()

    again = probe.run(compose_cfg("linear", [*base, "protocol=sgd_step"]))
    assert again["feature_cache"] == {"test": "hit", "train": "hit"} and again["spec"]["lr"] == 30.0
    assert len(list(tmp_path.glob("last.linear.2*.json"))) == 1

    with pytest.raises(ValueError, match="finetuning.warmup_epochs=5 exceeds epochs=3"):
        probe.evaluate(compose_cfg("linear", [*base, "finetune=true"]))
    # train_augment (not 'augment', which is a config group of the pretraining configs) works from the command line
    aug = probe.evaluate(compose_cfg("linear", [*base, "train_augment=true", "epochs=1"]))
    assert aug["augment"] is True and aug["feature_cache"]["train"] == "augmented (recomputed every epoch)"
    with pytest.raises(ValueError, match="unknown linear-probe protocol 'mae'"):
        probe.evaluate(compose_cfg("linear", [*base, "protocol=mae"]))
