"""A method's Lightning callbacks come from its config (``method.callbacks``), not from its name in launch.py."""

from __future__ import annotations

import pytest

from ssl_vision.launch import method_callbacks
from ssl_vision.mae_viz import MAEReconstructionCallback


def test_mae_config_lists_its_reconstruction_grid(make_cfg):
    cfg = make_cfg(["method=mae", "backbone=vit_tiny", "data=synthetic", "checkpoint.every_n_epochs=3"])
    (cb,) = method_callbacks(cfg)
    assert isinstance(cb, MAEReconstructionCallback)
    assert cb.every_n_epochs == 3 and cb.num_images == 8 and cb.out_dir is None  # None: the run directory
    assert list(cb.mean) == list(cfg.data.mean) and list(cb.std) == list(cfg.data.std)


def test_other_methods_add_none_and_a_config_can_add_or_drop_them(make_cfg):
    assert method_callbacks(make_cfg(["method=simclr"])) == []
    assert method_callbacks(make_cfg(["method=mae", "backbone=vit_tiny", "method.callbacks=[]"])) == []
    added = method_callbacks(
        make_cfg(["method=simclr", "method.callbacks=[{_target_: ssl_vision.mae_viz.MAEReconstructionCallback}]"])
    )
    assert [type(c) for c in added] == [MAEReconstructionCallback]


def test_a_target_that_is_not_a_callback_is_named(make_cfg):
    cfg = make_cfg(["method=simclr", "method.callbacks=[{_target_: collections.OrderedDict}]"])
    with pytest.raises(
        TypeError,
        match=r"method\.callbacks: 'collections\.OrderedDict' made a OrderedDict, not a "
        r"lightning Callback",
    ):
        method_callbacks(cfg)
