"""Fixed 2-D sine-cosine position embeddings for ViTs (MoCo v3 and MAE).

MoCo v3 (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057, ``vits.py build_2d_sincos_position_embedding``)
and MAE (He et al. 2021, https://arxiv.org/abs/2111.06377, ``util/pos_embed.py get_2d_sincos_pos_embed``) replace
the learned position embedding with this fixed one: it removes a learnable input and helps stability.
"""

from __future__ import annotations

import torch


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 1 / temperature^(k/(dim/2))``, k = 0 … dim/2 − 1.

    positions: (M,) float. Returns (M, dim): the first dim/2 columns are the sines, the last dim/2 the cosines.
    """
    if dim % 2:
        raise ValueError(f"a 1-D sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega                                     # (dim/2,)
    out = positions.double()[:, None] * omega[None, :]                   # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_pos_embed(grid_h: int, grid_w: int, dim: int, num_prefix_tokens: int = 0,
                        temperature: float = 10000.0) -> torch.Tensor:
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
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")   # (h, w) each
    emb = torch.cat([sincos_1d(cols.flatten(), dim // 2, temperature),
                     sincos_1d(rows.flatten(), dim // 2, temperature)], dim=1)              # (h·w, dim)
    prefix = torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype)
    return torch.cat([prefix, emb]).float()
