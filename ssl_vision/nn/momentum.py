"""Momentum (EMA) copies of networks: MoCo key encoders, BYOL targets, DINO teachers."""

from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere: initialised as the online network, never optimised."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online over **parameters only** (docs/reference.md §0.1).

    BN running statistics of the target are its own (from its own forward passes), never averaged.
    Both modules must have the same parameter names and shapes.
    """
    t_params = dict(target.named_parameters())
    o_params = dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        missing = sorted(set(t_params) ^ set(o_params))[:5]
        raise ValueError(f"EMA target and online networks differ in parameters, e.g. {missing}")
    names = list(t_params)
    t = [t_params[n].data for n in names]
    o = [o_params[n].data for n in names]
    if momentum == 1.0:
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)
