"""Export round trip (our factory, torchvision, timm), load_backbone's teacher choice, refusal of malicious
pickles and of a mismatched backbone."""

from __future__ import annotations

import json
import os
import pickle
import time

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from ssl_vision.backbones import create_backbone
from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.eval.export import export_backbone
from tests.eval.test_features import DATA_CFG, TINY_BACKBONE_CFG, tiny_backbone, write_checkpoint


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_export_round_trip_through_create_backbone_and_load_backbone(tmp_path):
    model, dim = tiny_backbone()
    ckpt = write_checkpoint(tmp_path / "last.ckpt", model)
    meta = export_backbone(ckpt)
    weights, sidecar = tmp_path / "last.backbone.safetensors", tmp_path / "last.backbone.json"
    assert meta["weights_path"] == str(weights.resolve()) and sidecar.is_file()
    on_disk = json.loads(sidecar.read_text())
    assert on_disk["feature_dim"] == dim and on_disk["backbone"] == "resnet18" and on_disk["weights"] == "student"
    # a small-stem, width-scaled ResNet: the JSON must say it only loads into the same construction
    assert on_disk["stock"]["loads_into_stock"] is False and "small-image stem" in on_disk["stock"]["stock_note"]

    x = torch.randn(3, 3, 16, 16)
    fresh, fresh_dim = create_backbone(**on_disk["create_kwargs"])
    fresh.load_state_dict(load_file(str(weights)), strict=True)
    assert fresh_dim == dim and torch.equal(features(fresh, x), features(model, x))
    back, back_dim, info = load_backbone(weights)
    assert info["format"] == "export" and info["data"]["synthetic_size"] == DATA_CFG["synthetic_size"]
    assert back_dim == dim and torch.equal(features(back, x), features(model, x))
    assert load_backbone(sidecar)[2]["path"] == str(weights)  # the sidecar path works too

    # again: the earlier pair is kept, not overwritten, under one stamp even when the two files were written in
    # different seconds (a CI run once straddled a second between them: last.backbone.<...06>.safetensors beside
    # last.backbone.<...07>.json)
    os.utime(weights, (1_700_000_000, 1_700_000_000))
    os.utime(sidecar, (1_700_000_001, 1_700_000_001))
    export_backbone(ckpt)
    kept = sorted(p.name for p in tmp_path.glob("last.backbone.2*"))
    assert len(kept) == 2 and kept[0].endswith(".json") and kept[1].endswith(".safetensors")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000))  # the weights' time, for both
    assert kept == [f"last.backbone.{stamp}.json", f"last.backbone.{stamp}.safetensors"]


def test_full_width_resnet18_loads_into_torchvision(tmp_path):
    torch.manual_seed(0)
    model, dim = create_backbone("resnet18", in_chans=3, image_size=224)  # 7x7 stem, stock widths
    cfg = {**TINY_BACKBONE_CFG, "width": 1.0}
    data = {**DATA_CFG, "image_size": 224}
    meta = export_backbone(write_checkpoint(tmp_path / "r18.ckpt", model, cfg, data))
    assert meta["stock"] == {**meta["stock"], "library": "torchvision", "model": "resnet18", "loads_into_stock": True}

    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(load_file(meta["weights_path"]), strict=True)
    x = torch.randn(2, 3, 64, 64)  # any size: the features must match
    assert dim == 512 and torch.equal(features(tv, x), features(model, x))


def test_vit_loads_into_timm_by_name(tmp_path):
    torch.manual_seed(0)
    cfg = {**TINY_BACKBONE_CFG, "name": "vit_tiny", "width": 1.0, "patch_size": 8}
    data = {**DATA_CFG, "image_size": 32}
    model, _ = create_backbone("vit_tiny", in_chans=3, image_size=32, patch_size=8)
    meta = export_backbone(write_checkpoint(tmp_path / "vit.ckpt", model, cfg, data))
    stock = meta["stock"]
    assert stock["model"] == "vit_tiny_patch16_224" and stock["kwargs"]["patch_size"] == 8
    vit = timm.create_model(stock["model"], **stock["kwargs"])
    vit.load_state_dict(load_file(meta["weights_path"]), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(vit, x), features(model, x))


def test_teacher_weights_and_fallback(tmp_path):
    student, _ = tiny_backbone(0)
    teacher, _ = tiny_backbone(1)
    teacher_state = {f"objective.teacher_backbone.{k}": v for k, v in teacher.state_dict().items()}
    ckpt = write_checkpoint(tmp_path / "dino.ckpt", student, method="dino", extra_state=teacher_state)
    x = torch.randn(2, 3, 16, 16)
    got, _, info = load_backbone(ckpt, use_teacher=True)
    assert info["weights"] == "teacher" and info["weights_prefix"] == "objective.teacher_backbone."
    assert torch.equal(features(got, x), features(teacher, x))
    assert torch.equal(features(load_backbone(ckpt)[0], x), features(student, x))  # default: the student
    assert json.loads(open(export_backbone(ckpt, use_teacher=True)["json_path"]).read())["weights"] == "teacher"

    plain = write_checkpoint(tmp_path / "simclr.ckpt", student)
    with pytest.warns(UserWarning, match="holds no teacher/momentum backbone"):
        got, _, info = load_backbone(plain, use_teacher=True)
    assert info["weights"] == "student" and torch.equal(features(got, x), features(student, x))


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "nested in a checkpoint"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save(Evil(marker), path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    else:
        model, _ = tiny_backbone()
        write_checkpoint(path, model)
        ckpt = torch.load(path, weights_only=True)
        ckpt["ssl_vision"]["run_info"]["payload"] = Evil(marker)
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True.*can run code"):
        load_backbone(path)
    with pytest.raises(ValueError, match="refusing to load"):
        export_backbone(path)
    assert not marker.exists(), "the pickle's payload ran"


def test_mismatched_backbone_names_both(tmp_path):
    ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    with pytest.raises(ValueError, match=r"'resnet18' backbone, but 'resnet50' was expected"):
        load_backbone(ckpt, expect_backbone="resnet50")
    weights = export_backbone(ckpt)["weights_path"]
    with pytest.raises(ValueError, match=r"'resnet18' backbone, but 'vit_small' was expected"):
        load_backbone(weights, expect_backbone="vit_small")
    assert load_backbone(ckpt, expect_backbone="resnet18")[1] == 64


def test_not_an_ssl_vision_checkpoint(tmp_path):
    torch.save({"state_dict": {"backbone.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="no checkpoint\\['ssl_vision'\\]\\['backbone'\\] .* nor \\['run_info'\\]"):
        load_backbone(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing.ckpt")
