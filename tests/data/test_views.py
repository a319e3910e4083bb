"""Views: preset shapes and order, one-channel handling, blur kernel, determinism, eval transform."""

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

import ssl_vision  # noqa: F401  (registers the config schema the presets merge onto)

from ssl_vision.data.views import (
    ViewSpec,
    blur_kernel_size,
    build_eval_transform,
    build_multiview,
    build_view_transform,
)

AUGMENT_DIR = Path(__file__).resolve().parents[2] / "conf" / "augment"
RGB_STATS = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


@functools.lru_cache(maxsize=None)
def _composed_augment(name: str) -> dict:
    """``augment=<name>`` as Hydra composes it (the preset on its ViewSpec schema), with a ViT so that no backbone
    family's crops (conf/augment_recipe/) are merged on top."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(AUGMENT_DIR.parent), version_base="1.3"):
            cfg = compose("pretrain", overrides=[f"augment={name}", "backbone=vit_small"])
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.augment, resolve=True)


def preset(name: str) -> list[dict]:
    """The preset's views in order (``augment.views`` is a mapping name -> view)."""
    return list(_composed_augment(name)["views"].values())


def image(size: int = 32, mode: str = "RGB", seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels).convert(mode)


def flat_ops(transform) -> list:
    """All ops of a Compose, looking inside RandomApply."""
    out = []
    for op in transform.transforms:
        out.extend(op.transforms if isinstance(op, T.RandomApply) else [op])
    return out


def test_simclr_gives_two_full_size_views():
    views = build_multiview(preset("simclr"), 32, 3, *RGB_STATS)(image())
    assert len(views) == 2
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])  # two independent draws


def test_multicrop_orders_global_then_smaller_local_crops():
    views = build_multiview(preset("multicrop"), 224, 3, *RGB_STATS)(image(64))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    small = build_multiview(preset("dino"), 32, 3, *RGB_STATS)(image(32))
    assert [v.shape[-1] for v in small] == [32, 32] + [round(32 * 96 / 224)] * 8


def test_views_must_be_ordered_large_to_small():
    local, global_ = ViewSpec(size_ratio=0.5), ViewSpec()
    with pytest.raises(ValueError, match="large -> small"):
        build_multiview([local, global_], 32, 3, *RGB_STATS)


def test_one_channel_views_have_one_channel_and_no_colour_ops():
    for name in ("simclr", "moco_v1", "dino"):
        mv = build_multiview(preset(name), 28, 1, [0.286], [0.353])
        for v in mv(image(28, "L")):
            assert v.shape[0] == 1
        for transform in mv.transforms:
            ops = flat_ops(transform)
            assert not any(isinstance(op, T.Grayscale) for op in ops)
            assert not any(isinstance(op, T.RandomGrayscale) for op in ops)
            jitters = [op for op in ops if isinstance(op, T.ColorJitter)]
            assert jitters and all(j.saturation is None and j.hue is None for j in jitters)
            assert all(j.brightness is not None and j.contrast is not None for j in jitters)


def test_rgb_input_becomes_one_channel_and_gray_input_three():
    rgb_to_l = build_view_transform(ViewSpec(), 32, 1, [0.5], [0.25])(image(32, "RGB"))
    l_to_rgb = build_view_transform(ViewSpec(), 32, 3, [0.5], [0.25])(image(32, "L"))  # 1 stat broadcast
    assert rgb_to_l.shape == (1, 32, 32) and l_to_rgb.shape == (3, 32, 32)


def test_rgb_pipeline_follows_paper_order():
    ops = flat_ops(build_view_transform(ViewSpec.from_dict(preset("dino")[1]), 32, 3, *RGB_STATS))
    kinds = [type(op).__name__ for op in ops]
    assert kinds[1:] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "RandomGrayscale",
        "GaussianBlur",
        "RandomSolarize",
        "ToTensor",
        "Normalize",
    ]
    moco = [
        type(op).__name__
        for op in flat_ops(build_view_transform(ViewSpec.from_dict(preset("moco_v1")[0]), 32, 3, *RGB_STATS))
    ]
    assert moco.index("RandomGrayscale") < moco.index("ColorJitter")  # MoCo v1: grayscale before jitter
    assert "GaussianBlur" not in moco


