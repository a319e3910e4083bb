"""ViT surgery in one module (ssl_vision/nn/vit.py): the fixed sin-cos position embedding that MoCo v3 and MAE
each used to write themselves is one function now; both objectives' backbones carry exactly its table, which is
checked here against the formula (MAE util/pos_embed.py, MoCo v3 vits.py) written out element by element."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_vision.backbones import create_backbone
from ssl_vision.nn.vit import (
    check_mae_vit,
    freeze_patch_embed_,
    set_fixed_sincos_pos_embed_,
    sincos_2d_pos_embed,
    sincos_pos_embed_table,
)
from ssl_vision.objectives import build_objective


def sincos_by_formula(gh: int, gw: int, dim: int) -> torch.Tensor:
    """(1 + gh·gw, dim): a zero cls row, then for the patch in row i, column j:
    [sin(j·ω_k)]_k, [cos(j·ω_k)]_k, [sin(i·ω_k)]_k, [cos(i·ω_k)]_k with ω_k = 10000^(−k/(dim/4)), k < dim/4."""
    q = dim // 4
    rows = [[0.0] * dim]
    for i in range(gh):
        for j in range(gw):
            om = [10000.0 ** (-k / q) for k in range(q)]
            rows.append(
                [math.sin(j * w) for w in om]
                + [math.cos(j * w) for w in om]
                + [math.sin(i * w) for w in om]
                + [math.cos(i * w) for w in om]
            )
    return torch.tensor(rows, dtype=torch.float32)


def vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny", in_chans=1, image_size=28, patch_size=7)  # 4x4 grid, dim 192


def test_the_single_function_is_the_formula():
    torch.testing.assert_close(sincos_2d_pos_embed(3, 5, 16, num_prefix_tokens=1), sincos_by_formula(3, 5, 16))
    torch.testing.assert_close(sincos_pos_embed_table((4, 4), 192)[0], sincos_by_formula(4, 4, 192))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(2, 2, 6)


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("moco_v3", dict(proj_hidden_dim=12, proj_out_dim=8, pred_hidden_dim=8)),
        ("mae", dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)),
    ],
)
def test_moco_v3_and_mae_backbones_get_the_same_fixed_table(method, kwargs):
    backbone, dim = vit()
    obj = build_objective(method, dim, **kwargs)
    obj.bind(backbone)
    expected = sincos_by_formula(4, 4, 192)
    torch.testing.assert_close(backbone.pos_embed[0].detach(), expected)
    assert not backbone.pos_embed.requires_grad  # fixed: never in an optimizer
    other, _ = vit()
    set_fixed_sincos_pos_embed_(other)  # the one function both call
    assert torch.equal(other.pos_embed, backbone.pos_embed)
    if method == "moco_v3":  # the teacher starts with the same table
        assert torch.equal(obj.momentum_backbone.pos_embed, backbone.pos_embed)


def test_frozen_patch_projection_and_mae_checks():
    backbone, dim = vit()
    freeze_patch_embed_(backbone)
    w = backbone.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))  # xavier-uniform of the (C·p·p → D) Linear
    assert not w.requires_grad and float(w.abs().max()) <= bound and not backbone.patch_embed.proj.bias.any()
    check_mae_vit(backbone, dim)
    with pytest.raises(ValueError, match="embed_dim 192 != feature_dim 64"):
        check_mae_vit(backbone, 64)
    resnet, _ = create_backbone("resnet18", in_chans=1, image_size=28, width=0.125)
    with pytest.raises(ValueError, match="MAE needs a ViT backbone, got"):
        check_mae_vit(resnet, 64)
