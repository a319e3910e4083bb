"""The backbone factory: shapes, stems chosen by image size, CPU-scale widths, ViT adapting to the data."""

import pytest
import torch
from torch import nn

from ssl_vision.backbones import auto_patch_size, create_backbone


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_torchvision_resnet_features(name, dim):
    model, d = create_backbone(name, in_chans=3, image_size=64)
    assert d == dim
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_small_stem_chosen_by_image_size_not_dataset():
    small, _ = create_backbone("resnet18", image_size=32)
    big, _ = create_backbone("resnet18", image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2) and isinstance(big.maxpool, nn.MaxPool2d)
    forced, _ = create_backbone("resnet18", image_size=224, small_stem=True)
    assert forced.conv1.kernel_size == (3, 3)


def test_width_multiplier_and_channel_list():
    model, d = create_backbone("resnet18", in_chans=1, image_size=28, width=0.25)
    assert d == 128
    assert model.layer1[0].conv1.in_channels == 16 and model.layer4[0].conv1.out_channels == 128
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 128)
    model, d = create_backbone("resnet50", image_size=32, channels=[8, 16, 32, 64])
    assert d == 64 * 4 and model(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    with pytest.raises(ValueError, match="4 stage widths"):
        create_backbone("resnet18", channels=[8, 16])


def test_width_matches_torchvision_at_one():
    from torchvision.models import resnet18

    ours, _ = create_backbone("resnet18", image_size=224)
    ref = resnet18()
    ref.fc = nn.Identity()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_zero_init_residual():
    model, _ = create_backbone("resnet50", image_size=64, zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0


@pytest.mark.parametrize("size,patch", [(224, 16), (96, 8), (32, 4), (28, 4), (64, 8)])
def test_auto_patch_size(size, patch):
    assert auto_patch_size(size) == patch


def test_vit_adapts_to_data():
    model, d = create_backbone("vit_tiny", in_chans=1, image_size=28)
    assert d == 192 and model.patch_embed.patch_size == (4, 4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 192)
    # smaller crops (multi-crop) go through the same model: position embeddings are interpolated
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 192)
    _, d = create_backbone("vit_b", image_size=32)
    assert d == 768


def test_vit_bad_patch_size_and_unknown_name():
    with pytest.raises(ValueError, match="does not divide"):
        create_backbone("vit_tiny", image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        create_backbone("resnet9000")
    with pytest.raises(ValueError, match="ResNets only"):
        create_backbone("vit_tiny", image_size=32, width=0.5)


def test_any_timm_model_by_name():
    model, d = create_backbone("timm:resnet10t", in_chans=3, image_size=64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, d)