def test_zero_probability_ops_are_left_out():
    ops = flat_ops(build_view_transform(ViewSpec.from_dict(preset("mae")[0]), 32, 3, *RGB_STATS))
    kinds = {type(op).__name__ for op in ops}
    assert kinds.isdisjoint({"ColorJitter", "RandomGrayscale", "GaussianBlur", "RandomSolarize"})
    assert "RandomHorizontalFlip" in kinds


@pytest.mark.parametrize("side", [13, 28, 32, 96, 224])
def test_blur_kernel_is_odd_and_about_ten_percent(side):
    k = blur_kernel_size(side)
    assert k % 2 == 1 and k >= 3 and abs(k - 0.1 * side) <= 2
    blur = next(
        op
        for op in flat_ops(build_view_transform(ViewSpec(blur_p=0.5), side, 3, *RGB_STATS))
        if isinstance(op, T.GaussianBlur)
    )
    assert blur.kernel_size == (k, k) and blur.sigma == (0.1, 2.0)
    assert blur_kernel_size(224) == 23  # SimCLR: 10% of 224, made odd


def test_none_preset_is_deterministic():
    mv = build_multiview(preset("none"), 32, 3, *RGB_STATS)
    img = image(32)
    torch.manual_seed(0)
    first = mv(img)[0]
    torch.manual_seed(1)
    second = mv(img)[0]
    assert torch.equal(first, second)
    expected = T.Normalize(*RGB_STATS)(T.ToTensor()(img))
    assert torch.allclose(first, expected)  # the whole image, untouched


def test_viewspec_from_dict_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="valid keys"):
        ViewSpec.from_dict({"blurr_p": 0.5})
    with pytest.raises(ValueError, match="bilinear"):
        ViewSpec(interpolation="lanczos9")
    with pytest.raises(ValueError, match="blur_p"):
        ViewSpec(blur_p=1.5)
    assert ViewSpec.from_dict({"scale": [0.2, 1.0]}).scale == (0.2, 1.0)


def test_every_augment_preset_composes_onto_the_view_schema_and_builds():
    """Each preset states only what differs from ViewSpec; composed, every view has every field, and builds."""
    fields = {f.name for f in dataclasses.fields(ViewSpec)}
    files = sorted(AUGMENT_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"simclr", "moco_v1", "moco_v2", "byol", "multicrop", "dino", "mae", "none"}
    for path in files:
        raw = yaml.safe_load(path.read_text())
        assert isinstance(raw.get("views", {}), dict), f"{path.name}: views must be a mapping name -> view"
        cfg = _composed_augment(path.stem)
        assert cfg["name"] == path.stem and set(cfg) == {"name", "backend", "views"}
        assert cfg["backend"] in ("per_sample", "batched"), path.name  # augment.backend (data/batched.py)
        assert cfg["views"] and all(set(view) == fields for view in cfg["views"].values()), path.name
        for image_size, in_chans, stats in ((32, 3, RGB_STATS), (28, 1, ([0.3], [0.3]))):
            mv = build_multiview(cfg["views"], image_size, in_chans, *stats)
            views = mv(image(image_size, "RGB" if in_chans == 3 else "L"))
            assert len(views) == sum(v["count"] for v in cfg["views"].values())
            assert all(v.shape[0] == in_chans for v in views)


def test_eval_transform_center_crop_and_passthrough():
    crop = build_eval_transform(224, 3, *RGB_STATS, crop_ratio=0.875)
    resize, center = crop.transforms[1], crop.transforms[2]
    assert resize.size == 256 and center.size == (224, 224)
    assert crop(image(300).resize((400, 300))).shape == (3, 224, 224)
    same = build_eval_transform(32, 1, [0.5], [0.25])
    img = image(32, "L")
    assert torch.allclose(same(img), (T.ToTensor()(img) - 0.5) / 0.25)  # already 32 px: no resampling
    assert same(image(40, "RGB")).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="crop_ratio"):
        build_eval_transform(32, 3, *RGB_STATS, crop_ratio=1.5)


def test_mismatched_stats_are_rejected():
    with pytest.raises(ValueError, match="in_chans=3"):
        build_eval_transform(32, 3, [0.5, 0.5], [0.25, 0.25])


def test_all_randomness_comes_from_torch_rng():
    """Per-sample seeding (reproducible augmentation across workers / resumes) relies on this."""
    mv = build_multiview(preset("dino"), 32, 3, *RGB_STATS)
    img = image(32)
    torch.manual_seed(123)
    first = mv(img)
    torch.manual_seed(123)
    second = mv(img)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
