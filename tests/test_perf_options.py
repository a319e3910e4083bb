"""``perf.channels_last`` (the default): the backbone's weights go NHWC, the numbers stay those of the NCHW layout.
``perf.compile``: every backbone copy compiled in place, the model and its checkpoints unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.launch import build_module, run_pretraining
from ssl_vision.checkpoint_io import load_checkpoint
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["method=byol", "backbone=resnet18", "backbone.width=0.125", *FAST]


def test_channels_last_is_the_default():
    from omegaconf import OmegaConf

    assert OmegaConf.load(ROOT / "conf" / "pretrain.yaml").perf.channels_last is True


def test_channels_last_weights_same_features(make_cfg):
    torch.manual_seed(0)
    plain = build_module(make_cfg([*SMALL, "perf.channels_last=false"]))
    assert all(m.weight.is_contiguous() for m in plain.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    torch.manual_seed(0)
    nhwc = build_module(make_cfg([*SMALL, "perf.channels_last=true"]))
    convs = [m.weight for m in nhwc.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(not w.is_contiguous() for w in convs if w.shape[-1] > 1)  # (1x1 kernels are both at once)
    # BYOL's target network is a deep copy made after the conversion: NHWC too
    target_convs = [m.weight for m in nhwc.objective.modules() if isinstance(m, torch.nn.Conv2d)]
    assert target_convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in target_convs)
    x = torch.randn(4, 3, 32, 32)
    plain.eval()
    nhwc.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc.backbone(x), plain.backbone(x), rtol=1e-4, atol=1e-5)


def test_channels_last_trains_and_its_checkpoint_loads_into_a_plain_backbone(make_cfg, tmp_path):
    res = run_pretraining(make_cfg([*SMALL, "perf.channels_last=true", "trainer.max_steps=2"], tmp_path))
    assert res["steps"] == 2
    backbone = load_backbone(res["checkpoint"])[0]
    stored = {
        k[len("backbone.") :]: v
        for k, v in load_checkpoint(res["checkpoint"])["state_dict"].items()
        if k.startswith("backbone.")
    }
    loaded = backbone.state_dict()
    assert stored.keys() == loaded.keys()
    for k, v in stored.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)


def test_compile_covers_every_backbone_copy_and_keeps_the_model(make_cfg):
    """``perf.compile``: the online backbone and BYOL's target copy each get their own compiled call (a recording
    backend sees both traced); the outputs, parameter names and state_dict keys are those of the plain module."""
    from ssl_vision.launch import compile_backbones

    torch.manual_seed(0)
    plain = build_module(make_cfg(SMALL))
    torch.manual_seed(0)
    module = build_module(make_cfg(SMALL))
    traced = []

    def recording_backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    names = compile_backbones(module, backend=recording_backend)
    assert names == ["backbone", "objective.target_backbone"]
    assert module.state_dict().keys() == plain.state_dict().keys()
    assert not any("_orig_mod" in k for k in module.state_dict())
    x = torch.randn(4, 3, 32, 32)
    for m in (module, plain):
        m.eval()
    with torch.no_grad():
        for name in names:
            before = len(traced)
            torch.testing.assert_close(module.get_submodule(name)(x), plain.get_submodule(name)(x))
            assert len(traced) > before, f"{name} ran without going through torch.compile"


def test_compile_option_trains_and_its_checkpoint_loads_into_a_plain_backbone(make_cfg, tmp_path):
    # the "eager" backend: dynamo's tracing and guards without inductor's C++ build (that is measured, not tested)
    res = run_pretraining(
        make_cfg([*SMALL, "perf.compile=true", "perf.compile_backend=eager", "trainer.max_steps=2"], tmp_path)
    )
    assert res["steps"] == 2 and res["train_loss"] is not None
    state = load_checkpoint(res["checkpoint"])["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    backbone = load_backbone(res["checkpoint"])[0]
    stored = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    assert stored.keys() == backbone.state_dict().keys()
