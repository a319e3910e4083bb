"""Named head factories (ssl_vision/nn/heads.py) and the state_dict keys of every objective.

The keys and shapes below are those the objectives have always written into checkpoints (``objective.<key>``), for a
6-d feature backbone (the conv backbone below) and small heads; a change to any of them breaks loading every
checkpoint trained before it, so a refactoring of heads, EMA copies or memories must leave this list as it is.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_vision.backbones import create_backbone
from ssl_vision.nn import heads
from ssl_vision.objectives import build_objective


def conv_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


#: (method, kwargs) per case of KEYS
BUILD = {
    "simclr": ("simclr", dict(proj_hidden_dim=7, proj_out_dim=5, proj_layers=3)),
    "simclr2": ("simclr", dict(proj_hidden_dim=7, proj_out_dim=5, proj_layers=2)),
    "moco_v1": ("moco_v1", dict(head="linear", embed_dim=5, queue_size=32)),
    "moco_v2": ("moco_v2", dict(embed_dim=5, proj_hidden_dim=7, queue_size=32)),
    "moco_v3": ("moco_v3", dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9)),
    "moco_v3b": (
        "moco_v3",
        dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9, proj_layers=3, pred_last_bn=True),
    ),
    "byol": ("byol", dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9)),
    "simsiam": ("simsiam", dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9)),
    "simsiam2": ("simsiam", dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9, proj_layers=2)),
    "swav": ("swav", dict(num_prototypes=7, proj_hidden_dim=12, proj_out_dim=5, queue_length=8)),
    "dino": ("dino", dict(out_dim=10, hidden_dim=12, bottleneck_dim=4, head_layers=3)),
    "dinobn": (
        "dino",
        dict(out_dim=10, hidden_dim=12, bottleneck_dim=4, head_layers=3, use_bn_in_head=True, norm_last_layer=False),
    ),
    "instdisc": ("instdisc", dict(embed_dim=5, nce_k=3, num_samples=20)),
    "instdisc_bn": ("instdisc", dict(embed_dim=5, nce_k=3, num_samples=20, head_bn=True)),
    "mae_vit": ("mae", dict(decoder_dim=8, decoder_depth=1, decoder_heads=2)),
    "moco_v3_vit": ("moco_v3", dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9)),
}

#: "key:shape" in state_dict order ("-" = a 0-d tensor), as checkpoints hold them
KEYS = {
    "simclr": (
        "projector.0.weight:7x6 projector.1.weight:7 projector.1.bias:7 projector.1.running_mean:7 "
        "projector.1.running_var:7 projector.1.num_batches_tracked:- projector.3.weight:7x7 "
        "projector.4.weight:7 projector.4.bias:7 projector.4.running_mean:7 projector.4.running_var:7 "
        "projector.4.num_batches_tracked:- projector.6.weight:5x7 projector.7.weight:5 "
        "projector.7.bias:5 projector.7.running_mean:5 projector.7.running_var:5 "
        "projector.7.num_batches_tracked:- "
    ),
    "simclr2": (
        "projector.0.weight:7x6 projector.1.weight:7 projector.1.bias:7 projector.1.running_mean:7 "
        "projector.1.running_var:7 projector.1.num_batches_tracked:- projector.3.weight:5x7 "
        "projector.4.weight:5 projector.4.bias:5 projector.4.running_mean:5 projector.4.running_var:5 "
        "projector.4.num_batches_tracked:- "
    ),
    "moco_v1": (
        "ema_step:- head.weight:5x6 head.bias:5 key_head.weight:5x6 key_head.bias:5 queue.queue:5x32 "
        "queue.ptr:- key_backbone.0.weight:6x3x3x3 key_backbone.0.bias:6 key_backbone.1.weight:6 "
        "key_backbone.1.bias:6 key_backbone.1.running_mean:6 key_backbone.1.running_var:6 "
        "key_backbone.1.num_batches_tracked:- "
    ),
    "moco_v2": (
        "ema_step:- head.0.weight:7x6 head.0.bias:7 head.2.weight:5x7 head.2.bias:5 "
        "key_head.0.weight:7x6 key_head.0.bias:7 key_head.2.weight:5x7 key_head.2.bias:5 "
        "queue.queue:5x32 queue.ptr:- key_backbone.0.weight:6x3x3x3 key_backbone.0.bias:6 "
        "key_backbone.1.weight:6 key_backbone.1.bias:6 key_backbone.1.running_mean:6 "
        "key_backbone.1.running_var:6 key_backbone.1.num_batches_tracked:- "
    ),
    "moco_v3": (
        "ema_step:- projector.0.weight:12x6 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:5x12 projector.4.running_mean:5 projector.4.running_var:5 "
        "projector.4.num_batches_tracked:- predictor.0.weight:9x5 predictor.1.weight:9 "
        "predictor.1.bias:9 predictor.1.running_mean:9 predictor.1.running_var:9 "
        "predictor.1.num_batches_tracked:- predictor.3.weight:5x9 momentum_projector.0.weight:12x6 "
        "momentum_projector.1.weight:12 momentum_projector.1.bias:12 "
        "momentum_projector.1.running_mean:12 momentum_projector.1.running_var:12 "
        "momentum_projector.1.num_batches_tracked:- momentum_projector.3.weight:5x12 "
        "momentum_projector.4.running_mean:5 momentum_projector.4.running_var:5 "
        "momentum_projector.4.num_batches_tracked:- momentum_backbone.0.weight:6x3x3x3 "
        "momentum_backbone.0.bias:6 momentum_backbone.1.weight:6 momentum_backbone.1.bias:6 "
        "momentum_backbone.1.running_mean:6 momentum_backbone.1.running_var:6 "
        "momentum_backbone.1.num_batches_tracked:- "
    ),
    "moco_v3b": (
        "ema_step:- projector.0.weight:12x6 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:12x12 projector.4.weight:12 projector.4.bias:12 "
        "projector.4.running_mean:12 projector.4.running_var:12 projector.4.num_batches_tracked:- "
        "projector.6.weight:5x12 projector.7.running_mean:5 projector.7.running_var:5 "
        "projector.7.num_batches_tracked:- predictor.0.weight:9x5 predictor.1.weight:9 "
        "predictor.1.bias:9 predictor.1.running_mean:9 predictor.1.running_var:9 "
        "predictor.1.num_batches_tracked:- predictor.3.weight:5x9 predictor.4.running_mean:5 "
        "predictor.4.running_var:5 predictor.4.num_batches_tracked:- momentum_projector.0.weight:12x6 "
        "momentum_projector.1.weight:12 momentum_projector.1.bias:12 "
        "momentum_projector.1.running_mean:12 momentum_projector.1.running_var:12 "
        "momentum_projector.1.num_batches_tracked:- momentum_projector.3.weight:12x12 "
        "momentum_projector.4.weight:12 momentum_projector.4.bias:12 "
        "momentum_projector.4.running_mean:12 momentum_projector.4.running_var:12 "
        "momentum_projector.4.num_batches_tracked:- momentum_projector.6.weight:5x12 "
        "momentum_projector.7.running_mean:5 momentum_projector.7.running_var:5 "
        "momentum_projector.7.num_batches_tracked:- momentum_backbone.0.weight:6x3x3x3 "
        "momentum_backbone.0.bias:6 momentum_backbone.1.weight:6 momentum_backbone.1.bias:6 "
        "momentum_backbone.1.running_mean:6 momentum_backbone.1.running_var:6 "
        "momentum_backbone.1.num_batches_tracked:- "
    ),
    "byol": (
        "projector.0.weight:12x6 projector.0.bias:12 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:5x12 predictor.0.weight:9x5 predictor.0.bias:9 predictor.1.weight:9 "
        "predictor.1.bias:9 predictor.1.running_mean:9 predictor.1.running_var:9 "
        "predictor.1.num_batches_tracked:- predictor.3.weight:5x9 target_backbone.0.weight:6x3x3x3 "
        "target_backbone.0.bias:6 target_backbone.1.weight:6 target_backbone.1.bias:6 "
        "target_backbone.1.running_mean:6 target_backbone.1.running_var:6 "
        "target_backbone.1.num_batches_tracked:- target_projector.0.weight:12x6 "
        "target_projector.0.bias:12 target_projector.1.weight:12 target_projector.1.bias:12 "
        "target_projector.1.running_mean:12 target_projector.1.running_var:12 "
        "target_projector.1.num_batches_tracked:- target_projector.3.weight:5x12 "
    ),
    "simsiam": (
        "projector.0.weight:12x6 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:12x12 projector.4.weight:12 projector.4.bias:12 "
        "projector.4.running_mean:12 projector.4.running_var:12 projector.4.num_batches_tracked:- "
        "projector.6.weight:5x12 projector.6.bias:5 projector.7.running_mean:5 "
        "projector.7.running_var:5 projector.7.num_batches_tracked:- predictor.0.weight:9x5 "
        "predictor.1.weight:9 predictor.1.bias:9 predictor.1.running_mean:9 predictor.1.running_var:9 "
        "predictor.1.num_batches_tracked:- predictor.3.weight:5x9 predictor.3.bias:5 "
    ),
    "simsiam2": (
        "projector.0.weight:12x6 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:5x12 projector.3.bias:5 projector.4.running_mean:5 "
        "projector.4.running_var:5 projector.4.num_batches_tracked:- predictor.0.weight:9x5 "
        "predictor.1.weight:9 predictor.1.bias:9 predictor.1.running_mean:9 predictor.1.running_var:9 "
        "predictor.1.num_batches_tracked:- predictor.3.weight:5x9 predictor.3.bias:5 "
    ),
    "swav": (
        "queue:2x8x5 queue_fill:- projector.0.weight:12x6 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:5x12 projector.3.bias:5 prototypes.weight:7x5 "
    ),
    "dino": (
        "center:1x10 head.mlp.0.weight:12x6 head.mlp.0.bias:12 head.mlp.2.weight:12x12 "
        "head.mlp.2.bias:12 head.mlp.4.weight:4x12 head.mlp.4.bias:4 head.last_layer.weight_v:10x4 "
        "head.last_layer.weight_g:10x1 teacher_backbone.0.weight:6x3x3x3 teacher_backbone.0.bias:6 "
        "teacher_backbone.1.weight:6 teacher_backbone.1.bias:6 teacher_backbone.1.running_mean:6 "
        "teacher_backbone.1.running_var:6 teacher_backbone.1.num_batches_tracked:- "
        "teacher_head.mlp.0.weight:12x6 teacher_head.mlp.0.bias:12 teacher_head.mlp.2.weight:12x12 "
        "teacher_head.mlp.2.bias:12 teacher_head.mlp.4.weight:4x12 teacher_head.mlp.4.bias:4 "
        "teacher_head.last_layer.weight_v:10x4 teacher_head.last_layer.weight_g:10x1 "
    ),
    "dinobn": (
        "center:1x10 head.mlp.0.weight:12x6 head.mlp.1.weight:12 head.mlp.1.bias:12 "
        "head.mlp.1.running_mean:12 head.mlp.1.running_var:12 head.mlp.1.num_batches_tracked:- "
        "head.mlp.3.weight:12x12 head.mlp.4.weight:12 head.mlp.4.bias:12 head.mlp.4.running_mean:12 "
        "head.mlp.4.running_var:12 head.mlp.4.num_batches_tracked:- head.mlp.6.weight:4x12 "
        "head.mlp.6.bias:4 head.last_layer.weight_v:10x4 head.last_layer.weight_g:10x1 "
        "teacher_backbone.0.weight:6x3x3x3 teacher_backbone.0.bias:6 teacher_backbone.1.weight:6 "
        "teacher_backbone.1.bias:6 teacher_backbone.1.running_mean:6 teacher_backbone.1.running_var:6 "
        "teacher_backbone.1.num_batches_tracked:- teacher_head.mlp.0.weight:12x6 "
        "teacher_head.mlp.1.weight:12 teacher_head.mlp.1.bias:12 teacher_head.mlp.1.running_mean:12 "
        "teacher_head.mlp.1.running_var:12 teacher_head.mlp.1.num_batches_tracked:- "
        "teacher_head.mlp.3.weight:12x12 teacher_head.mlp.4.weight:12 teacher_head.mlp.4.bias:12 "
        "teacher_head.mlp.4.running_mean:12 teacher_head.mlp.4.running_var:12 "
        "teacher_head.mlp.4.num_batches_tracked:- teacher_head.mlp.6.weight:4x12 "
        "teacher_head.mlp.6.bias:4 teacher_head.last_layer.weight_v:10x4 "
        "teacher_head.last_layer.weight_g:10x1 "
    ),
    "instdisc": ("bank:20x5 z:- z_set:- head.weight:5x6 head.bias:5 "),
    "instdisc_bn": (
        "bank:20x5 z:- z_set:- head.0.weight:5x6 head.1.weight:5 head.1.bias:5 head.1.running_mean:5 "
        "head.1.running_var:5 head.1.num_batches_tracked:- "
    ),
    "mae_vit": (
        "mask_token:1x1x8 decoder_embed.weight:8x192 decoder_embed.bias:8 "
        "decoder_blocks.0.norm1.weight:8 decoder_blocks.0.norm1.bias:8 "
        "decoder_blocks.0.attn.qkv.weight:24x8 decoder_blocks.0.attn.qkv.bias:24 "
        "decoder_blocks.0.attn.proj.weight:8x8 decoder_blocks.0.attn.proj.bias:8 "
        "decoder_blocks.0.norm2.weight:8 decoder_blocks.0.norm2.bias:8 "
        "decoder_blocks.0.mlp.fc1.weight:32x8 decoder_blocks.0.mlp.fc1.bias:32 "
        "decoder_blocks.0.mlp.fc2.weight:8x32 decoder_blocks.0.mlp.fc2.bias:8 decoder_norm.weight:8 "
        "decoder_norm.bias:8 decoder_pred.weight:49x8 decoder_pred.bias:49 "
    ),
    "moco_v3_vit": (
        "ema_step:- projector.0.weight:12x192 projector.1.weight:12 projector.1.bias:12 "
        "projector.1.running_mean:12 projector.1.running_var:12 projector.1.num_batches_tracked:- "
        "projector.3.weight:5x12 projector.4.running_mean:5 projector.4.running_var:5 "
        "projector.4.num_batches_tracked:- predictor.0.weight:9x5 predictor.1.weight:9 "
        "predictor.1.bias:9 predictor.1.running_mean:9 predictor.1.running_var:9 "
        "predictor.1.num_batches_tracked:- predictor.3.weight:5x9 momentum_projector.0.weight:12x192 "
        "momentum_projector.1.weight:12 momentum_projector.1.bias:12 "
        "momentum_projector.1.running_mean:12 momentum_projector.1.running_var:12 "
        "momentum_projector.1.num_batches_tracked:- momentum_projector.3.weight:5x12 "
        "momentum_projector.4.running_mean:5 momentum_projector.4.running_var:5 "
        "momentum_projector.4.num_batches_tracked:- "
    ),
}


def build(case: str):
    method, kwargs = BUILD[case]
    kwargs = dict(kwargs)
    if case.endswith("_vit"):  # a ViT backbone (its own keys, and MoCo v3's copy of it, left out of the list)
        backbone, dim = create_backbone("vit_tiny", in_chans=1, image_size=28, patch_size=7)
    else:
        backbone, dim = conv_backbone(), 6
    num_samples = kwargs.pop("num_samples", None)
    obj = build_objective(method, dim, num_samples=num_samples, **kwargs)
    obj.bind(backbone)
    return obj


@pytest.mark.parametrize("case", sorted(BUILD))
def test_state_dict_keys_and_shapes_are_those_of_old_checkpoints(case):
    state = build(case).state_dict()
    got = " ".join(
        f"{k}:{'x'.join(map(str, v.shape)) or '-'}"
        for k, v in state.items()
        if not (case == "moco_v3_vit" and k.startswith("momentum_backbone."))
    )
    assert got.split() == KEYS[case].split()
    # and such a checkpoint loads into a freshly built objective, strictly
    build(case).load_state_dict(state, strict=True)


def _same_modules(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (
        list(sa) == list(sb)
        and all(torch.equal(sa[k], sb[k]) for k in sa)
        and [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
        and [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    )


@pytest.mark.parametrize(
    "method,kwargs,attr,factory",
    [
        ("simclr", dict(proj_hidden_dim=7, proj_out_dim=5), "projector", lambda: heads.simclr_projector(6, 7, 5)),
        ("moco_v1", dict(head="linear", embed_dim=5, queue_size=32), "head", lambda: heads.moco_v1_head(6, 5)),
        (
            "moco_v2",
            dict(embed_dim=5, proj_hidden_dim=7, queue_size=32),
            "head",
            lambda: heads.moco_v2_projector(6, 7, 5),
        ),
        (
            "moco_v3",
            dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9),
            "projector",
            lambda: heads.moco_v3_projector(6, 12, 5),
        ),
        (
            "byol",
            dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9),
            "projector",
            lambda: heads.byol_mlp(6, 12, 5),
        ),
        (
            "simsiam",
            dict(proj_hidden_dim=12, proj_out_dim=5, pred_hidden_dim=9),
            "projector",
            lambda: heads.simsiam_projector(6, 12, 5),
        ),
        (
            "swav",
            dict(num_prototypes=7, proj_hidden_dim=12, proj_out_dim=5),
            "projector",
            lambda: heads.swav_projector(6, 12, 5),
        ),
    ],
)
def test_objectives_build_their_heads_with_the_named_factories(method, kwargs, attr, factory):
    torch.manual_seed(3)
    obj = build_objective(method, 6, **kwargs)
    torch.manual_seed(3)
    assert _same_modules(getattr(obj, attr), factory())


def test_the_factories_have_the_papers_layouts():
    # SimSiam: BN after every fc of the projector, its output fc without ReLU; the predictor's output fc bare
    proj, pred = heads.simsiam_projector(8, 16, 4), heads.simsiam_predictor(4, 2)
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert not proj[-1].affine and not proj[-2].bias.requires_grad
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear] and pred[-1].bias is not None
    # MoCo v2: 2-layer MLP with ReLU, no BN; MoCo v3: BN in every layer, the last without affine, no biases
    assert [type(m) for m in heads.moco_v2_projector(8, 16, 4)] == [nn.Linear, nn.ReLU, nn.Linear]
    v3 = heads.moco_v3_projector(8, 16, 4, num_layers=3)
    assert [type(m) for m in v3] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert all(m.bias is None for m in v3 if isinstance(m, nn.Linear)) and not v3[-1].affine
    assert isinstance(heads.moco_v3_predictor(4, 16, 4, last_bn=True)[-1], nn.BatchNorm1d)
    assert isinstance(heads.moco_v3_predictor(4, 16, 4)[-1], nn.Linear)
    # BYOL: Linear(bias) → BN → ReLU → Linear(no bias), 4096 → 256 by default
    byol = heads.byol_mlp(8)
    assert (byol[0].out_features, byol[3].out_features, byol[3].bias) == (4096, 256, None)
    # SimCLR: weights N(0, 0.01), last BN without shift (frozen β)
    torch.manual_seed(0)
    simclr = heads.simclr_projector(512, 512, 128)
    assert abs(float(simclr[0].weight.detach().std()) - 0.01) < 1e-3 and not simclr[-1].bias.requires_grad
    assert isinstance(heads.instdisc_head(8, 4), nn.Linear) and isinstance(
        heads.instdisc_head(8, 4, bn=True)[1], nn.BatchNorm1d
    )
