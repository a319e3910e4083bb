"""MAE: masked autoencoders (He et al. 2021, https://arxiv.org/abs/2111.06377; facebookresearch/mae ``models_mae.py``).

The encoder is the backbone factory's timm ViT itself (no private ViT copy): :meth:`MAE.bind` swaps its learned
position embedding for a fixed 2-D sin-cos one and re-initialises it the MAE way; :meth:`MAE.encode` then runs the
timm modules by hand on the *visible* tokens only (``patch_embed`` → + pos-embed → random masking → prepend cls →
``blocks`` → ``norm``), so the encoder's cost really drops with the mask ratio. The light decoder (mask tokens,
un-shuffle, sin-cos pos-embed, timm ``Block``s, per-patch pixel prediction) lives here. Evaluation (kNN, probes)
uses the backbone's ordinary timm forward on whole images, which sees the same fixed pos-embed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.losses.mae import masked_mse, patchify
from ssl_vision.nn.vit import check_mae_vit, init_mae_weights_, mae_init_, sincos_pos_embed_table
from ssl_vision.objectives.base import Objective, ObjectiveOutput, StepInfo, check_count, check_range, register

PROBE_FEATURES = ("full", "visible")


def pos_embed_with_cls(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(1, 1 + gh·gw, dim): a zero slot for the cls token (it carries no position), then the fixed 2-D sin-cos
    embedding of the gh × gw patch grid in MAE's channel layout (:func:`ssl_vision.nn.vit.sincos_pos_embed_table`)."""
    return sincos_pos_embed_table(grid, dim, num_prefix_tokens=1)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Tokens the encoder sees: ``int(L·(1 − ratio))``, MAE's ``len_keep`` (rounded down)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise (MAE ``random_masking``).

    x: (N, L, D) tokens *with* their position embedding already added (positions travel with the tokens).
    noise: (N, L) uniform; the ``keep = int(L·(1 − ratio))`` smallest values are kept.
    Returns ``x_visible`` (N, keep, D), ``mask`` (N, L) in the *original* token order (1 = removed, 0 = kept),
    ``ids_restore`` (N, L) such that gathering ``cat(visible, removed)`` with it restores the original order,
    and ``ids_keep`` (N, keep), the original positions of the visible tokens.
    """
    n, length, d = x.shape
    if noise.shape != (n, length):
        raise ValueError(f"masking noise must be (N, L) = {(n, length)}, got {tuple(noise.shape)}")
    keep = num_visible(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # inverse permutation
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # shuffled order -> original order
    return x_visible, mask, ids_restore, ids_keep


@dataclass
class MAEOutput:
    """One masked reconstruction: loss (scalar), pred (N, L, p²C), mask (N, L; 1 = removed), latent (N, 1+keep, D)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    latent: torch.Tensor


