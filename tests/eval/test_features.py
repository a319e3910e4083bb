"""Feature extraction for offline evaluation: eval mode + no grad, restored modes, batch/worker independence,
the eval data helper and the feature cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_vision.backbones import create_backbone
from ssl_vision.eval.features import (
    EvalData,
    augmented_loader,
    build_eval_loaders,
    build_eval_splits,
    cached_features,
    extract_features,
    resolve_eval_data,
)
from ssl_vision.eval.knn import knn_accuracy

DATA = EvalData(
    name="synthetic",
    root=None,
    image_size=16,
    in_chans=3,
    num_classes=4,
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    synthetic_size=96,
)


def tiny_backbone(seed: int = 0) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    model, dim = create_backbone("resnet18", in_chans=3, image_size=16, width=0.125)
    for m in model.modules():  # non-trivial running statistics, so that a BN in train mode would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, dim


def test_extract_features_runs_in_eval_without_grad_and_restores_modes():
    model, dim = tiny_backbone()
    model.train()
    model.layer2.eval()  # a mixed state must come back exactly as it was
    before_modes = {n: m.training for n, m in model.named_modules()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.register_forward_hook(
        lambda mod, inp, out: seen.append((mod.training, mod.bn1.training, torch.is_grad_enabled()))
    )
    x, y = torch.randn(10, 3, 16, 16), torch.arange(10) % 4
    feats, labels = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=4), "cpu")

    assert feats.shape == (10, dim) and feats.dtype == torch.float32 and not feats.requires_grad
    assert labels.dtype == torch.int64 and torch.equal(labels, y)
    assert seen == [(False, False, False)] * 3  # every batch: eval mode, no autograd
    assert {n: m.training for n, m in model.named_modules()} == before_modes
    for k, v in model.state_dict().items():  # BN running stats included
        assert torch.equal(v, before_state[k]), k
    with torch.no_grad():  # the same as a plain eval forward
        ref = model.eval()(x)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)


def test_extract_features_errors():
    model, _ = tiny_backbone()
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0))), "cpu")
    bad = nn.Conv2d(3, 2, 3)  # (B, 2, H, W): not a feature extractor
    with pytest.raises(ValueError, match=r"expected \(B, D\)"):
        extract_features(bad, DataLoader(TensorDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2))), "cpu")


def test_knn_result_does_not_depend_on_batch_size_or_workers():
    model, _ = tiny_backbone()
    out = {}
    for batch, workers in ((8, 0), (32, 2)):
        train_loader, test_loader = build_eval_loaders(DATA, batch, workers)
        tr, ytr = extract_features(model, train_loader, "cpu")
        te, yte = extract_features(model, test_loader, "cpu")
        out[(batch, workers)] = (tr, ytr, te, yte, knn_accuracy(tr, ytr, te, yte, 4, ks=(1, 5, 20), temperature=0.07))
    a, b = out[(8, 0)], out[(32, 2)]
    assert a[0].shape == (96, 64) and a[2].shape == (24, 64)
    assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])  # same order, same labels
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)  # only float rounding may differ
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5)
    assert a[4] == b[4]


def test_augmented_views_do_not_depend_on_batch_size_or_workers():
    train, _ = build_eval_splits(DATA, train_subset=20)
    views = []
    for batch, workers in ((3, 0), (16, 2)):
        views.append(
            torch.cat(
                [b[0] for b in augmented_loader(train, DATA, epoch=1, seed=0, batch_size=batch, num_workers=workers)]
            )
        )
    assert views[0].shape == (20, 3, 16, 16) and torch.equal(views[0], views[1])
    other_epoch = torch.cat([b[0] for b in augmented_loader(train, DATA, 2, 0, 16, 0)])
    assert not torch.equal(views[0], other_epoch)  # a new crop every epoch


def test_resolve_eval_data_merges_overrides_and_checks_channels():
    stored = {
        "name": "synthetic",
        "root": None,
        "image_size": 16,
        "in_chans": 3,
        "num_classes": 4,
        "mean": [0.5],
        "std": [0.25],
        "batch_size": 16,
        "synthetic_size": 96,
    }
    assert resolve_eval_data(stored, None, 3) == EvalData(
        "synthetic", None, 16, 3, 4, (0.5,), (0.25,), synthetic_size=96
    )
    assert resolve_eval_data(stored, {"root": "/data", "synthetic_size": 8}, 3).root == "/data"
    with pytest.raises(ValueError, match=r"unknown data keys \['rooot'\]"):
        resolve_eval_data(stored, {"rooot": "/x"}, 3)
    with pytest.raises(ValueError, match="in_chans=1 but the backbone was built for in_chans=3"):
        resolve_eval_data(stored, {"in_chans": 1}, 3)
    with pytest.warns(UserWarning, match="image_size=24"):
        resolve_eval_data(stored, {"image_size": 24}, 3, backbone_image_size=16)
    with pytest.raises(ValueError, match=r"lacks \['mean', 'std'\]"):  # a run_info-only data dict
        resolve_eval_data({k: stored[k] for k in ("name", "image_size", "in_chans", "num_classes")}, None, 3)


def test_cached_features_hit_and_invalidation(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(5, 3), torch.arange(5)

    path = tmp_path / "x.features.train.pt"
    f1, y1, s1 = cached_features(path, {"sha256": "a", "split": "train"}, compute)
    f2, y2, s2 = cached_features(path, {"sha256": "a", "split": "train"}, compute)
    assert (s1, s2, len(calls)) == ("written", "hit", 1) and torch.equal(f1, f2) and torch.equal(y1, y2)
    blob = torch.load(path, weights_only=True)  # a plain tensor dict: safe to reload
    assert set(blob) == {"features", "labels", "fingerprint"}
    _, _, s3 = cached_features(path, {"sha256": "b", "split": "train"}, compute)  # other weights
    assert s3 == "replaced" and len(calls) == 2


# ------------------------------------------------------------------- helpers shared by the other eval tests
TINY_BACKBONE_CFG = {
    "name": "resnet18",
    "width": 0.125,
    "channels": None,
    "small_stem": "auto",
    "zero_init_residual": False,
    "patch_size": "auto",
    "drop_path_rate": 0.0,
}
DATA_CFG = {
    "name": "synthetic",
    "root": None,
    "download": False,
    "image_size": 16,
    "in_chans": 3,
    "num_classes": 4,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "batch_size": 16,
    "num_workers": 0,
    "eval_crop_ratio": 1.0,
    "synthetic_size": 96,
    "train_dir": "train",
    "val_dir": "val",
}


def write_checkpoint(
    path,
    model: nn.Module,
    backbone_cfg: dict = TINY_BACKBONE_CFG,
    data: dict = DATA_CFG,
    method: str = "simclr",
    extra_state: dict | None = None,
):
    """A checkpoint laid out as run_pretraining writes it (state_dict + ssl_vision.run_info), without training."""
    state = {f"backbone.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update(extra_state or {})
    run_info = {
        "method": method,
        "backbone": dict(backbone_cfg),
        "data": {k: data[k] for k in ("name", "image_size", "in_chans", "num_classes")},
        "config": {"data": dict(data), "backbone": dict(backbone_cfg)},
    }
    torch.save({"state_dict": state, "ssl_vision": {"run_info": run_info}, "global_step": 1, "epoch": 0}, path)
    return path
