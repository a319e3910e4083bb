"""SwAV (Caron et al. 2020, https://arxiv.org/abs/2006.09882; facebookresearch/swav ``main_swav.py``).

Online clustering: embeddings of all crops are scored against K learnable unit prototypes; the two global crops get
equipartitioned soft codes from Sinkhorn-Knopp over the *global* batch (plus an optional queue of past embeddings),
and each crop's code is predicted from every other crop ("swapped prediction"). Multi-crop: the data gives views
ordered large → small, the backbone runs once per resolution and the heads once on the concatenation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.losses.swav import sinkhorn_knopp, swapped_prediction
from ssl_vision.nn.heads import swav_projector
from ssl_vision.nn.memory import HostMirror, push_rank_blocks_, rank_block
from ssl_vision.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    check_count,
    check_temperature,
    forward_by_resolution,
    register,
)


@register("swav")
class SwAV(Objective):
    """Projector Linear(D, hidden) → BN → ReLU → Linear(hidden, E) → L2 normalise → prototypes Linear(E, K, no bias).

    Args (``conf/method/swav.yaml: kwargs``; defaults = the official B=256 ImageNet recipe):
        num_prototypes: K (3000). proj_hidden_dim / proj_out_dim: 2048 / 128.
        temperature: τ of the swapped prediction (0.1).
        sinkhorn_epsilon / sinkhorn_iterations: ε (0.05) and iterations (3) of Sinkhorn-Knopp.
        crops_for_assign: crops that receive codes (the two global crops ``[0, 1]``; never the small ones).
        freeze_prototypes_niters: optimizer steps during which the prototypes get no update (5005 at B=256 ≈ one
            epoch; 313 at B=4096).
        queue_length: total queue rows over all processes (0 = no queue); each process uses ``queue_length / W``
            rows holding its own past embeddings. Must be a multiple of the global batch B.
        queue_start_epoch: epoch from which the queue is filled; it joins Sinkhorn only once full (official rule).

    The queue is stored as one (|A|, queue_length, E) buffer that is identical on every process: rank r's rows are
    the block ``[r·L/W, (r+1)·L/W)`` and every process writes every block from all-gathered embeddings. Each rank
    still *uses* only its own block (the official per-rank queue), but the checkpoint written by rank 0 holds every
    rank's queue and DDP's buffer broadcast from rank 0 cannot overwrite the other ranks' queues.
    """

    num_views = None  # multi-crop: all views
    per_process_row_buffers = ("queue",)  # one block of rows per process (class docstring)

    @classmethod
    def tiny_kwargs(cls) -> dict:
        # a 16-row queue from epoch 0: full after the first batches of 8-16, then in Sinkhorn; prototypes frozen
        # for the first step only
        return {
            "num_prototypes": 16,
            "proj_hidden_dim": 16,
            "proj_out_dim": 8,
            "queue_length": 16,
            "queue_start_epoch": 0,
            "freeze_prototypes_niters": 1,
        }

    def __init__(
        self,
        feature_dim: int,
        num_prototypes: int = 3000,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        freeze_prototypes_niters: int = 5005,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
    ):
        super().__init__()
        check_temperature("temperature", temperature, "SwAV uses 0.1")
        check_temperature("sinkhorn_epsilon", sinkhorn_epsilon, "SwAV uses 0.05, 0.03 for some runs")
        check_count("num_prototypes", num_prototypes, note="SwAV: 3000 on ImageNet, at least proj_out_dim")
        check_count("proj_hidden_dim", proj_hidden_dim, note="SwAV: 2048")
        check_count("proj_out_dim", proj_out_dim, note="SwAV: 128")
        check_count("sinkhorn_iterations", sinkhorn_iterations, note="SwAV: 3")
        if (
            isinstance(crops_for_assign, (str, bytes))
            or not crops_for_assign
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in crops_for_assign)
            or len(set(crops_for_assign)) != len(crops_for_assign)
        ):
            raise ValueError(
                f"method.kwargs.crops_for_assign must list distinct crop indices >= 0, e.g. [0, 1] "
                f"(SwAV: the two global crops); got {crops_for_assign!r}"
            )
        check_count("queue_length", queue_length, minimum=0, note="0 = no queue; SwAV: 3840 at batch 256")
        check_count("queue_start_epoch", queue_start_epoch, minimum=0, note="SwAV: 15")
        check_count(
            "freeze_prototypes_niters",
            freeze_prototypes_niters,
            minimum=0,
            note="SwAV: 5005 optimizer steps at batch 256",
        )
        if num_prototypes < proj_out_dim:
            # K < E: every embedding can turn orthogonal to all prototypes (all scores 0, uniform codes and
            # predictions, loss = ln K): a collapsed solution that a K = 100, E = 128 trial run fell into.
            warnings.warn(
                f"SwAV with fewer prototypes ({num_prototypes}) than embedding dimensions ({proj_out_dim}) "
                f"admits a collapsed solution at loss ln K; use num_prototypes >= proj_out_dim",
                stacklevel=2,
            )
        self.temperature = temperature
        self.epsilon = sinkhorn_epsilon
        self.iterations = sinkhorn_iterations
        self.crops_for_assign = [int(c) for c in crops_for_assign]
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.queue_length = queue_length
        self.queue_start_epoch = queue_start_epoch
        self.projector = swav_projector(feature_dim, proj_hidden_dim, proj_out_dim)
        self.prototypes = nn.Linear(proj_out_dim, num_prototypes, bias=False)
        # queue of past L2-normalised embeddings of the assigned crops, newest first (see the class docstring)
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), queue_length, proj_out_dim))
        self.register_buffer("queue_fill", torch.zeros((), dtype=torch.long))  # rows written, all ranks, ≤ length
        self._queue_fill = HostMirror()  # host copy of queue_fill (no device read per step), dropped on every load
        HostMirror.watch(self, "_queue_fill")

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        num_crops = len(views)
        if num_crops < 2 or max(self.crops_for_assign) >= num_crops:
            raise ValueError(
                f"SwAV needs >= 2 views covering crops_for_assign={self.crops_for_assign}, the data "
                f"gives {num_crops}; use augment=swav (multi-crop) or augment=simclr (2 crops)"
            )
        n = views[0].shape[0]
        self._normalize_prototypes()
        h = forward_by_resolution(backbone, views)  # (V·N, D)
        z = F.normalize(self.projector(h), dim=1)  # (V·N, E)
        scores = self.prototypes(z).view(num_crops, n, -1)  # (V, N, K)
        z_assigned = z.detach().view(num_crops, n, -1)[self.crops_for_assign]  # (A, N, E)
        use_queue = self._queue_active(step) and self._queue_full(n)
        codes = self._codes(scores.detach()[self.crops_for_assign], use_queue)  # (A, N, K), no grad
        if self._queue_active(step):
            self._enqueue(z_assigned)  # after its use, as the official code
        loss = swapped_prediction(scores, codes, self.crops_for_assign, self.temperature)
        logs = {"queue_in_use": torch.tensor(float(use_queue))}
        return ObjectiveOutput(loss=loss, features=h[:n], embedding=z[:n], logs=logs)

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        """C ← n(C): the prototypes are unit vectors, so scores are cosine similarities (official, every step)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    @torch.no_grad()
    def _codes(self, scores: torch.Tensor, use_queue: bool) -> torch.Tensor:
        """(A, N, K) scores of the assigned crops -> (A, N, K) Sinkhorn codes over the global batch (+ queue)."""
        n = scores.shape[1]
        codes = []
        for i, s in enumerate(scores.float()):  # float32 whatever the autocast dtype (exp(1/ε) overflows fp16)
            if use_queue:  # queue scores with the *current* prototypes, in front of the batch
                s = torch.cat([self._local_queue(i) @ self.prototypes.weight.t(), s])
            q = sinkhorn_knopp(s, self.epsilon, self.iterations, dist.all_reduce_sum, dist.world_size())
            codes.append(q[-n:])  # only the current batch's rows
        return torch.stack(codes)

    # ------------------------------------------------------------------------------------------ queue
    def _queue_active(self, step: StepInfo) -> bool:
        return self.queue_length > 0 and step.epoch >= self.queue_start_epoch

    def _queue_full(self, n: int) -> bool:
        world = dist.world_size()
        if self.queue_length % (n * world):
            raise ValueError(
                f"method.queue_length={self.queue_length} must be a multiple of the global batch "
                f"B = {n} per process × {world} processes = {n * world} (official SwAV trims it to "
                f"{self.queue_length - self.queue_length % (n * world)}); set queue_length accordingly"
            )
        return self._queue_fill.read(self.queue_fill) >= self.queue_length

    def _local_queue(self, i: int) -> torch.Tensor:
        """(L/W, E) this process's block of the queue of assigned crop ``i``."""
        return rank_block(self.queue, i, dist.rank(), dist.world_size())

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        """Push (A, N, E) local embeddings into every rank's block (identical on all ranks), newest first."""
        n, world = z.shape[1], dist.world_size()
        push_rank_blocks_(self.queue, dist.gather_no_grad(z.transpose(0, 1).contiguous()), world)  # (W·N, A, E)
        self._queue_fill.write(
            self.queue_fill, min(self._queue_fill.read(self.queue_fill) + n * world, self.queue_length)
        )

    # ------------------------------------------------------------------------------------------ hooks
    def before_optimizer_step(self, step: StepInfo) -> None:
        """Cancel the prototypes' gradients during the first ``freeze_prototypes_niters`` steps (official)."""
        if step.global_step < self.freeze_prototypes_niters:
            for p in self.prototypes.parameters():
                p.grad = None
