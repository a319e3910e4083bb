"""One factory for every backbone: torchvision ResNets and any timm model by name.

``create_backbone(name, ...) -> (module, feature_dim)``; the module maps images (B, C, H, W) to features
(B, feature_dim) with no classifier. Architecture-specific branching happens here and nowhere else.
"""

from __future__ import annotations

import timm
from torch import nn
from torchvision.models import resnet as tv_resnet

#: torchvision ResNets by name; everything else goes to timm.
TORCHVISION_RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
}
#: short ViT names -> timm model names (img_size / patch_size / in_chans are overridden from the data).
VIT_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_l": "vit_large_patch16_224",
}
#: images up to this side get the small-image ResNet stem (3x3 stride-1 conv, no max-pool; CIFAR convention).
SMALL_STEM_MAX_SIZE = 64


class _ScaledResNet(tv_resnet.ResNet):
    """torchvision ResNet with stage widths ``channels`` instead of (64, 128, 256, 512).

    torchvision hard-codes the widths in ``__init__``; scaling ``planes`` in ``_make_layer`` (and rebuilding
    the stem afterwards) keeps its block code, init and state-dict key names.
    """

    def __init__(self, block, layers, channels: list[int], **kw):
        self._channels = list(channels)
        self._stage = 0
        super().__init__(block, layers, **kw)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # noqa: D401 - torchvision API
        if self._stage == 0:
            self.inplanes = self._channels[0]  # the stem's width feeds layer1
        planes = self._channels[self._stage]
        self._stage += 1
        return super()._make_layer(block, planes, blocks, stride, dilate)


def _resnet(
    name: str,
    in_chans: int,
    image_size: int,
    width: float,
    channels: list[int] | None,
    small_stem: bool | str,
    zero_init_residual: bool,
) -> tuple[nn.Module, int]:
    block, layers = TORCHVISION_RESNETS[name]
    if channels is None:
        channels = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    if len(channels) != 4:
        raise ValueError(f"backbone.channels must list 4 stage widths, got {channels}")
    model = _ScaledResNet(block, layers, channels, zero_init_residual=zero_init_residual)
    use_small = image_size <= SMALL_STEM_MAX_SIZE if small_stem == "auto" else bool(small_stem)
    if use_small:  # CIFAR stem (docs/reference.md §0.5): keep resolution for tiny images
        model.conv1 = nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, channels[0], 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(channels[0])
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    feature_dim = channels[3] * block.expansion
    model.fc = nn.Identity()
    return model, feature_dim


def auto_patch_size(image_size: int) -> int:
    """Largest common patch size giving a token grid of at least 7x7 (16 for 224 px, 8 for 96, 4 for 32/28)."""
    for p in (16, 14, 8, 7, 4, 2):
        if image_size % p == 0 and image_size // p >= 7:
            return p
    raise ValueError(
        f"no patch size in (16, 14, 8, 7, 4, 2) divides image size {image_size} with >= 7 patches; "
        f"set backbone.patch_size explicitly"
    )


def _timm(
    name: str, in_chans: int, image_size: int, patch_size: int | str | None, drop_path_rate: float, extra: dict
) -> tuple[nn.Module, int]:
    timm_name = VIT_ALIASES.get(name, name.removeprefix("timm:"))
    if not timm.is_model(timm_name):
        valid = sorted(TORCHVISION_RESNETS) + sorted(VIT_ALIASES)
        raise ValueError(
            f"unknown backbone {name!r}: not a torchvision ResNet ({', '.join(sorted(TORCHVISION_RESNETS))}), "
            f"a ViT alias ({', '.join(sorted(VIT_ALIASES))}) or a timm model name; valid short names: {valid}"
        )
    kw = dict(num_classes=0, in_chans=in_chans, pretrained=False, **extra)
    if "vit" in timm_name or "deit" in timm_name:
        # ViTs adapt to the data: the image size comes from data config, the patch size from it unless set.
        p = auto_patch_size(image_size) if patch_size in (None, "auto") else int(patch_size)
        if image_size % p:
            raise ValueError(f"backbone.patch_size={p} does not divide data.image_size={image_size}")
        kw.update(
            img_size=image_size,
            patch_size=p,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            dynamic_img_pad=True,
        )  # multi-crop sizes need not be multiples of the patch
    model = timm.create_model(timm_name, **kw)
    return model, int(model.num_features)


def create_backbone(
    name: str,
    in_chans: int = 3,
    image_size: int = 224,
    width: float = 1.0,
    channels: list[int] | None = None,
    small_stem: bool | str = "auto",
    zero_init_residual: bool = False,
    patch_size: int | str | None = "auto",
    drop_path_rate: float = 0.0,
    timm_kwargs: dict | None = None,
) -> tuple[nn.Module, int]:
    """Build a feature extractor (B, C, H, W) -> (B, feature_dim).

    Args:
        name: ``resnet18|34|50|101`` (torchvision), a ViT alias (``vit_tiny``, ``vit_small``, ``vit_b``...), or any
            timm model name (optionally prefixed ``timm:``).
        in_chans / image_size: from the data config; the ResNet stem and ViT patch grid adapt to them.
        width / channels: CPU-scale ResNets (stage widths ``round(c·width)`` or an explicit list of 4).
        small_stem: ``"auto"`` picks the 3x3 stride-1 stem without max-pool for images <= 64 px.
        zero_init_residual: zero the last BN of each residual block (MoCo v3 / SimSiam ResNet-50).
        patch_size: ViT patch size, ``"auto"`` (see :func:`auto_patch_size`).
    """
    if name in TORCHVISION_RESNETS:
        return _resnet(name, in_chans, image_size, width, channels, small_stem, zero_init_residual)
    if width != 1.0 or channels is not None:
        raise ValueError(f"backbone.width/channels apply to torchvision ResNets only, not {name!r}")
    return _timm(name, in_chans, image_size, patch_size, drop_path_rate, dict(timm_kwargs or {}))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_vit(module: nn.Module) -> bool:
    return hasattr(module, "patch_embed") and hasattr(module, "blocks")
