"""MLP heads used by the objectives (projectors, predictors)."""

from __future__ import annotations

from torch import nn


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, bn: bool = True,
              last_bn: bool = False, last_bn_affine: bool = True, last_bn_shift: bool = True,
              last_bias: bool = True, act: type[nn.Module] = nn.ReLU, init_std: float | None = None) -> nn.Sequential:
    """``num_layers`` Linear layers: (Linear → [BN] → act) × (num_layers − 1) → Linear → [BN].

    Hidden Linears carry a bias only without BN (a bias before BN is redundant, as in SimCLR's ``use_bias=not bn``).
    ``last_bn_shift=False`` keeps the BN scale γ but freezes its shift β at zero (SimCLR's ``center=False``);
    the frozen tensor has ``requires_grad=False`` so it never reaches the optimizer.
    ``init_std`` draws Linear weights from N(0, init_std) (SimCLR: 0.01) instead of PyTorch's default.
    Input (B, in_dim) -> output (B, out_dim).
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least 1 layer, got num_layers={num_layers}")
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        last = i == num_layers - 1
        use_bn = last_bn if last else bn
        linear = nn.Linear(dims[i], dims[i + 1], bias=(last_bias and not use_bn) if last else not use_bn)
        if init_std is not None:
            nn.init.normal_(linear.weight, std=init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        layers.append(linear)
        if use_bn:
            norm = nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine if last else True)
            if last and norm.affine and not last_bn_shift:
                norm.bias.requires_grad_(False)
            layers.append(norm)
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)
