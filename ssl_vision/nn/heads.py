"""The objectives' heads (projectors, predictors), one named factory per paper's head.

Each factory's docstring quotes the paper's (or official code's) description of the head; the objectives call the
factory by name instead of passing layout flags to :func:`build_mlp`, the generic builder underneath. Module layouts,
parameter names and initialisation are what they have always been, so checkpoints keep their keys.
Every factory maps (N, in_dim) -> (N, out_dim).
"""

from __future__ import annotations

from torch import nn


def build_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    *,
    bn: bool = True,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    last_bn_shift: bool = True,
    last_bias: bool = True,
    act: type[nn.Module] = nn.ReLU,
    init_std: float | None = None,
) -> nn.Sequential:
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


# ------------------------------------------------------------------------------------------------ named heads
def simclr_projector(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> nn.Sequential:
    """SimCLR's projection head g (Chen et al. 2020, §2.1): "We use a MLP with one hidden layer to obtain
    z_i = g(h_i) = W^(2) σ(W^(1) h_i) where σ is a ReLU non-linearity"; SimCLR v2 (§2) makes it deeper (3 layers,
    the official code's default). As the official code (``model_util.py: projection_head``): every layer Linear → BN
    (Linear without bias before BN), weights N(0, 0.01), the last BN without its shift β (``center=False``).
    ``num_layers`` = 2 for v1, 3 for v2."""
    return build_mlp(
        in_dim,
        hidden_dim,
        out_dim,
        num_layers,
        bn=True,
        last_bn=True,
        last_bn_shift=False,
        last_bias=False,
        init_std=0.01,
    )


def moco_v1_head(in_dim: int, out_dim: int = 128) -> nn.Linear:
    """MoCo v1's head (He et al. 2019, §3.3 "Technical details"): "The last fully-connected layer (after global
    average pooling) has a fixed-dimensional output (128-D)" -- the ResNet's own ``fc``, with bias."""
    return nn.Linear(in_dim, out_dim)


def moco_v2_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """MoCo v2's head (Chen et al. 2020, §2): "we replace the fc head in MoCo with a 2-layer MLP head (hidden layer
    2048-d, with ReLU)": Linear → ReLU → Linear, both with bias, no BN."""
    return build_mlp(in_dim, hidden_dim, out_dim, 2, bn=False)


def moco_v3_projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2) -> nn.Sequential:
    """MoCo v3's projection head (Chen, Xie, He 2021, appendix "MLP heads"): "The hidden layers of both MLPs are
    4096-d and are with ReLU; the output layers of both MLPs are 256-d, without ReLU. In MoCo v3, all layers in both
    MLPs have BN". As the official ``builder.py: _build_mlp``: Linears without bias, the last BN without affine.
    3 layers for ViTs (the paper), 2 for the ResNet-50 recipe (official CONFIG.md)."""
    return build_mlp(
        in_dim, hidden_dim, out_dim, num_layers, bn=True, last_bn=True, last_bn_affine=False, last_bias=False
    )


def moco_v3_predictor(
    in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2, last_bn: bool = False
) -> nn.Sequential:
    """MoCo v3's prediction head (appendix "MLP heads"): "the prediction head is a 2-layer MLP", the same block
    layout as :func:`moco_v3_projector`; its output BN (without affine) is the ViT recipe's (``last_bn=True``), the
    official ResNet-50 predictor has none (``builder.py: MoCo_ResNet._build_projector_and_predictor_mlps``)."""
    return build_mlp(
        in_dim, hidden_dim, out_dim, num_layers, bn=True, last_bn=last_bn, last_bn_affine=False, last_bias=False
    )


def byol_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """BYOL's projector and predictor (Grill et al. 2020, §3.3): "This MLP consists in a linear layer with output size
    4096 followed by batch normalization, rectified linear units (ReLU), and a final linear layer with output
    dimension 256"; the predictor "uses the same architecture".

    The official haiku MLP keeps the bias before BN (it is redundant there, and excluded from weight decay and
    LARS like every 1-D tensor), and the last Linear has none; BN keeps torch's defaults (momentum 0.1 = haiku decay
    0.9, eps 1e-5), as in the official config. Written out: ``build_mlp`` drops a bias before BN.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=True),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


def simsiam_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, num_layers: int = 3) -> nn.Sequential:
    """SimSiam's projection MLP (Chen & He 2021, §4 "Baseline settings"): "The projection MLP (in f) has BN applied
    to each fully-connected (fc) layer, including its output fc. Its output fc has no ReLU. The hidden fc is 2048-d.
    This MLP has 3 layers." (2 in the paper's CIFAR variant.)

    ``num_layers − 1`` × (Linear(no bias) → BN → ReLU), then Linear → BN(affine=False). The last Linear keeps its
    bias tensor but frozen (``requires_grad=False``), as the official builder does (``encoder.fc[6].bias
    .requires_grad = False``): the BN that follows removes any shift, so it would only drift under weight decay.
    Being frozen, it never reaches the optimizer (``param_groups`` skips it).
    """
    if num_layers < 2:
        raise ValueError(
            f"SimSiam's projector needs at least 2 layers (3 on ImageNet, 2 in the paper's CIFAR "
            f"variant), got proj_layers={num_layers}"
        )
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    last = nn.Linear(dim, out_dim, bias=True)
    last.bias.requires_grad_(False)
    layers += [last, nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*layers)


def simsiam_predictor(dim: int = 2048, hidden_dim: int = 512) -> nn.Sequential:
    """SimSiam's prediction MLP (§4 "Baseline settings"): "The prediction MLP (h) has BN applied to its hidden fc
    layers. Its output fc does not have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output
    (z and p) is d = 2048, and h's hidden layer's dimension is 512, making h a bottleneck structure".
    Linear(dim, hidden, no bias) → BN → ReLU → Linear(hidden, dim) with bias (BN at the predictor output changes
    SimSiam's behaviour, docs/reference.md §7)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim, bias=True),
    )


def swav_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """SwAV's projection head (Caron et al. 2020; official ``src/resnet50.py``: ``nn.Linear(num_out_filters,
    hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True), nn.Linear(hidden_mlp, output_dim)``, 2048 → 128 on
    ImageNet); the prototypes layer and the L2 normalisation follow it in the objective."""
    return build_mlp(in_dim, hidden_dim, out_dim, 2, bn=True)


def instdisc_head(in_dim: int, out_dim: int = 128, bn: bool = False) -> nn.Module:
    """InstDisc's embedding layer (Wu et al. 2018, §3.1 and lemniscate's ``model.fc = nn.Linear(512·expansion,
    low_dim)``): one Linear to the 128-d feature, L2-normalised by the objective. ``bn=True`` (not in the paper, a
    deviation for short runs on small data sets): Linear without bias → BatchNorm1d, which centres the embedding over
    the batch before it is normalised."""
    if bn:
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
    return nn.Linear(in_dim, out_dim)
