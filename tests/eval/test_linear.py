"""Linear probe: recipes, head, schedules, accuracy on separable features, a frozen eval-mode backbone whose
weights and BN statistics stay bit-identical, and the feature cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.eval.linear import (
    BEST_ON_TEST_NOTE,
    build_head,
    lr_at,
    make_probe_spec,
    probe_checkpoint,
    train_linear_probe,
)
from ssl_vision.eval.features import extract_features
from tests.eval.test_features import DATA, tiny_backbone, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPES = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/linear.yaml").protocols)


def separable(n=400, m=200, d=32, c=4, seed=0):
    """Gaussian clusters far apart: linearly separable up to a few outliers."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 3
    y, yt = torch.arange(n) % c, torch.arange(m) % c
    return (centers[y] + torch.randn(n, d, generator=g), y, centers[yt] + torch.randn(m, d, generator=g), yt)


def test_recipes_from_the_config():
    s = make_probe_spec("sgd_cosine", RECIPES)
    assert (s.optimizer, s.lr, s.batch_size, s.epochs, s.weight_decay, s.schedule) == ("sgd", 0.1, 256, 90, 0, "cosine")
    assert make_probe_spec("sgd_cosine", RECIPES, batch_size=1024).lr == pytest.approx(0.4)  # 0.1 x B/256
    assert make_probe_spec("sgd_cosine", RECIPES, lr=0.05, batch_size=1024).lr == 0.05  # explicit lr wins
    step = make_probe_spec("sgd_step", RECIPES, batch_size=512)
    assert (step.lr, step.schedule, step.milestones, step.epochs) == (30.0, "step", (0.6, 0.8), 100)  # MoCo
    mae = make_probe_spec("lars_bn", RECIPES)
    assert (mae.optimizer, mae.head_bn, mae.lr, mae.batch_size, mae.warmup_epochs) == ("lars", True, 6.4, 16384, 10)
    with pytest.raises(ValueError, match="unknown linear-probe protocol 'sgd'; valid: lars_bn, sgd_cosine, sgd_step"):
        make_probe_spec("sgd", RECIPES)
    with pytest.raises(ValueError, match=r"warmup_epochs=10 exceeds epochs=5; set protocols.lars_bn.warmup_epochs"):
        make_probe_spec("lars_bn", RECIPES, epochs=5)


def test_head_init_and_bn_head():
    torch.manual_seed(0)
    head = build_head(512, 100)
    assert isinstance(head, nn.Linear) and torch.all(head.bias == 0)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05) and abs(head.weight.mean().item()) < 1e-3
    bn_head = build_head(64, 10, bn=True)
    bn = bn_head[0]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6 and isinstance(bn_head[1], nn.Linear)


def test_schedules():
    step = make_probe_spec("sgd_step", RECIPES, epochs=10)
    lrs = [lr_at(step, e * 5, 5) for e in range(10)]
    assert lrs[:6] == [30.0] * 6 and lrs[6:8] == pytest.approx([3.0] * 2) and lrs[8:] == pytest.approx([0.3] * 2)
    cos = make_probe_spec("sgd_cosine", RECIPES, epochs=10)
    assert lr_at(cos, 0, 5) == cos.lr and lr_at(cos, 25, 5) == pytest.approx(cos.lr / 2) and lr_at(cos, 50, 5) == 0
    mae = make_probe_spec("lars_bn", RECIPES, epochs=20)  # 10 warmup epochs from 0
    assert lr_at(mae, 0, 5) == 0 and lr_at(mae, 25, 5) == pytest.approx(mae.lr / 2) and lr_at(mae, 50, 5) == mae.lr


@pytest.mark.parametrize("protocol,lr", [("sgd_cosine", None), ("sgd_step", None), ("lars_bn", 6.4)])
def test_probe_reaches_high_accuracy_on_separable_features(protocol, lr):
    tr, y, te, yt = separable()
    spec = make_probe_spec(protocol, RECIPES, lr=lr, epochs=30, batch_size=64)
    res = train_linear_probe(tr, y, te, yt, 4, spec)
    assert res["rule"] == "last" and res["epochs"] == 30 and res["steps"] == 30 * math.ceil(400 / 64)
    assert res["top1"] >= 95.0 and res["top5"] == 100.0, res
    assert "best_on_test" not in res  # only when asked for


def test_best_on_test_is_flagged_and_the_result_stays_last():
    tr, y, te, yt = separable(seed=1)
    spec = make_probe_spec("sgd_cosine", RECIPES, epochs=5, batch_size=64)
    res = train_linear_probe(tr, y, te, yt, 4, spec, report_best_on_test=True)
    assert res["rule"] == "last" and res["best_on_test"]["note"] == BEST_ON_TEST_NOTE
    assert res["best_on_test"]["top1"] >= res["top1"] and 1 <= res["best_on_test"]["epoch"] <= 5
    again = train_linear_probe(tr, y, te, yt, 4, spec)  # seeded: the same run reports the same last number
    assert again["top1"] == res["top1"]


class Counting:
    """extract_features that counts its calls and records the backbone's mode / grad state at each forward."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def __call__(self, backbone, loader, device):
        self.calls += 1
        handle = backbone.register_forward_hook(
            lambda m, i, o: self.seen.append((any(x.training for x in m.modules()), torch.is_grad_enabled()))
        )
        try:
            return extract_features(backbone, loader, device)
        finally:
            handle.remove()


def test_probe_keeps_backbone_frozen_in_eval_and_reuses_the_cache(tmp_path):
    ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    backbone, _, info = load_backbone(ckpt)
    backbone.train()  # whatever the caller left, the probe runs it in eval mode
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    spec = make_probe_spec("sgd_cosine", RECIPES, epochs=3, batch_size=32)
    extract = Counting()
    first = probe_checkpoint(
        ckpt, spec, DATA, backbone, info, batch_size=32, num_workers=0, device="cpu", extract=extract
    )
    assert extract.calls == 2 and first["feature_cache"] == {"test": "written", "train": "written"}
    assert (tmp_path / "last.features.train.pt").is_file() and (tmp_path / "last.features.test.pt").is_file()
    blob = torch.load(tmp_path / "last.features.train.pt", weights_only=True)
    assert blob["features"].shape == (96, 64) and blob["features"].dtype == torch.float32

    second = probe_checkpoint(
        ckpt, spec, DATA, backbone, info, batch_size=32, num_workers=0, device="cpu", extract=extract
    )
    assert extract.calls == 2, "the second run must not extract again"
    assert second["feature_cache"] == {"test": "hit", "train": "hit"} and second["top1"] == first["top1"]

    aug = probe_checkpoint(
        ckpt,
        make_probe_spec("sgd_cosine", RECIPES, epochs=2, batch_size=32),
        DATA,
        backbone,
        info,
        batch_size=32,
        num_workers=0,
        device="cpu",
        augment=True,
        extract=extract,
    )
    assert extract.calls == 2 + 2  # test split from the cache, train recomputed on each of the 2 epochs
    assert aug["augment"] and aug["feature_cache"]["train"].startswith("augmented")

    assert extract.seen and all(s == (False, False) for s in extract.seen)  # eval mode, no autograd, always
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    after = backbone.state_dict()
    for k, v in before.items():  # weights AND BN running statistics (and num_batches_tracked)
        assert torch.equal(after[k], v), k
