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

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.backbones import is_vit
from ssl_vision.losses.infonce import info_nce, moco_v3_contrastive
from ssl_vision.nn.heads import moco_v1_head, moco_v2_projector, moco_v3_predictor, moco_v3_projector
from ssl_vision.nn.memory import KeyQueue
from ssl_vision.nn.momentum import EMATeacher
from ssl_vision.nn.vit import freeze_patch_embed_, moco_v3_init_, set_fixed_sincos_pos_embed_
from ssl_vision.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    check_count,
    check_temperature,
    num_global_crops,
    register,
)


# ----------------------------------------------------------------------------------------------- momentum encoder
#: quoted by a bad momentum value's message
_MOMENTUM_NOTE = "the key encoder's EMA; MoCo: 0.999 constant (momentum_end null), MoCo v3: 0.99 cosine to 1.0"


def momentum_encoder(copies: dict[str, str], momentum: float, momentum_end: float | None) -> EMATeacher:
    """MoCo's momentum (key) encoder: updated at the start of the first forward of every optimizer step (the official
    ``_momentum_update_key_encoder`` inside ``forward``), once per step, none before the first; ``momentum_end``
    null = constant (v1/v2), else the cosine ``momentum → momentum_end`` (v3 ``--moco-m-cos``) over those T − 1
    updates, so the *last* forward of the run uses exactly ``momentum_end`` (the official code divides by T instead
    and ends a hair below 1). docs/reference.md §0.1."""
    return EMATeacher(copies, momentum, momentum_end, timing="before_forward", note=_MOMENTUM_NOTE)


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

    @classmethod
    def tiny_kwargs(cls) -> dict:
        # 64 keys: a multiple of every test batch (8, 16, 32), so the queue wraps within a few steps
        return {"embed_dim": 8, "proj_hidden_dim": 16, "queue_size": 64, "shuffle_bn_splits": 2}

    def __init__(
        self,
        feature_dim: int,
        head: str = "mlp",
        embed_dim: int = 128,
        proj_hidden_dim: int = 2048,
        temperature: float = 0.2,
        queue_size: int = 65536,
        momentum: float = 0.999,
        momentum_end: float | None = None,
        shuffle_bn: bool = True,
        shuffle_bn_splits: int = 8,
        shuffle_seed: int = 0,
        symmetric: bool = False,
    ):
        super().__init__()
        if head not in ("linear", "mlp"):
            raise ValueError(f"method.kwargs.head must be 'linear' (MoCo v1) or 'mlp' (MoCo v2), got {head!r}")
        check_temperature("temperature", temperature, "MoCo uses 0.07 (v1) and 0.2 (v2)")
        check_count(
            "queue_size", queue_size, note="negatives in the queue, a multiple of the global batch; MoCo: 65536"
        )
        check_count("embed_dim", embed_dim, note="MoCo: 128")
        check_count("proj_hidden_dim", proj_hidden_dim, note="MoCo v2: 2048")
        check_count("shuffle_bn_splits", shuffle_bn_splits, note="BN groups of the key batch; MoCo: 8")
        self.ema = momentum_encoder({"key_backbone": "backbone", "key_head": "head"}, momentum, momentum_end)
        self.temperature = temperature
        self.shuffle_bn, self.shuffle_bn_splits, self.shuffle_seed = shuffle_bn, shuffle_bn_splits, shuffle_seed
        self.symmetric = symmetric
        if head == "linear":  # the ResNet's own fc, with bias (moco/builder.py)
            self.head: nn.Module = moco_v1_head(feature_dim, embed_dim)
        else:  # v2: fc replaced by Linear → ReLU → fc, no BN
            self.head = moco_v2_projector(feature_dim, proj_hidden_dim, embed_dim)
        # key encoder = EMA copies of backbone and head, made in bind(); the head's slot is taken here so that the
        # state_dict keeps the key order of checkpoints written when the copy was made at construction
        self.register_module("key_head", None)
        self.key_backbone: nn.Module | None = None
        self.queue = KeyQueue(embed_dim, queue_size)
        self.ema.register_state(self)  # the ema_step buffer: the step of the last key-encoder update

    def bind(self, backbone: nn.Module) -> None:
        self.ema.bind(self, backbone)

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        self.ema.check_bound(self, "MoCo")
        x_q, x_k = _two_views(views, "MoCo", "moco_v1 or augment=moco_v2")
        m = self.ema.update(self, backbone, step)
        h = backbone(x_q)  # (N, D)
        q = F.normalize(self.head(h), dim=1)  # (N, E)
        k, k_all, _ = self.keys(x_k, step)  # (N, E), (B, E)
        negatives = self.queue.negatives()  # (E, K) copy: enqueue below writes in place
        loss = info_nce(q, k, negatives, self.temperature)
        new_keys = k_all
        if self.symmetric:
            q2 = F.normalize(self.head(backbone(x_k)), dim=1)
            k2, k2_all, _ = self.keys(x_q, step, view=1)
            loss = 0.5 * (loss + info_nce(q2, k2, negatives, self.temperature))
            new_keys = torch.cat([k_all, k2_all])
        self.queue.enqueue(new_keys)  # after the logits; same global keys on every rank
        logs = {"ema_momentum": torch.tensor(m, dtype=torch.float64), "pos_sim": (q.detach() * k).sum(1).mean()}
        return ObjectiveOutput(loss=loss, features=h, embedding=q, logs=logs)

    @torch.no_grad()
    def keys(
        self, x: torch.Tensor, step: StepInfo, view: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalised keys of this process's images x (N, C, H, W) with shuffle-BN.

        Returns (k (N, E) for the local samples, k_all (B, E) the global batch in rank order, the permutation (B,)
        or None without shuffling). ``view`` decorrelates the permutations of the two views (symmetric loss).
        """
        n = x.shape[0]
        splits = max(1, self.shuffle_bn_splits // dist.world_size())
        if n % splits:
            raise ValueError(
                f"MoCo shuffle-BN: the per-process key batch of {n} cannot be cut into {splits} equal BN "
                f"sub-batches (method.kwargs.shuffle_bn_splits={self.shuffle_bn_splits} over "
                f"{dist.world_size()} process(es)); use a data.batch_size divisible by {splits} or a "
                f"shuffle_bn_splits that divides the batch"
            )
        if self.shuffle_bn:
            gen = torch.Generator().manual_seed(
                (self.shuffle_seed * 1_000_003 + 2 * step.global_step + view) % (2**63 - 1)
            )
            x_shuffled, perm = dist.batch_shuffle(x, gen)
            k_all = dist.batch_unshuffle(self._encode_keys(x_shuffled, splits), perm)
        else:
            perm = None
            k_all = dist.gather_no_grad(self._encode_keys(x, splits))
        r = dist.rank()
        return k_all[r * n : (r + 1) * n], k_all, perm

    def _encode_keys(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        """Key encoder over ``splits`` contiguous sub-batches, each its own BN batch: (N, ...) -> (N, E)."""
        return torch.cat([F.normalize(self.key_head(self.key_backbone(c)), dim=1) for c in x.chunk(splits)])


# ----------------------------------------------------------------------------------------------- MoCo v3
@register("moco_v3")
class MoCoV3(Objective):
    """Projector (``proj_layers`` × Linear without bias, BN+ReLU between, last BN without affine) and predictor
    (same layout, last BN only with ``pred_last_bn``): ResNet 2-layer projector and 2-layer predictor without last
    BN; ViT 3-layer projector and predictor with last BN (``experiment=moco_v3_vit``).

    Momentum encoder = ``momentum_backbone`` + ``momentum_projector`` (not the predictor), EMA of parameters at the
    start of each forward with the cosine schedule ``momentum → momentum_end``. For ViTs, :meth:`bind` applies the
    paper's stabilisers (:mod:`ssl_vision.nn.vit`) to the online backbone before copying it: MoCo v3 init, fixed
    sin-cos position embedding,
    frozen random patch projection (``requires_grad=False``, so they never reach the optimizer).

    Multi-crop (``augment=multicrop``, an option; not in the paper, solo-learn's formulation): keys come from the
    global crops (the leading crops at the first crop's size), every crop's query is contrasted with the keys of
    every *other* global crop, ``Σ_{g global} Σ_{v≠g} ctr(q_v, k_g)``; with 2 views this is the paper's loss.
    """

    num_views = None  # two views, or all crops of a multi-crop preset

    @classmethod
    def tiny_kwargs(cls) -> dict:
        return {"proj_hidden_dim": 16, "proj_out_dim": 8, "pred_hidden_dim": 16}

    def __init__(
        self,
        feature_dim: int,
        temperature: float = 1.0,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        proj_layers: int = 2,
        pred_hidden_dim: int = 4096,
        pred_layers: int = 2,
        pred_last_bn: bool = False,
        momentum: float = 0.99,
        momentum_end: float = 1.0,
        vit_moco_init: bool = True,
        vit_fixed_pos_embed: bool = True,
        vit_frozen_patch_embed: bool = True,
    ):
        super().__init__()
        check_temperature("temperature", temperature, "MoCo v3 uses 0.2 for ViTs and 1.0 for ResNet-50")
        for key, value, paper in (
            ("proj_hidden_dim", proj_hidden_dim, 4096),
            ("proj_out_dim", proj_out_dim, 256),
            ("proj_layers", proj_layers, 3),
            ("pred_hidden_dim", pred_hidden_dim, 4096),
            ("pred_layers", pred_layers, 2),
        ):
            check_count(key, value, note=f"MoCo v3: {paper}")
        self.ema = momentum_encoder(
            {"momentum_backbone": "backbone", "momentum_projector": "projector"}, momentum, momentum_end
        )
        self.temperature = temperature
        self.vit_moco_init, self.vit_fixed_pos_embed = vit_moco_init, vit_fixed_pos_embed
        self.vit_frozen_patch_embed = vit_frozen_patch_embed
        self.projector = moco_v3_projector(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers)
        self.predictor = moco_v3_predictor(
            proj_out_dim, pred_hidden_dim, proj_out_dim, pred_layers, last_bn=pred_last_bn
        )
        # EMA copies of projector and backbone, made in bind() (the projector's slot taken here: state_dict order)
        self.register_module("momentum_projector", None)
        self.momentum_backbone: nn.Module | None = None
        self.ema.register_state(self)  # the ema_step buffer: the step of the last momentum-encoder update

    def bind(self, backbone: nn.Module) -> None:
        if is_vit(backbone):
            if self.vit_moco_init:
                moco_v3_init_(backbone)
            if self.vit_fixed_pos_embed:
                set_fixed_sincos_pos_embed_(backbone, "MoCo v3 fixed position embedding")
            if self.vit_frozen_patch_embed:
                freeze_patch_embed_(backbone)
        self.ema.bind(self, backbone)  # after the changes above: the copies start identical

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        self.ema.check_bound(self, "MoCoV3")
        x1, x2 = _two_views(views, "MoCo v3", "moco_v3")
        m = self.ema.update(self, backbone, step)
        if len(views) > 2:  # multi-crop
            n_global = num_global_crops(views)
            hs = [backbone(x) for x in views]  # one pass per crop, as per view above
            zs = [self.projector(h) for h in hs]
            qs = [self.predictor(z) for z in zs]
            with torch.no_grad():
                ks = [dist.gather_no_grad(self.momentum_projector(self.momentum_backbone(x))) for x in views[:n_global]]
            offset = x1.shape[0] * dist.rank()
            loss = sum(
                moco_v3_contrastive(qs[v], ks[g], self.temperature, offset)
                for g in range(n_global)
                for v in range(len(views))
                if v != g
            )
            logs = {"ema_momentum": torch.tensor(m, dtype=torch.float64)}
            return ObjectiveOutput(loss=loss, features=hs[0], embedding=zs[0], logs=logs)
        # one pass per view, as the official code: BN statistics are per view
        h1, h2 = backbone(x1), backbone(x2)  # (N, D)
        z1, z2 = self.projector(h1), self.projector(h2)  # (N, E)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
            k1_all, k2_all = dist.gather_no_grad(k1), dist.gather_no_grad(k2)  # (B, E), no gradient needed
        offset = x1.shape[0] * dist.rank()
        loss = moco_v3_contrastive(q1, k2_all, self.temperature, offset) + moco_v3_contrastive(
            q2, k1_all, self.temperature, offset
        )
        logs = {"ema_momentum": torch.tensor(m, dtype=torch.float64)}  # float64: "exactly 1.0" stays checkable
        return ObjectiveOutput(loss=loss, features=h1, embedding=z1, logs=logs)
