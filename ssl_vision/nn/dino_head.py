"""DINO's projection head (facebookresearch/dino ``vision_transformer.py: DINOHead``).

MLP in → hidden → … → bottleneck (GELU, optional BN, trunc-normal(0.02) init) → L2 normalise → weight-normalised
Linear(bottleneck, K, no bias). The weight normalisation is written out (``w = g · v/‖v‖`` per output row) rather
than with ``torch.nn.utils.parametrizations`` so the two tensors keep the official names ``weight_g`` / ``weight_v``
and a frozen ``g`` is just ``requires_grad=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision.nn.heads import build_mlp


class WeightNormLinear(nn.Module):
    """Linear without bias, ``weight = g · v / ‖v‖`` (row-wise norm, ``torch.nn.utils.weight_norm(dim=0)``).

    ``v`` starts with PyTorch's default Linear init (as DINO, which builds the layer after its trunc-normal init),
    ``g`` = 1. ``freeze_g=True`` (DINO's ``norm_last_layer``) keeps ``g`` at 1: the layer is then a cosine
    classifier whose rows are unit prototypes. (B, in) -> (B, out).
    """

    def __init__(self, in_dim: int, out_dim: int, freeze_g: bool = True):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone()
        self.weight_v = nn.Parameter(v)  # (out, in)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_g)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim) logits; see the module docstring. ``last_layer`` is what DINO freezes early on."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if out_dim < 2:
            raise ValueError(f"DINO head out_dim (number of prototypes K) must be >= 2, got {out_dim}")
        self.mlp = build_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, bn=use_bn, act=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_g=norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, bottleneck_dim) L2-normalised (the input of the prototype layer)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