@register("mae")
class MAE(Objective):
    """Masked autoencoder on a timm ViT backbone: encode the visible 1 − ``mask_ratio`` of the patches, decode all.

    ``probe_features``: what :class:`ObjectiveOutput` ``.features`` (the online probe's input) holds.
    ``"full"`` (default) runs the backbone's ordinary timm forward on the *un-masked* image under no_grad -- the
    same features kNN and the linear probe see, at the cost of one extra inference forward per step; ``"visible"``
    reuses the cls token of the masked encoder pass (free, but a feature of 25 % of the image).
    ``embedding`` is the cls token of the masked pass. No collapse monitor (``collapse_monitor = None``): nothing in
    MAE's loss asks any output to spread over the sphere (the cls token's normalised std falls to ~0.003 within 40
    steps on Fashion-MNIST while the model learns), and a constant representation cannot reconstruct the pixels:
    the reconstruction loss and the kNN are the signals to read.
    ``mask_seed`` seeds the masking noise, drawn per (rank, optimizer step, micro-batch) so ranks mask
    independently and a resumed run draws exactly the masks the uninterrupted one would.
    """

    num_views = 1
    collapse_monitor = None  # see the class docstring
    supported_families = ("vit",)
    world_size_invariant = False  # masks are drawn per process (keyed by rank)

    @classmethod
    def tiny_kwargs(cls) -> dict:
        return {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}

    def __init__(
        self,
        feature_dim: int,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        probe_features: str = "full",
        mask_seed: int = 0,
    ):
        super().__init__()
        check_range(
            "mask_ratio",
            mask_ratio,
            0.0,
            1.0,
            low_open=True,
            high_open=True,
            note="the fraction of patches removed; the loss is on removed patches only; MAE: 0.75",
        )
        check_count("decoder_dim", decoder_dim, note="MAE: 512")
        check_count("decoder_depth", decoder_depth, note="MAE: 8")
        check_count("decoder_heads", decoder_heads, note="MAE: 16")
        check_range("decoder_mlp_ratio", decoder_mlp_ratio, 0.0, math.inf, low_open=True, note="MAE: 4.0")
        if decoder_dim % decoder_heads:
            raise ValueError(
                f"method.kwargs.decoder_dim={decoder_dim} must be divisible by "
                f"decoder_heads={decoder_heads} (MAE: 512 and 16)"
            )
        if probe_features not in PROBE_FEATURES:
            raise ValueError(f"method.kwargs.probe_features must be one of {PROBE_FEATURES}, got {probe_features!r}")
        self.feature_dim, self.mask_ratio, self.norm_pix_loss = feature_dim, mask_ratio, norm_pix_loss
        self.decoder_dim, self.probe_features, self.mask_seed = decoder_dim, probe_features, mask_seed
        self.decoder_embed = nn.Linear(feature_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))  # one token shared by all removed patches
        norm = partial(nn.LayerNorm, eps=1e-6)  # MAE's norm_layer
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred: nn.Linear | None = None  # decoder_dim -> p²·C, built in bind (needs the patch size)
        self.patch_size = self.in_chans = 0
        self.grid: tuple[int, int] = (0, 0)
        self._micro = (-1, 0)  # (global_step, micro-batch index) of the last draw: the masking-noise key

    # ----------------------------------------------------------------------------------------- setup
    def bind(self, backbone: nn.Module) -> None:
        """Check the ViT, fix its pos-embed to 2-D sin-cos, MAE-initialise it, and build the pixel head."""
        self._check_backbone(backbone)
        pe = backbone.patch_embed
        self.patch_size, self.in_chans = int(pe.patch_size[0]), int(pe.proj.in_channels)
        self.grid = (int(pe.grid_size[0]), int(pe.grid_size[1]))
        length = self.grid[0] * self.grid[1]
        keep = num_visible(length, self.mask_ratio)
        if not 1 <= keep < length:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} on a {self.grid[0]}x{self.grid[1]} patch grid leaves {keep} "
                f"of {length} patches visible; need 1..{length - 1}"
            )
        # MAE init, fixed (not learned: requires_grad=False, so no optimizer holds it) sin-cos position embedding
        mae_init_(backbone)
        self.decoder_pred = nn.Linear(self.decoder_dim, self.patch_size**2 * self.in_chans)
        # recomputed at bind, so not in checkpoints (MAE keeps it as a frozen Parameter; the values are the same)
        self.register_buffer("decoder_pos_embed", pos_embed_with_cls(self.grid, self.decoder_dim), persistent=False)
        init_mae_weights_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def _check_backbone(self, backbone: nn.Module) -> None:
        check_mae_vit(backbone, self.feature_dim)

    # ----------------------------------------------------------------------------------------- model
    def _pos(self, table: torch.Tensor, grid: tuple[int, int], dim: int, like: torch.Tensor) -> torch.Tensor:
        """The bound pos-embed table, or a fresh exact sin-cos one if the image gives another grid (dynamic size)."""
        if grid == self.grid:
            return table
        return pos_embed_with_cls(grid, dim).to(like)

    def compile_targets(self) -> list[str]:
        return ["decoder_blocks"]

    def encode(
        self, imgs: torch.Tensor, backbone: nn.Module, noise: torch.Tensor, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encoder on visible tokens: (N, C, H, W) and noise (N, L) -> latent (N, 1 + keep, D) after the final norm,
        mask (N, L), ids_restore (N, L), patch grid (gh, gw). ``mask_ratio`` overrides the configured ratio
        (``benchmarks/mae_masking.py`` compares 0.75 with 0)."""
        x = backbone.patch_embed(imgs)
        if x.ndim == 4:  # timm ViTs with dynamic_img_size=True return NHWC
            grid = (x.shape[1], x.shape[2])
            x = x.flatten(1, 2)
        else:
            grid = tuple(int(g) for g in backbone.patch_embed.grid_size)
        pos = self._pos(backbone.pos_embed, grid, x.shape[-1], x)
        x = x + pos[:, 1:]  # BEFORE masking: each token carries its own position
        x, mask, ids_restore, _ = random_masking(x, self.mask_ratio if mask_ratio is None else mask_ratio, noise)
        cls = (backbone.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = backbone.norm_pre(x)
        x = backbone.blocks(x)
        return backbone.norm(x), mask, ids_restore, grid

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Decoder: latent (N, 1 + keep, D), ids_restore (N, L) -> pixel predictions (N, L, p²·C), original order."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        visible = x[:, 1:]
        filler = self.mask_token.expand(n, length - visible.shape[1], -1)
        x_ = torch.cat([visible, filler], dim=1)  # shuffled order: visible first, then the removed
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # un-shuffle
        x = torch.cat([x[:, :1], x_], dim=1)  # cls stays first
        x = x + self._pos(self.decoder_pos_embed, grid, self.decoder_dim, x)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]  # drop the cls output

    def reconstruct(self, imgs: torch.Tensor, backbone: nn.Module, noise: torch.Tensor) -> MAEOutput:
        """Mask with ``noise`` (N, L), encode, decode, and the masked-patch loss against the patchified image."""
        if self.decoder_pred is None:
            raise RuntimeError("MAE.bind(backbone) must run before the forward (SSLModule does it)")
        latent, mask, ids_restore, grid = self.encode(imgs, backbone, noise)
        pred = self.decode(latent, ids_restore, grid)
        # in fp32 even under autocast: per-patch standardisation and the squared error lose digits in bf16
        target = patchify(imgs.float(), self.patch_size)
        loss = masked_mse(pred.float(), target, mask, norm_pix=self.norm_pix_loss)
        return MAEOutput(loss=loss, pred=pred, mask=mask, latent=latent)

    # ----------------------------------------------------------------------------------------- training
    def masking_noise(self, imgs: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Uniform noise (N, L) from a generator seeded by (mask_seed, rank, global step, micro-batch).

        A key instead of the global RNG: ranks draw different masks (docs/reference.md §9, "Synchronise") and a resumed
        run -- whose global RNG is not restored -- draws the same masks as the uninterrupted one.
        """
        last_step, micro = self._micro
        self._micro = (step.global_step, micro + 1 if step.global_step == last_step else 0)
        key = hash((self.mask_seed, dist.rank(), step.global_step, self._micro[1])) & (2**63 - 1)
        h, w = imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size
        g = torch.Generator().manual_seed(key)  # on the CPU: every device type supports it; (N, L) is tiny
        return torch.rand(imgs.shape[0], h * w, generator=g).to(imgs.device)

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        imgs = views[0]
        out = self.reconstruct(imgs, backbone, self.masking_noise(imgs, step))
        cls_visible = out.latent[:, 0]
        if self.probe_features == "full":
            with torch.no_grad():
                features = backbone(imgs)  # whole-image timm forward: what kNN / linear probe evaluate
        else:
            features = cls_visible
        return ObjectiveOutput(loss=out.loss, features=features, embedding=cls_visible)
