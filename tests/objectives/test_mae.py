"""MAE: masking, the objective's loss against the formula, encoder sequence length, fixed sin-cos pos-embed added
before masking, decoder un-shuffle, MAE init, timm ViT variants, 1 process == 2 processes with the masks fixed (MAE
draws them per process, so the contract cannot), the effective-batch lr run and the reconstruction PNG. (Smoke runs,
a ResNet refused, resume equality and the non-finite guard: tests/objectives/test_contract.py; patchify and the
masked loss: tests/losses/test_mae.py.)"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_vision.backbones import create_backbone
from ssl_vision.losses.mae import normalize_patches, patchify, unpatchify
from ssl_vision.objectives import StepInfo, build_objective
from ssl_vision.objectives.mae import random_masking
from tests.conftest import FAST
from tests.distributed_harness import average_grads, run_on_processes
from tests.losses.test_mae import masked_mse_by_formula, patchify_by_loops

# End-to-end helpers (ssl_vision.launch, tests.test_pretrain) are imported inside the tests that use them, so the gloo
# worker processes, which import this module, do not pay for Lightning / Hydra start-up.

STEP = StepInfo(global_step=0, total_steps=10, epoch=0, max_epochs=1)
SMALL_DECODER = ["method.kwargs.decoder_dim=32", "method.kwargs.decoder_depth=1", "method.kwargs.decoder_heads=4"]


def make(name="vit_tiny", image=32, patch=8, in_chans=3, **kw):
    """A factory ViT and a bound MAE with a small decoder; identical on every call (and every process)."""
    torch.manual_seed(0)
    backbone, dim = create_backbone(name, in_chans=in_chans, image_size=image, patch_size=patch)
    args = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4)
    args.update(kw)
    obj = build_objective("mae", dim, **args)
    obj.bind(backbone)
    return backbone, obj


# ------------------------------------------------------------------------------------------------ references


def mae_sincos_reference(dim, gh, gw):
    """numpy port of facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed (cls slot = zeros)."""
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)), axis=0)

    def one_dim(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_dim(dim // 2, grid[0]), one_dim(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), emb], axis=0)).float()


def input_of(module):
    """Forward-pre hook that records the first input of ``module``; returns (store, handle)."""
    store = []
    return store, module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


# ------------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("length,ratio", [(16, 0.75), (49, 0.75), (64, 0.5), (10, 0.9)])
def test_random_masking_keep_count_restore_and_mask(length, ratio):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(3, length, 5, generator=g)
    noise = torch.rand(3, length, generator=g)
    visible, mask, ids_restore, ids_keep = random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))
    assert visible.shape == (3, keep, 5) and ids_keep.shape == (3, keep)
    for b in range(3):
        order = sorted(range(length), key=lambda i: float(noise[b, i]))  # smallest noise first
        kept = order[:keep]
        assert ids_keep[b].tolist() == kept
        torch.testing.assert_close(visible[b], x[b, kept])
        # mask in the ORIGINAL order: 1 exactly at the removed patches
        assert mask[b].tolist() == [0.0 if i in kept else 1.0 for i in range(length)]
        assert int(mask[b].sum()) == length - keep
        # ids_restore inverts the shuffle: gathering [visible, removed] with it gives back the original sequence
        shuffled = x[b, order]
        torch.testing.assert_close(shuffled[ids_restore[b]], x[b])


# ------------------------------------------------------------------------------------------------ the objective
def test_objective_loss_matches_formula_on_known_masks():
    backbone, obj = make()
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    out = obj.reconstruct(x, backbone, noise)
    # the test's own mask: the 4 patches with the smallest noise are visible
    mask = torch.ones(3, 16)
    for b in range(3):
        mask[b, noise[b].argsort()[:4]] = 0
    torch.testing.assert_close(out.mask, mask)
    expected = masked_mse_by_formula(out.pred.detach(), patchify_by_loops(x, 8), mask, norm_pix=True)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.pred.shape == (3, 16, 8 * 8 * 3)


def test_encoder_sequence_is_visible_plus_cls():
    backbone, obj = make()
    first, h1 = input_of(backbone.blocks[0])
    last, h2 = input_of(backbone.blocks[-1])
    obj.reconstruct(torch.randn(2, 3, 32, 32), backbone, torch.rand(2, 16))
    assert first[0].shape == (2, 4 + 1, 192) and last[0].shape == (2, 4 + 1, 192)  # int(16·0.25) + cls
    h1.remove(), h2.remove()
    backbone, obj = make(mask_ratio=0.5)
    store, _ = input_of(backbone.blocks[0])
    obj.reconstruct(torch.randn(2, 3, 32, 32), backbone, torch.rand(2, 16))
    assert store[0].shape == (2, 8 + 1, 192)
    # the whole-image timm forward (evaluation) still sees all 16 patches + cls
    store.clear()
    backbone(torch.randn(2, 3, 32, 32))
    assert store[0].shape == (2, 16 + 1, 192)


def test_pos_embed_fixed_sincos_and_added_before_masking():
    backbone, obj = make()
    assert not backbone.pos_embed.requires_grad
    torch.testing.assert_close(backbone.pos_embed[0], mae_sincos_reference(192, 4, 4))
    torch.testing.assert_close(obj.decoder_pos_embed[0], mae_sincos_reference(32, 4, 4))
    assert not any(p is backbone.pos_embed for p in backbone.parameters() if p.requires_grad)
    from ssl_vision.optim import param_groups

    optimised = {id(p) for g in param_groups(backbone.named_parameters(), 0.05) for p in g["params"]}
    assert id(backbone.pos_embed) not in optimised and id(backbone.cls_token) in optimised
    # block 0 input: token j = patch_embed(x) at original position k=ids_keep[j] + pos-embed of k (not of j)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    store, _ = input_of(backbone.blocks[0])
    obj.reconstruct(x, backbone, noise)
    tokens = backbone.patch_embed(x).flatten(1, 2).detach()  # (2, 16, 192), original order
    pos = mae_sincos_reference(192, 4, 4)
    for b in range(2):
        kept = noise[b].argsort()[:4]
        torch.testing.assert_close(store[0][b, 0], backbone.cls_token[0, 0].detach())  # cls pos slot is zero
        torch.testing.assert_close(store[0][b, 1:], tokens[b, kept] + pos[1 + kept])
    loss = obj.reconstruct(x, backbone, noise).loss
    loss.backward()
    assert backbone.pos_embed.grad is None and backbone.cls_token.grad is not None


def test_decoder_fills_mask_tokens_and_unshuffles():
    backbone, obj = make()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    store, _ = input_of(obj.decoder_blocks[0])
    latent, mask, _, _ = obj.encode(x, backbone, noise)
    obj.reconstruct(x, backbone, noise)
    dec_in = store[0] - mae_sincos_reference(32, 4, 4)  # (2, 17, 32) without the decoder pos-embed
    embedded = obj.decoder_embed(latent).detach()  # (2, 1 + 4, 32): cls, visible in keep order
    for b in range(2):
        kept = noise[b].argsort()[:4].tolist()
        torch.testing.assert_close(dec_in[b, 0], embedded[b, 0])
        for i in range(16):
            want = embedded[b, 1 + kept.index(i)] if i in kept else obj.mask_token[0, 0].detach()
            torch.testing.assert_close(dec_in[b, 1 + i], want, msg=f"patch {i}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_mae_initialisation(channels_last):
    torch.manual_seed(0)
    backbone, dim = create_backbone("vit_tiny", in_chans=3, image_size=32, patch_size=8)
    if channels_last:  # perf.channels_last (the default): the patch projection's weight is NHWC, not viewable
        backbone = backbone.to(memory_format=torch.channels_last)
    obj = build_objective("mae", dim, decoder_dim=512, decoder_depth=1, decoder_heads=16)
    obj.bind(backbone)

    def xavier_like(w, fan_in, fan_out):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)

    for module in (backbone, obj):
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                assert xavier_like(m.weight, m.in_features, m.out_features), name
                assert m.bias is None or not m.bias.any(), name
            elif isinstance(m, nn.LayerNorm):
                assert (m.weight == 1).all() and not m.bias.any(), name
    w = backbone.patch_embed.proj.weight  # (192, 3, 8, 8) viewed as (192, 192)
    assert xavier_like(w, 3 * 8 * 8, 192)
    assert abs(backbone.cls_token.std().item() - 0.02) < 0.004  # N(0, 0.02); timm's own is 1e-6
    assert abs(obj.mask_token.std().item() - 0.02) < 0.003


@pytest.mark.parametrize(
    "name,image,patch,chans", [("vit_small", 32, 8, 3), ("vit_tiny", 28, 4, 1), ("timm:test_vit", 28, 7, 1)]
)
def test_factory_vits_train(name, image, patch, chans):
    backbone, obj = make(name, image, patch, chans)
    x = torch.randn(2, chans, image, image)
    out = obj([x], backbone, STEP)
    length = (image // patch) ** 2
    assert torch.isfinite(out.loss) and out.features.shape == (2, backbone.num_features)
    out.loss.backward()
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0 and obj.decoder_pred.weight.grad is not None
    assert obj.decoder_pred.out_features == patch * patch * chans
    assert obj.reconstruct(x, backbone, torch.rand(2, length)).pred.shape == (2, length, patch * patch * chans)


def test_non_vit_and_unsupported_timm_variants_are_clear_errors():
    resnet, dim = create_backbone("resnet18", width=0.125, image_size=32)
    with pytest.raises(ValueError, match="MAE needs a ViT backbone, got .*use backbone=vit_tiny\\|vit_small\\|vit_b"):
        build_objective("mae", dim).bind(resnet)
    for kw, what in [
        ({"reg_tokens": 2}, "register tokens"),
        ({"no_embed_class": True}, "no_embed_class"),
        ({"class_token": False, "global_pool": "avg"}, "no class token"),
    ]:
        vit, dim = create_backbone("vit_tiny", image_size=32, patch_size=8, timm_kwargs=kw)
        with pytest.raises(ValueError, match=what):
            build_objective("mae", dim, decoder_dim=32, decoder_depth=1, decoder_heads=4).bind(vit)
    with pytest.raises(ValueError, match="mask_ratio"):
        build_objective("mae", 192, mask_ratio=1.0)


def test_masking_noise_keyed_by_step_micro_batch_and_seed():
    backbone, obj = make()
    _, twin = make()
    x = torch.randn(4, 3, 32, 32)
    a, a_again = obj.masking_noise(x, STEP), obj.masking_noise(x, STEP)  # two micro-batches of one step
    assert a.shape == (4, 16) and not torch.equal(a, a_again)
    torch.testing.assert_close(twin.masking_noise(x, STEP), a)  # a fresh (resumed) object draws the same
    nxt = StepInfo(global_step=1, total_steps=10, epoch=0, max_epochs=1)
    assert not torch.equal(obj.masking_noise(x, nxt), a)
    _, other_seed = make(mask_seed=1)
    assert not torch.equal(other_seed.masking_noise(x, STEP), a)


# ------------------------------------------------------------------------------------------------ 1 vs 2 processes
def _rank_fn(rank, world, x, noise):
    """Each rank: its slice of the global batch AND of the global masking noise, so the masks match one process."""
    backbone, obj = make()
    n = x.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    out = obj.reconstruct(x[sl], backbone, noise[sl])
    out.loss.backward()
    loss = out.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    grads = average_grads(backbone)
    grads.update({f"obj.{k}": v for k, v in average_grads(obj).items()})
    return {"loss": loss / world, "grads": grads, "own_noise": obj.masking_noise(x[sl], STEP)}


def test_two_processes_equal_one_process():
    """MAE communicates nothing itself (docs/reference.md §11): with the same masks, DDP's gradient average of
    per-rank mean
    losses (equal masked counts per rank) equals the one-process gradient. A ViT has no BatchNorm, so no eval()."""
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(8, 3, 32, 32, generator=g), torch.rand(8, 16, generator=g)
    backbone, obj = make()
    out = obj.reconstruct(x, backbone, noise)
    out.loss.backward()
    ref = {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}
    ref.update({f"obj.{n}": p.grad for n, p in obj.named_parameters() if p.grad is not None})
    results = run_on_processes(_rank_fn, 2, x, noise)
    for r in results:
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(r["grads"]) == set(ref)
        for name, grad in ref.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # left to themselves, ranks draw different masks (noise keyed by rank), rank 0 the one-process masks
    assert not torch.equal(results[0]["own_noise"], results[1]["own_noise"])
    torch.testing.assert_close(results[0]["own_noise"], make()[1].masking_noise(x[:4], STEP))


# ------------------------------------------------------------------------------------------------ end to end
def test_one_step_smoke_lr_by_effective_batch_and_png(make_cfg):
    """The shipped config for one optimizer step of 2 accumulated micro-batches (one run, three checks): it trains;
    AdamW's lr is blr × the EFFECTIVE batch (16 × 2 accumulation) / 256 with betas (0.9, 0.95), wd 0.05 on ≥2-D
    tensors only and the fixed pos-embed in no group; the reconstruction callback writes its PNG into the run dir."""
    import lightning as L

    from ssl_vision.launch import run_pretraining

    seen = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["groups"] = [
                dict(
                    lr=g["initial_lr"],
                    wd=g["weight_decay"],
                    betas=g["betas"],
                    ids={id(p) for p in g["params"]},
                    ndims={p.ndim for p in g["params"]},
                )
                for g in trainer.optimizers[0].param_groups
            ]
            seen["pos"] = id(pl_module.backbone.pos_embed)

    cfg = make_cfg(
        [
            "method=mae",
            "backbone=vit_tiny",
            "backbone.patch_size=8",
            *FAST,
            "trainer.max_steps=1",
            "trainer.accumulate_grad_batches=2",
        ]
    )
    res = run_pretraining(cfg, extra_callbacks=[Grab()])  # method=mae adds the reconstruction callback itself
    assert res["steps"] == 1 and res["images_seen"] == 32  # one optimizer step = 2 micro-batches of 16
    assert res["train_loss"] is not None and math.isfinite(res["train_loss"])
    assert 0.0 <= res["knn_top1"] <= 100.0
    assert len(seen["groups"]) == 4  # backbone / objective × decay / no decay
    for g in seen["groups"]:
        assert g["lr"] == pytest.approx(1.5e-4 * 16 * 2 / 256)  # blr × effective batch / 256
        assert g["betas"] == (0.9, 0.95)
        assert g["wd"] == (0.0 if g["ndims"] == {1} else 0.05)
        assert seen["pos"] not in g["ids"]
    png = Path(res["run_dir"]) / "mae_reconstructions_step1.png"
    w, h = Image.open(png).size  # 8 images × (orig, masked, recon, ...), 32 px enlarged ×3, labels on the left
    assert h == 4 * (96 + 2) + 2 and w > 8 * (96 + 2) + 2


# ------------------------------------------------------------------------------------------------ reconstruction PNG
def test_reconstruction_grid_rows(tmp_path, monkeypatch):
    from ssl_vision.mae_viz import (
        MASK_FILL,
        reconstruction_rows,
        save_reconstruction_grid,
    )

    backbone, obj = make(norm_pix_loss=True)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randn(3, 3, 32, 32) * 0.5
    path = save_reconstruction_grid(obj, backbone, x, tmp_path / "r.png", mean=mean, std=std)
    plain = save_reconstruction_grid(obj, backbone, x, tmp_path / "plain.png", mean=mean, std=std, labels=False)
    assert Image.open(plain).size == (3 * (96 + 2) + 2, 4 * (96 + 2) + 2)  # 32 px enlarged ×3 to >= 96 px
    assert Image.open(path).height == 4 * (96 + 2) + 2 and Image.open(path).width > Image.open(plain).width
    # a perfect norm_pix prediction must come back as the original once de-normalised with each patch's stats
    real = obj.reconstruct

    def perfect(imgs, bb, noise):
        out = real(imgs, bb, noise)
        out.pred = normalize_patches(patchify(imgs, 8))
        return out

    monkeypatch.setattr(obj, "reconstruct", perfect)
    rows = reconstruction_rows(obj, backbone, x, mean=mean, std=std)
    display = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(rows[0], display)
    torch.testing.assert_close(rows[2], display, atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[3], display, atol=1e-4, rtol=0)
    mask = real(x, backbone, torch.rand(3, 16, generator=torch.Generator().manual_seed(0))).mask
    removed = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 192), 8, (4, 4), 3)
    assert (rows[1][removed == 1] == MASK_FILL).all()
    torch.testing.assert_close(rows[1][removed == 0], display[removed == 0])
    assert obj.training and backbone.training  # modes restored
