"""ViT surgery, in one place: what MoCo v3 and MAE change in the backbone factory's timm ViT before training.

* fixed 2-D sine-cosine position embeddings (:func:`sincos_2d_pos_embed`, :func:`set_fixed_sincos_pos_embed_`):
  MoCo v3 (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057, ``vits.py build_2d_sincos_position_embedding``)
  and MAE (He et al. 2021, https://arxiv.org/abs/2111.06377, ``util/pos_embed.py get_2d_sincos_pos_embed``) replace
  the learned position embedding with this fixed one: it removes a learnable input and helps stability;
* MoCo v3 initialisation (:func:`moco_v3_init_`) and frozen random patch projection (:func:`freeze_patch_embed_`,
  ``--stop-grad-conv1``), the paper's fixes for training instability (§4);
* MAE's checks (:func:`check_mae_vit`) and initialisation (:func:`mae_init_`, :func:`init_mae_weights_`).

Every function works on the backbone in place and leaves its parameter names alone, so EMA copies made afterwards
start identical and checkpoints keep their keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "sincos_1d",
    "sincos_2d_pos_embed",
    "sincos_pos_embed_table",
    "set_fixed_sincos_pos_embed_",
    "moco_v3_init_",
    "freeze_patch_embed_",
    "check_mae_vit",
    "init_mae_weights_",
    "mae_init_",
    "patch_grid",
]


# ------------------------------------------------------------------------------------------ sin-cos position embedding
def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 1 / temperature^(k/(dim/2))``, k = 0 … dim/2 − 1.

    positions: (M,) float. Returns (M, dim): the first dim/2 columns are the sines, the last dim/2 the cosines.
    """
    if dim % 2:
        raise ValueError(f"a 1-D sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega  # (dim/2,)
    out = positions.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_pos_embed(
    grid_h: int, grid_w: int, dim: int, num_prefix_tokens: int = 0, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed position embedding of a ``grid_h × grid_w`` patch grid, tokens in row-major order (as ViTs flatten).

    Channel layout as MAE: the first dim/2 channels encode the column (x) with :func:`sincos_1d`, the last dim/2 the
    row (y). MoCo v3's formula has the same frequencies with the two halves swapped (its ``meshgrid`` uses ``ij``
    indexing), a fixed channel permutation that makes no difference to training from scratch.
    ``num_prefix_tokens`` zero rows are put first for the cls (and register) tokens: "the cls slot is zeros".
    Returns (num_prefix_tokens + grid_h·grid_w, dim) float32.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs dim divisible by 4 (2 axes × sin/cos), got {dim}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"the patch grid must be at least 1x1, got {grid_h}x{grid_w}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (h, w) each
    emb = torch.cat(
        [sincos_1d(cols.flatten(), dim // 2, temperature), sincos_1d(rows.flatten(), dim // 2, temperature)], dim=1
    )  # (h·w, dim)
    prefix = torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype)
    return torch.cat([prefix, emb]).float()


def sincos_pos_embed_table(grid: tuple[int, int], dim: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, num_prefix_tokens + gh·gw, dim): :func:`sincos_2d_pos_embed` shaped as a ViT's ``pos_embed`` (a zero slot
    for the cls token, which carries no position, then the patch grid)."""
    return sincos_2d_pos_embed(grid[0], grid[1], dim, num_prefix_tokens=num_prefix_tokens).unsqueeze(0)


def patch_grid(vit: nn.Module) -> tuple[int, int]:
    """The (rows, columns) of the ViT's patch grid at its configured image size."""
    gh, gw = vit.patch_embed.grid_size
    return int(gh), int(gw)


@torch.no_grad()
def set_fixed_sincos_pos_embed_(vit: nn.Module, method: str = "the fixed sin-cos position embedding") -> None:
    """Replace a timm ViT's learned position embedding by the fixed 2-D sin-cos one and freeze it
    (``requires_grad=False``, so no optimizer holds it; it stays in the state_dict under its name).

    The table has a zero row per prefix token the pos-embed covers (the cls token; none with ``no_embed_class``).
    ``method`` names the caller in errors (MoCo v3 / MAE)."""
    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        raise ValueError(
            f"{method}: this ViT has no learned pos_embed parameter to replace"
            + ("; set method.kwargs.vit_fixed_pos_embed=false" if "MoCo" in method else "")
        )
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    table = sincos_pos_embed_table(patch_grid(vit), pos.shape[-1], num_prefix_tokens=prefix)
    if table.shape != pos.shape:
        raise ValueError(f"{method}: sin-cos table {tuple(table.shape[1:])} does not fit pos_embed {tuple(pos.shape)}")
    pos.copy_(table.to(pos.dtype))
    pos.requires_grad_(False)


# ------------------------------------------------------------------------------------------ MoCo v3
@torch.no_grad()
def moco_v3_init_(vit: nn.Module) -> None:
    """MoCo v3 ``vits.py`` init: every Linear xavier-uniform with zero bias, Q/K/V blocks of ``qkv`` each as its own
    (D → D) matrix, cls token N(0, 1e-6)."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)


@torch.no_grad()
def freeze_patch_embed_(vit: nn.Module) -> None:
    """``--stop-grad-conv1``: patch projection xavier-uniform as a (C·p·p → D) Linear, zero bias, both frozen."""
    proj = vit.patch_embed.proj
    fan_in = proj.weight[0].numel()  # C·p·p
    val = math.sqrt(6.0 / float(fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -val, val)
    proj.weight.requires_grad_(False)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
        proj.bias.requires_grad_(False)


# ------------------------------------------------------------------------------------------ MAE
def check_mae_vit(vit: nn.Module, feature_dim: int) -> None:
    """MAE's encoder runs the timm ViT's parts by hand: refuse a ViT whose layout it cannot run, naming each problem."""
    if not (hasattr(vit, "patch_embed") and hasattr(vit, "blocks")):
        raise ValueError(f"MAE needs a ViT backbone, got {type(vit).__name__}; use backbone=vit_tiny|vit_small|vit_b")
    problems = []
    if getattr(vit, "cls_token", None) is None:
        problems.append("no class token (class_token=False)")
    if getattr(vit, "num_reg_tokens", 0) or getattr(vit, "reg_token", None) is not None:
        problems.append("register tokens (reg_tokens > 0)")
    if getattr(vit, "no_embed_class", False):
        problems.append("no_embed_class=True (pos-embed without a cls slot)")
    if getattr(vit, "pos_embed", None) is None:
        problems.append("no absolute position embedding (pos_embed=None, e.g. RoPE)")
    pe = vit.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or pe.patch_size[0] != pe.patch_size[1]:
        problems.append("a patch embedding that is not one square Conv2d")
    if getattr(vit, "embed_dim", feature_dim) != feature_dim:
        problems.append(f"embed_dim {vit.embed_dim} != feature_dim {feature_dim}")
    if problems:
        raise ValueError(
            f"MAE supports timm ViTs with a cls token and a learned absolute pos-embed (the factory's "
            f"vit_tiny|vit_small|vit_b|...); {type(vit).__name__} has: {'; '.join(problems)}"
        )


@torch.no_grad()
def init_mae_weights_(module: nn.Module) -> None:
    """MAE init (docs/reference.md §9): xavier-uniform Linear weights and zero biases, LayerNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # the qkv Linear as one matrix, as MAE (not per Q/K/V like MoCo v3)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def mae_init_(vit: nn.Module) -> None:
    """MAE's ``initialize_weights`` on the encoder: :func:`init_mae_weights_`, the patch projection xavier-uniform
    as a Linear, cls token N(0, 0.02), and the fixed sin-cos position embedding (frozen)."""
    init_mae_weights_(vit)
    w = vit.patch_embed.proj.weight
    flat = w.new_empty(w.shape[0], w[0].numel())  # the patch projection as a Linear (MAE); a copy, so
    nn.init.xavier_uniform_(flat)  # NHWC weights (perf.channels_last) work too
    w.copy_(flat.view(w.shape))
    nn.init.normal_(vit.cls_token, std=0.02)
    set_fixed_sincos_pos_embed_(vit, "MAE")
