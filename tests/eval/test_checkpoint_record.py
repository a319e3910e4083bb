"""Checkpoints record how to rebuild their backbone and where the teacher's weights are; the evaluation tools read
that record, and checkpoints written before it existed still load through the older fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_vision.backbones import create_backbone
from ssl_vision.checkpoint_io import load_checkpoint
from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.launch import run_pretraining
from tests.conftest import FAST
from tests.eval.test_features import tiny_backbone, write_checkpoint

RUN = [
    "method=byol",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "data.image_size=16",
    "eval.final_eval=false",
    "checkpoint.save_init=true",
    "trainer.max_steps=1",
    "method.kwargs.proj_hidden_dim=16",
    "method.kwargs.pred_hidden_dim=16",
    "method.kwargs.proj_out_dim=8",
]


def features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_a_trained_checkpoint_records_backbone_and_teacher(make_cfg, tmp_path):
    res = run_pretraining(make_cfg(RUN))
    # what tools/pretrain.py built: resnet18 at width 0.125 on the synthetic data's 16 px, 3 channels
    expected = {
        "name": "resnet18",
        "in_chans": 3,
        "image_size": 16,
        "width": 0.125,
        "channels": None,
        "small_stem": "auto",
        "zero_init_residual": False,
        "patch_size": "auto",
        "drop_path_rate": 0.0,
    }
    for name in ("last.ckpt", "init.ckpt"):
        path = Path(res["run_dir"]) / "checkpoints" / name
        ckpt = load_checkpoint(path)
        record = ckpt["ssl_vision"]
        assert record["backbone"] == expected, name
        assert record["backbone_prefix"] == "backbone." and record["teacher_prefix"] == "objective.target_backbone."
        rebuilt, _ = create_backbone(**record["backbone"])  # the record alone rebuilds it
        rebuilt.load_state_dict(
            {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
        )
        teacher, _, info = load_backbone(path, use_teacher=True)
        assert info["weights"] == "teacher" and info["weights_prefix"] == "objective.target_backbone."
        target = {
            k[len("objective.target_backbone.") :]: v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("objective.target_backbone.")
        }
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in target.items())


def _with_record(path: Path, **record) -> Path:
    ckpt = torch.load(path, weights_only=True)
    ckpt["ssl_vision"].update(record)
    torch.save(ckpt, path)
    return path


def test_the_record_is_read_not_a_list_of_prefixes(tmp_path):
    student, _ = tiny_backbone(0)
    teacher, _ = tiny_backbone(1)
    decoy, _ = tiny_backbone(2)
    state = {
        **{f"objective.ema_copy.{k}": v for k, v in teacher.state_dict().items()},
        **{f"objective.teacher_backbone.{k}": v for k, v in decoy.state_dict().items()},
    }
    ckpt = _with_record(
        write_checkpoint(tmp_path / "m.ckpt", student, method="dino", extra_state=state),
        teacher_prefix="objective.ema_copy.",
        backbone_prefix="backbone.",
    )
    x = torch.randn(2, 3, 16, 16)
    got, _, info = load_backbone(ckpt, use_teacher=True)
    assert info["weights_prefix"] == "objective.ema_copy." and torch.equal(features(got, x), features(teacher, x))


def test_the_recorded_backbone_arguments_rebuild_it_without_run_info(tmp_path):
    student, _ = tiny_backbone(0)
    path = write_checkpoint(tmp_path / "m.ckpt", student)
    ckpt = torch.load(path, weights_only=True)
    kw = {"name": "resnet18", "in_chans": 3, "image_size": 16, "width": 0.125}
    ckpt["ssl_vision"] = {"backbone": kw, "backbone_prefix": "backbone.", "teacher_prefix": None}  # no run_info
    torch.save(ckpt, path)
    x = torch.randn(2, 3, 16, 16)
    got, _, info = load_backbone(path, expect_backbone="resnet18")
    assert info["create_kwargs"] == kw and torch.equal(features(got, x), features(student, x))
    with pytest.warns(UserWarning, match="method without an EMA teacher"):
        _, _, info = load_backbone(path, use_teacher=True)
    assert info["weights"] == "student"


def test_a_recorded_teacher_that_is_missing_is_an_error(tmp_path):
    student, _ = tiny_backbone(0)
    ckpt = _with_record(
        write_checkpoint(tmp_path / "m.ckpt", student, method="byol"), teacher_prefix="objective.target_backbone."
    )
    with pytest.raises(
        ValueError,
        match=r"records its teacher backbone under 'objective\.target_backbone\.\*' but "
        r"its state_dict holds no such keys",
    ):
        load_backbone(ckpt, use_teacher=True)


@pytest.mark.parametrize(
    "prefix",
    [
        "objective.teacher_backbone.",
        "objective.momentum_backbone.",
        "objective.target_backbone.",
        "objective.key_backbone.",
    ],
)
def test_a_checkpoint_without_the_record_loads_by_the_old_fallback(tmp_path, prefix):
    student, _ = tiny_backbone(0)
    teacher, _ = tiny_backbone(1)
    path = write_checkpoint(
        tmp_path / "old.ckpt",
        student,
        method="dino",
        extra_state={f"{prefix}{k}": v for k, v in teacher.state_dict().items()},
    )
    assert "teacher_prefix" not in torch.load(path, weights_only=True)["ssl_vision"]  # as written before
    x = torch.randn(2, 3, 16, 16)
    got, _, info = load_backbone(path, use_teacher=True)
    assert info["weights_prefix"] == prefix and torch.equal(features(got, x), features(teacher, x))
    got, _, info = load_backbone(path)
    assert info["weights"] == "student" and torch.equal(features(got, x), features(student, x))
