"""InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
https://arxiv.org/abs/1805.01978; code: zhirongw/lemniscate.pytorch). docs/reference.md §1 and §11.

Every training image is its own class. Its 128-d L2-normalised embedding ``f`` is scored against a memory bank
``V`` (one row per image, no gradient) with a non-parametric softmax ``P(i|f) = exp(v_i·f/τ)/Z``, trained by NCE
against ``m`` noise rows drawn uniformly from the bank (or, with ``nce_k=0``, by the full softmax over all ``n``
rows). After the optimizer step the bank rows of the batch move towards the new features:
``v_i ← n(μ·v_i + (1−μ)·f_i)``.

Distributed (docs/reference.md §11): the partition constant Z is all-reduced when it is estimated, and every process
applies the bank writes of the *global* batch (``(index, feature)`` are all-gathered), so the banks stay identical.
Noise is drawn from a generator seeded by ``(noise_seed, global_step)`` for the whole global batch, each process
keeping its own rows: 1 and W processes (and a resumed run) draw exactly the same negatives for each sample.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.losses.nce import bank_softmax_loss, check_on_device, nce_loss, partition_estimate
from ssl_vision.nn.heads import instdisc_head
from ssl_vision.nn.memory import HostMirror, bank_init, bank_scores, write_bank_rows_
from ssl_vision.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    check_count,
    check_range,
    check_temperature,
    register,
)


def draw_noise(
    positives: torch.Tensor,
    num_samples: int,
    num_noise: int,
    seed: int,
    global_step: int,
    rank: int = 0,
    world_size: int = 1,
    exclude_positive: bool = False,
) -> torch.Tensor:
    """Noise bank rows, drawn uniformly, reproducible across process counts and resumes.

    positives: (N,) this process's bank rows (its slice ``[rank·N, (rank+1)·N)`` of the global batch).
    One generator seeded by ``(seed, global_step)`` draws the (N·W, m) noise of the whole global batch and each
    process keeps its own rows, so sample b meets the same negatives whether the batch is split over 1 or W
    processes (the price: every process draws N·W·m integers instead of N·m).
    As in the official code (an alias sampler over uniform weights) a noise row may coincide with the positive;
    ``exclude_positive`` instead draws from the other n−1 rows (the small-data-set pitfall in docs/reference.md §1).
    With gradient accumulation the micro-batches of one step reuse the same noise rows for different samples;
    each sample's noise is still uniform and independent of it. Returns (N, m) int64 on ``positives.device``.
    """
    n_local = positives.shape[0]
    gen = torch.Generator(device=positives.device)
    gen.manual_seed((seed * 1_000_003 + global_step) % (2**63 - 1))
    high = num_samples - 1 if exclude_positive else num_samples
    rows = torch.randint(high, (n_local * world_size, num_noise), generator=gen, device=positives.device)
    noise = rows[rank * n_local : (rank + 1) * n_local]
    if exclude_positive:  # skip over the positive: uniform over the n−1 other rows
        noise = noise + (noise >= positives[:, None]).long()
    return noise


@register("instdisc")
class InstDisc(Objective):
    """Head: one Linear (feature_dim → embed_dim, with bias, as lemniscate's ``fc``) then L2 normalisation;
    ``head_bn=True`` puts a BatchNorm1d after the Linear (a deviation for short runs on small data sets).

    State (all in buffers, so a checkpoint resumes exactly): ``bank`` (n, embed_dim), ``z`` (the frozen partition
    constant) and ``z_set`` (whether it has been estimated). The features waiting to be written to the bank after
    the optimizer step live in a plain attribute: they never outlive a step, so they are not checkpointed.
    """

    num_views = 1

    @classmethod
    def tiny_kwargs(cls) -> dict:
        return {"embed_dim": 8, "nce_k": 8}

    def __init__(
        self,
        feature_dim: int,
        num_samples: int | None = None,
        embed_dim: int = 128,
        temperature: float = 0.07,
        nce_k: int = 4096,
        bank_momentum: float = 0.5,
        noise_seed: int = 0,
        noise_excludes_positive: bool = False,
        head_bn: bool = False,
    ):
        super().__init__()
        if num_samples is None:
            raise ValueError(
                "InstDisc needs num_samples, the training-set size (one memory-bank row per image); "
                "the launcher passes the data module's num_train_samples, pass it when building by hand"
            )
        if num_samples < 2:
            raise ValueError(f"InstDisc needs a training set of at least 2 images, got num_samples={num_samples}")
        check_temperature("temperature", temperature, "InstDisc uses 0.07")
        check_count(
            "nce_k", nce_k, minimum=0, note="noise samples per positive, 0 = full softmax over the bank; InstDisc: 4096"
        )
        check_range("bank_momentum", bank_momentum, 0.0, 1.0, high_open=True, note="InstDisc: 0.5")
        check_count("embed_dim", embed_dim, note="InstDisc: 128")
        self.num_samples, self.temperature, self.bank_momentum = num_samples, temperature, bank_momentum
        self.noise_seed, self.noise_excludes_positive = noise_seed, noise_excludes_positive
        # m ≤ n − 1: more noise draws than other images only repeats rows (and n − 1 is all there is to exclude)
        self.num_noise = min(nce_k, num_samples - 1)
        if self.num_noise < nce_k:
            warnings.warn(
                f"InstDisc: nce_k={nce_k} noise samples capped at n-1={self.num_noise} for a training set "
                f"of {num_samples} images",
                stacklevel=2,
            )
        # head_bn (not in the official code) centres the embedding over the batch before normalising: a random-init
        # network maps every image near one common direction, so the first bank writes all look alike and only a
        # long first epoch (ImageNet's 5000 steps) lets the features spread; short small-data runs need the help.
        self.head = instdisc_head(feature_dim, embed_dim, bn=head_bn)
        self.register_buffer("bank", bank_init(num_samples, embed_dim))
        self.register_buffer("z", torch.tensor(0.0))
        self.register_buffer("z_set", torch.tensor(False))
        self._z_set = HostMirror()  # host copy of z_set: read once (after construction or a load), not per step
        HostMirror.watch(self, "_z_set")
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indices, features) awaiting the bank write

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, D) -> L2-normalised embeddings (N, embed_dim)."""
        return F.normalize(self.head(h), dim=1)

    def forward(self, views: list[torch.Tensor], backbone: nn.Module, step: StepInfo) -> ObjectiveOutput:
        idx = step.indices
        if idx is None:
            raise ValueError(
                "InstDisc needs the sample indices of the batch (StepInfo.indices): the memory bank "
                "has one row per training image; SSLDataModule's train batches carry them"
            )
        idx = idx.to(self.bank.device, torch.long)
        if idx.numel():  # checked on the device: a per-step read of the indices would stall the host on a GPU
            check_on_device(
                (idx >= 0) & (idx < self.num_samples),
                f"a sample index is outside the memory bank of {self.num_samples} rows (valid: 0 to "
                f"{self.num_samples - 1}); num_samples must be the size of the training set the indices "
                "refer to",
            )
        h = backbone(views[0])  # (N, D)
        f = self.embed(h)  # (N, E)
        # Scores in float32 even under autocast: at τ = 0.07 a bf16 logit error of 0.06 is a 6% error in exp.
        with torch.autocast(f.device.type, enabled=False):
            f32 = f.float()
            bank = self.bank.detach()  # never part of the graph
            if self.num_noise == 0:  # full softmax over all n rows
                logits = f32 @ bank.T / self.temperature  # (N, n)
                loss = bank_softmax_loss(logits, idx)
                pos = logits.gather(1, idx[:, None]).squeeze(1)
            else:
                noise = draw_noise(
                    idx,
                    self.num_samples,
                    self.num_noise,
                    self.noise_seed,
                    step.global_step,
                    dist.rank(),
                    dist.world_size(),
                    self.noise_excludes_positive,
                )
                cols = torch.cat([idx[:, None], noise], dim=1)  # (N, 1+m), positive in slot 0
                logits = bank_scores(f32, bank, cols) / self.temperature
                if not self._z_set.read(self.z_set):
                    self._estimate_z(logits)
                loss = nce_loss(logits, self.z, self.num_samples)
                pos = logits[:, 0]
        self._pending.append((idx, f.detach().float()))
        logs = {"bank_pos_sim": (pos.detach() * self.temperature).mean()}  # v_i·f_i: how well the bank tracks f
        if self.num_noise:
            logs["nce_log_z"] = self.z.detach().log()
        return ObjectiveOutput(loss=loss, features=h, embedding=f, logs=logs)

    @torch.no_grad()
    def _estimate_z(self, logits: torch.Tensor) -> None:
        """Z = n · mean(exp(s)) over this first batch's positive and noise scores, averaged over processes (every
        process holds as many scores), then frozen: re-estimating it would silently change the objective."""
        self.z.copy_(dist.all_reduce_mean(partition_estimate(logits, self.num_samples)))
        self._z_set.write(self.z_set, True)

    @torch.no_grad()
    def after_optimizer_step(self, backbone: nn.Module, step: StepInfo) -> None:
        """Write the step's features into the bank, the global batch on every process (identical banks)."""
        if not self._pending:
            return
        idx = torch.cat([i for i, _ in self._pending])
        feats = torch.cat([f for _, f in self._pending])
        self._pending = []
        idx, feats = dist.gather_no_grad(idx), dist.gather_no_grad(feats)
        # a global batch holds each image once (a permutation slice), so the rows written are distinct
        write_bank_rows_(self.bank, idx, feats, self.bank_momentum)
