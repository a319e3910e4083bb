"""SSLDataModule on synthetic data: batch structure, indices, drop_last, errors, validation loaders, configs."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import MISSING, OmegaConf

from ssl_vision.config_schema import DataSpec
from ssl_vision.data.datamodule import SSLDataModule
from ssl_vision.data.views import build_eval_transform
from tests.config_snapshot import compose_cfg

CONF = Path(__file__).resolve().parents[2] / "conf"
TWO_VIEWS = [{"count": 1}, {"count": 1, "size_ratio": 0.5, "scale": [0.05, 0.4]}]


def make(**overrides) -> SSLDataModule:
    kwargs = dict(
        name="synthetic",
        root=None,
        image_size=16,
        in_chans=3,
        num_classes=4,
        mean=[0.5],
        std=[0.25],
        batch_size=8,
        num_workers=0,
        views=TWO_VIEWS,
        synthetic_size=30,
        seed=0,
    )
    kwargs.update(overrides)
    dm = SSLDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_train_batches_are_views_labels_indices_with_drop_last():
    dm = make()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 30 // 8  # drop_last: 3 full batches, the 6 leftover samples are dropped
    views, labels, indices = batches[0]
    assert isinstance(views, list) and len(views) == 2
    assert views[0].shape == (8, 3, 16, 16) and views[1].shape == (8, 3, 8, 8)  # large -> small
    assert labels.shape == (8,) and labels.dtype == torch.int64 and indices.shape == (8,)
    seen = torch.cat([b[2] for b in batches])
    assert len(set(seen.tolist())) == 24 and seen.max() < dm.num_train_samples
    for j in range(8):  # indices address positions in the train set
        assert dm.train_dataset[int(indices[j])][1] == int(labels[j])


def test_train_loader_shuffles():
    dm = make(synthetic_size=64)
    torch.manual_seed(0)
    order = torch.cat([b[2] for b in dm.train_dataloader()])
    assert not torch.equal(order, torch.arange(64))


def test_train_subset_sets_bank_size_and_indices():
    dm = make(synthetic_size=40, train_subset=16)
    assert dm.num_train_samples == 16
    indices = torch.cat([b[2] for b in dm.train_dataloader()])
    assert sorted(indices.tolist()) == list(range(16))


def test_too_small_train_set_names_both_numbers():
    dm = make(synthetic_size=30, train_subset=5)
    with pytest.raises(ValueError) as info:
        dm.train_dataloader()
    msg = str(info.value)
    assert "5 samples" in msg and "data.batch_size=8" in msg and "smaller data.batch_size" in msg


def test_num_train_samples_needs_setup():
    dm = SSLDataModule(
        name="synthetic",
        root=None,
        image_size=8,
        in_chans=3,
        num_classes=2,
        mean=[0.5],
        std=[0.25],
        batch_size=2,
        num_workers=0,
        views=[{}],
    )
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.num_train_samples


def test_setup_is_idempotent():
    dm = make()
    train = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is train


def test_val_loaders_are_bank_then_test_under_eval_transform():
    dm = make(synthetic_size=40, knn_train_subset=12, eval_batch_size=5)
    bank, test = dm.val_dataloader()
    bank_batches, test_batches = list(bank), list(test)
    assert sum(len(b[1]) for b in bank_batches) == 12  # knn_train_subset, no drop_last
    assert sum(len(b[1]) for b in test_batches) == 10  # synthetic test split: max(40 // 4, num_classes)
    img, label, index = test_batches[0]
    assert img.shape == (5, 3, 16, 16) and index.tolist() == list(range(5))  # not shuffled
    eval_t = build_eval_transform(16, 3, [0.5], [0.25])
    raw, raw_label = dm.test_dataset[3]
    assert torch.allclose(img[3], eval_t(raw)) and int(label[3]) == raw_label  # deterministic eval transform
    assert len(bank_batches[-1][1]) == 2  # the last partial batch is kept


def test_persistent_workers_only_with_workers():
    assert make(num_workers=0, persistent_workers=True).train_dataloader().persistent_workers is False


def test_bad_views_fail_at_construction():
    with pytest.raises(ValueError, match="valid keys"):
        SSLDataModule(
            name="synthetic",
            root=None,
            image_size=8,
            in_chans=3,
            num_classes=2,
            mean=[0.5],
            std=[0.25],
            batch_size=2,
            num_workers=0,
            views=[{"sizeratio": 1.0}],
        )


def test_one_channel_fashion_mnist_style_config():
    dm = make(in_chans=1, mean=[0.286], std=[0.353])
    views, _, _ = next(iter(dm.train_dataloader()))
    assert all(v.shape[1] == 1 for v in views)


def test_data_schema_is_the_datamodule_arguments_and_every_data_config_has_its_keys():
    """``DataSpec`` (``schema/data``, what every ``conf/data/*.yaml`` merges onto) has one field per keyword argument
    of ``SSLDataModule`` (besides ``views`` and ``seed``, from other config nodes), with the argument's default
    (``???`` where the argument has none); so every composed data config has exactly the constructor's keys."""
    params = inspect.signature(SSLDataModule.__init__).parameters
    init_defaults = {
        n: MISSING if p.default is inspect.Parameter.empty else p.default
        for n, p in params.items()
        if n not in {"self", "views", "seed"}
    }
    schema_defaults = {f.name: f.default for f in dataclasses.fields(DataSpec)}
    assert schema_defaults == init_defaults
    files = sorted((CONF / "data").glob("*.yaml"))
    assert {f.stem for f in files} >= {
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "stl10",
        "imagenet",
        "imagefolder",
        "folder",
        "synthetic",
    }
    for f in files:
        assert set(compose_cfg([f"data={f.stem}"]).data) == set(init_defaults), f.name


def test_synthetic_config_and_augment_preset_build_a_working_datamodule():
    cfg = compose_cfg(["data=synthetic", "augment=simclr"])  # the data file over its schema, as a run composes it
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = SSLDataModule(**data, views=cfg.augment.views)  # a DictConfig name -> view (unset fields: ViewSpec)
    dm.setup()
    views_batch, labels, _ = next(iter(dm.train_dataloader()))
    assert len(views_batch) == 2 and views_batch[0].shape == (32, 3, 32, 32) and labels.shape == (32,)
