"""``perf.channels_last``: the backbone's weights go NHWC, the numbers stay those of the default layout."""

from __future__ import annotations

import torch

from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.launch import build_module, run_pretraining
from ssl_vision.training import load_checkpoint
from tests.conftest import FAST

SMALL = ["method=byol", "backbone=resnet18", "backbone.width=0.125", *FAST]


def test_channels_last_weights_same_features(make_cfg):
    torch.manual_seed(0)
    plain = build_module(make_cfg(SMALL))
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
    stored = {k[len("backbone."):]: v for k, v in load_checkpoint(res["checkpoint"])["state_dict"].items()
              if k.startswith("backbone.")}
    loaded = backbone.state_dict()
    assert stored.keys() == loaded.keys()
    for k, v in stored.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
