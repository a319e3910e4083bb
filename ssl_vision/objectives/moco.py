"""MoCo v1/v2 (He et al. 2019, https://arxiv.org/abs/1911.05722; Chen et al. 2020, https://arxiv.org/abs/2003.04297)
and MoCo v3 (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057). docs/reference.md §2, §3 and §11.

v1/v2: a query encoder (backbone + head) is trained to pick its key ``k⁺`` (the other view through a momentum
*key encoder*) out of a queue of K past keys. The key encoder is an EMA copy, updated at the start of every forward;
its BatchNorm sees a *shuffled* batch (shuffle-BN) so that query and key are never normalised with the same batch
statistics, which would let the model "cheat" (paper section 3.3).
v3: no queue, the negatives are the other keys of the global batch; a predictor on the query side, a momentum
encoder of backbone + projector, the symmetric loss ``ctr(q1, k2) + ctr(q2, k1)``, and for ViTs a fixed sin-cos
position embedding plus a frozen random patch projection (the paper's fix for training instability).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.backbones import is_vit
from ssl_vision.losses.infonce import info_nce, moco_v3_contrastive
from ssl_vision.nn.heads import build_mlp
from ssl_vision.nn.memory import HostMirror, KeyQueue
from ssl_vision.nn.momentum import ema_update_, momentum_copy
from ssl_vision.nn.pos_embed import sincos_2d_pos_embed
from ssl_vision.objectives.base import (Objective, ObjectiveOutput, StepInfo, check_count, check_range,
                                        check_temperature, num_global_crops, register)
from ssl_vision.optim import cosine_between


# ----------------------------------------------------------------------------------------------- momentum encoder
def momentum_at(step: StepInfo, m0: float, m_end: float | None) -> float:
    """EMA momentum used at the start of the forward of optimizer step ``step.global_step``.

    ``m_end=None``: constant ``m0`` (MoCo v1/v2). Otherwise the half cosine ``m0 → m_end`` (MoCo v3 ``--moco-m-cos``,
    docs/reference.md §0.1) over the steps ``0 … T−1`` of the run, so the *last* forward of the run uses exactly ``m_end``
    (1.0 for v3). The official code divides by T instead and ends a hair below 1.
    """
    if m_end is None:
        return m0
    last = max(1, step.total_steps - 1)
    return cosine_between(min(step.global_step, last), last, m0, m_end)


def _check_momentum(m0: float, m_end: float | None) -> None:
    check_range("momentum", m0, 0.0, 1.0, note="the key encoder's EMA; MoCo: 0.999, MoCo v3: 0.99")
    if m_end is not None:
        check_range("momentum_end", m_end, 0.0, 1.0, note="null = constant; MoCo v3: 1.0")


@torch.no_grad()
def _update_momentum_encoder(last_step: torch.Tensor, mirror: HostMirror, pairs: list[tuple[nn.Module, nn.Module]],
                             step: StepInfo, momentum: float) -> None:
    """EMA (parameters only; BN statistics stay the key encoder's own) once per optimizer step.

    ``last_step`` (a buffer, so resume continues it) is the step of the last update: with gradient accumulation the
    forward runs several times per step, but the online weights only change at the step. At step 0 the copy is
    still identical to the online network, so skipping it changes nothing. ``mirror`` is its host copy: the buffer
    is read once (after construction or a load), never per step.
    """
    if step.global_step == mirror.read(last_step):
        return
    for target, online in pairs:
        ema_update_(target, online, momentum)
    mirror.write(last_step, step.global_step)


def _two_views(views: list[torch.Tensor], method: str, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(views) < 2:
        raise ValueError(f"{method} needs 2 views per sample, the data gives {len(views)}; use augment={augment}")
    if views[0].shape[0] < 2:
        raise ValueError(f"{method} needs a batch of at least 2 samples per process, got {views[0].shape[0]}")
    return views[0], views[1]


# ----------------------------------------------------------------------------------------------- MoCo v1 / v2
@register("moco_v1", "moco_v2")
class MoCo(Objective):
    """MoCo v1 (``head="linear"``: backbone → Linear(D, 128)) and v2 (``head="mlp"``: Linear(D, 2048) → ReLU →
    Linear(2048, 128), no BN), outputs L2-normalised; the two names differ only in their configs.

    State (buffers/submodules, all checkpointed): ``key_backbone`` and ``key_head`` (EMA copies, created in
    :meth:`bind`), ``queue`` (:class:`~ssl_vision.nn.memory.KeyQueue`), ``ema_step``.

    Shuffle-BN: the global batch of key images is permuted (drawn on rank 0 from a generator seeded by
    ``(shuffle_seed, global_step)``, so 1 process, W processes and a resumed run use the same permutation), cut into
    ``shuffle_bn_splits`` contiguous sub-batches of the shuffled order, each normalised by BN on its own, and the
    keys are un-shuffled. Each of the W processes encodes ``max(1, splits // W)`` of them: ``splits = 8`` is the
    original 8-GPU layout on any number of processes (on one GPU it is lightly's SplitBatchNorm emulation).
    ``symmetric=True`` is solo-learn's "MoCo v2+": the swapped term is added (loss = mean of both) and the keys of
    both views are enqueued (2B per step; solo keeps one queue per view instead).
    """

    num_views = 2

    def __init__(self, feature_dim: int, head: str = "mlp", embed_dim: int = 128, proj_hidden_dim: int = 2048,
                 temperature: float = 0.2, queue_size: int = 65536, momentum: float = 0.999,
                 momentum_end: float | None = None, shuffle_bn: bool = True, shuffle_bn_splits: int = 8,
                 shuffle_seed: int = 0, symmetric: bool = False):
        super().__init__()
        if head not in ("linear", "mlp"):
            raise ValueError(f"method.kwargs.head must be 'linear' (MoCo v1) or 'mlp' (MoCo v2), got {head!r}")
        check_temperature("temperature", temperature, "MoCo uses 0.07 (v1) and 0.2 (v2)")
        check_count("queue_size", queue_size,
                    note="negatives in the queue, a multiple of the global batch; MoCo: 65536")
        check_count("embed_dim", embed_dim, note="MoCo: 128")
        check_count("proj_hidden_dim", proj_hidden_dim, note="MoCo v2: 2048")
        check_count("shuffle_bn_splits", shuffle_bn_splits, note="BN groups of the key batch; MoCo: 8")
        _check_momentum(momentum, momentum_end)
        self.temperature, self.momentum, self.momentum_end = temperature, momentum, momentum_end
        self.shuffle_bn, self.shuffle_bn_splits, self.shuffle_seed = shuffle_bn, shuffle_bn_splits, shuffle_seed
        self.symmetric = symmetric
        if head == "linear":  # the ResNet's own fc, with bias (moco/builder.py)
            self.head: nn.Module = nn.Linear(feature_dim, embed_dim)
        else:                 # v2: fc replaced by Linear → ReLU → fc, no BN
            self.head = build_mlp(feature_dim, proj_hidden_dim, embed_dim, 2, bn=False)
        self.key_head = momentum_copy(self.head)
        self.key_backbone: nn.Module | None = None  # set by bind()
        self.queue = KeyQueue(embed_dim, queue_size)
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self._ema_step = HostMirror()  # host copy of ema_step, dropped on every load_state_dict
        HostMirror.watch(self, "_ema_step")

    def bind(self, backbone: nn.Module) -> None:
        self.key_backbone = momentum_copy(backbone)

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        if self.key_backbone is None:
            raise RuntimeError("MoCo.bind(backbone) must be called before the first forward (SSLModule does it)")
        x_q, x_k = _two_views(views, "MoCo", "moco_v1 or augment=moco_v2")
        m = momentum_at(step, self.momentum, self.momentum_end)
        _update_momentum_encoder(self.ema_step, self._ema_step,
                                 [(self.key_backbone, backbone), (self.key_head, self.head)], step, m)
        h = backbone(x_q)                                          # (N, D)
        q = F.normalize(self.head(h), dim=1)                       # (N, E)
        k, k_all, _ = self.keys(x_k, step)                         # (N, E), (B, E)
        negatives = self.queue.negatives()                         # (E, K) copy: enqueue below writes in place
        loss = info_nce(q, k, negatives, self.temperature)
        new_keys = k_all
        if self.symmetric:
            q2 = F.normalize(self.head(backbone(x_k)), dim=1)
            k2, k2_all, _ = self.keys(x_q, step, view=1)
            loss = 0.5 * (loss + info_nce(q2, k2, negatives, self.temperature))
            new_keys = torch.cat([k_all, k2_all])
        self.queue.enqueue(new_keys)                               # after the logits; same global keys on every rank
        logs = {"ema_momentum": torch.tensor(m, dtype=torch.float64), "pos_sim": (q.detach() * k).sum(1).mean()}
        return ObjectiveOutput(loss=loss, features=h, embedding=q, logs=logs)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, step: StepInfo, view: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalised keys of this process's images x (N, C, H, W) with shuffle-BN.

        Returns (k (N, E) for the local samples, k_all (B, E) the global batch in rank order, the permutation (B,)
        or None without shuffling). ``view`` decorrelates the permutations of the two views (symmetric loss).
        """
        n = x.shape[0]
        splits = max(1, self.shuffle_bn_splits // dist.world_size())
        if n % splits:
            raise ValueError(f"MoCo shuffle-BN: the per-process key batch of {n} cannot be cut into {splits} equal BN "
                             f"sub-batches (method.kwargs.shuffle_bn_splits={self.shuffle_bn_splits} over "
                             f"{dist.world_size()} process(es)); use a data.batch_size divisible by {splits} or a "
                             f"shuffle_bn_splits that divides the batch")
        if self.shuffle_bn:
            gen = torch.Generator().manual_seed((self.shuffle_seed * 1_000_003 + 2 * step.global_step + view)
                                                % (2**63 - 1))
            x_shuffled, perm = dist.batch_shuffle(x, gen)
            k_all = dist.batch_unshuffle(self._encode_keys(x_shuffled, splits), perm)
        else:
            perm = None
            k_all = dist.gather_no_grad(self._encode_keys(x, splits))
        r = dist.rank()
        return k_all[r * n:(r + 1) * n], k_all, perm

    def _encode_keys(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        """Key encoder over ``splits`` contiguous sub-batches, each its own BN batch: (N, ...) -> (N, E)."""
        return torch.cat([F.normalize(self.key_head(self.key_backbone(c)), dim=1) for c in x.chunk(splits)])


# ----------------------------------------------------------------------------------------------- ViT stabilisers
@torch.no_grad()
def vit_moco_init_(vit: nn.Module) -> None:
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
def fix_sincos_pos_embed_(vit: nn.Module) -> None:
    """Replace a timm ViT's learned position embedding by the fixed 2-D sin-cos one (cls slot zeros), frozen."""
    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        raise ValueError("MoCo v3 fixed position embedding: this ViT has no learned pos_embed parameter; "
                         "set method.kwargs.vit_fixed_pos_embed=false")
    grid_h, grid_w = vit.patch_embed.grid_size
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    table = sincos_2d_pos_embed(grid_h, grid_w, pos.shape[-1], num_prefix_tokens=prefix)
    if table.shape != pos.shape[1:]:
        raise ValueError(f"MoCo v3: sin-cos table {tuple(table.shape)} does not fit pos_embed {tuple(pos.shape)}")
    pos.copy_(table[None].to(pos.dtype))
    pos.requires_grad_(False)


@torch.no_grad()
def freeze_random_patch_embed_(vit: nn.Module) -> None:
    """``--stop-grad-conv1``: patch projection xavier-uniform as a (C·p·p → D) Linear, zero bias, both frozen."""
    proj = vit.patch_embed.proj
    fan_in = proj.weight[0].numel()        # C·p·p
    val = math.sqrt(6.0 / float(fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -val, val)
    proj.weight.requires_grad_(False)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
        proj.bias.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- MoCo v3
@register("moco_v3")
class MoCoV3(Objective):
    """Projector (``proj_layers`` × Linear without bias, BN+ReLU between, last BN without affine) and predictor
    (same layout, last BN only with ``pred_last_bn``): ResNet 2-layer projector and 2-layer predictor without last
    BN; ViT 3-layer projector and predictor with last BN (``experiment=moco_v3_vit``).

    Momentum encoder = ``momentum_backbone`` + ``momentum_projector`` (not the predictor), EMA of parameters at the
    start of each forward with the cosine schedule ``momentum → momentum_end``. For ViTs, :meth:`bind` applies the
    paper's stabilisers to the online backbone before copying it: MoCo v3 init, fixed sin-cos position embedding,
    frozen random patch projection (``requires_grad=False``, so they never reach the optimizer).

    Multi-crop (``augment=multicrop``, an option; not in the paper, solo-learn's formulation): keys come from the
    global crops (the leading crops at the first crop's size), every crop's query is contrasted with the keys of
    every *other* global crop, ``Σ_{g global} Σ_{v≠g} ctr(q_v, k_g)``; with 2 views this is the paper's loss.
    """

    num_views = None  # two views, or all crops of a multi-crop preset

    def __init__(self, feature_dim: int, temperature: float = 1.0, proj_hidden_dim: int = 4096,
                 proj_out_dim: int = 256, proj_layers: int = 2, pred_hidden_dim: int = 4096, pred_layers: int = 2,
                 pred_last_bn: bool = False, momentum: float = 0.99, momentum_end: float = 1.0,
                 vit_moco_init: bool = True, vit_fixed_pos_embed: bool = True, vit_frozen_patch_embed: bool = True):
        super().__init__()
        check_temperature("temperature", temperature, "MoCo v3 uses 0.2 for ViTs and 1.0 for ResNet-50")
        for key, value, paper in (("proj_hidden_dim", proj_hidden_dim, 4096), ("proj_out_dim", proj_out_dim, 256),
                                  ("proj_layers", proj_layers, 3), ("pred_hidden_dim", pred_hidden_dim, 4096),
                                  ("pred_layers", pred_layers, 2)):
            check_count(key, value, note=f"MoCo v3: {paper}")
        _check_momentum(momentum, momentum_end)
        self.temperature, self.momentum, self.momentum_end = temperature, momentum, momentum_end
        self.vit_moco_init, self.vit_fixed_pos_embed = vit_moco_init, vit_fixed_pos_embed
        self.vit_frozen_patch_embed = vit_frozen_patch_embed
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers, bn=True, last_bn=True,
                                   last_bn_affine=False, last_bias=False)
        self.predictor = build_mlp(proj_out_dim, pred_hidden_dim, proj_out_dim, pred_layers, bn=True,
                                   last_bn=pred_last_bn, last_bn_affine=False, last_bias=False)
        self.momentum_projector = momentum_copy(self.projector)
        self.momentum_backbone: nn.Module | None = None  # set by bind()
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self._ema_step = HostMirror()  # host copy of ema_step, dropped on every load_state_dict
        HostMirror.watch(self, "_ema_step")

    def bind(self, backbone: nn.Module) -> None:
        if is_vit(backbone):
            if self.vit_moco_init:
                vit_moco_init_(backbone)
            if self.vit_fixed_pos_embed:
                fix_sincos_pos_embed_(backbone)
            if self.vit_frozen_patch_embed:
                freeze_random_patch_embed_(backbone)
        self.momentum_backbone = momentum_copy(backbone)  # after the changes above: the copy starts identical

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        if self.momentum_backbone is None:
            raise RuntimeError("MoCoV3.bind(backbone) must be called before the first forward (SSLModule does it)")
        x1, x2 = _two_views(views, "MoCo v3", "moco_v3")
        m = momentum_at(step, self.momentum, self.momentum_end)
        _update_momentum_encoder(self.ema_step, self._ema_step, [(self.momentum_backbone, backbone),
                                                                 (self.momentum_projector, self.projector)], step, m)
        if len(views) > 2:  # multi-crop
            n_global = num_global_crops(views)
            hs = [backbone(x) for x in views]                  # one pass per crop, as per view above
            zs = [self.projector(h) for h in hs]
            qs = [self.predictor(z) for z in zs]
            with torch.no_grad():
                ks = [dist.gather_no_grad(self.momentum_projector(self.momentum_backbone(x)))
                      for x in views[:n_global]]
            offset = x1.shape[0] * dist.rank()
            loss = sum(moco_v3_contrastive(qs[v], ks[g], self.temperature, offset)
                       for g in range(n_global) for v in range(len(views)) if v != g)
            logs = {"ema_momentum": torch.tensor(m, dtype=torch.float64)}
            return ObjectiveOutput(loss=loss, features=hs[0], embedding=zs[0], logs=logs)
        # one pass per view, as the official code: BN statistics are per view
        h1, h2 = backbone(x1), backbone(x2)                        # (N, D)
        z1, z2 = self.projector(h1), self.projector(h2)            # (N, E)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
            k1_all, k2_all = dist.gather_no_grad(k1), dist.gather_no_grad(k2)   # (B, E), no gradient needed
        offset = x1.shape[0] * dist.rank()
        loss = (moco_v3_contrastive(q1, k2_all, self.temperature, offset)
                + moco_v3_contrastive(q2, k1_all, self.temperature, offset))
        logs = {"ema_momentum": torch.tensor(m, dtype=torch.float64)}  # float64: "exactly 1.0" stays checkable
        return ObjectiveOutput(loss=loss, features=h1, embedding=z1, logs=logs)
