"""``SSLModule``: one LightningModule for every method: backbone + objective + online evaluation.

Composition, not inheritance: the module owns the backbone, the objective owns heads and method state.
It wires the optimizer (SGD / LARS / AdamW, no decay on 1-D params, linear-scaled lr, per-step warmup-cosine),
logs loss / lr / collapse monitor every step, trains an online linear probe on detached features with its own
optimizer, and runs a weighted kNN (faiss) at validation time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.data.batched import is_raw_batch
from ssl_vision.eval.knn import knn_accuracy
from ssl_vision.objectives.base import Objective, StepInfo
from ssl_vision.optim import WarmupCosineLR, build_optimizer, cosine_between, linear_scaled_lr, param_groups


@dataclass
class OptimSpec:
    """Optimizer and lr schedule of a method (``conf/method/*.yaml: optim``)."""

    name: str = "sgd"                 # sgd | lars | adamw
    base_lr: float = 0.03             # scaled by the global batch per ``lr_scaling``
    lr_scaling: str = "linear"        # linear (× B/256) | sqrt (× √B) | none
    weight_decay: float = 1e-4        # never applied to 1-D tensors (biases, norms)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    nesterov: bool = False
    trust_coefficient: float = 0.001  # LARS η
    trust_clip: bool = False          # LARC clipping of the LARS rate (solo-learn's clip_lr): min(η‖w‖/‖g‖, lr)/lr
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.0  # warmup starts at base × this
    final_factor: float = 0.0         # cosine ends at base × this
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (DINO 0.04 → 0.4)


@dataclass
class EvalSpec:
    """Online evaluation during pretraining."""

    knn_k: list[int] = field(default_factory=lambda: [200])
    knn_temperature: float = 0.1
    probe_lr: float = 0.1
    probe_momentum: float = 0.9


class SSLModule(L.LightningModule):
    def __init__(self, backbone: nn.Module, feature_dim: int, objective: Objective, num_classes: int,
                 optim: OptimSpec, evaluation: EvalSpec | None = None, run_info: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.optim_spec = optim
        self.eval_spec = evaluation or EvalSpec()
        self.num_classes = num_classes
        self.run_info = dict(run_info or {})   # stored in checkpoints so tools can rebuild the model
        objective.bind(backbone)
        # The online probe has its own optimizer and is stepped outside the main backward; it is kept out of
        # DDP's gradient sync (its grads are averaged by hand) so the main loss need not touch it.
        self.online_probe = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.online_probe.weight, std=0.01)
        nn.init.zeros_(self.online_probe.bias)
        self._ddp_params_and_buffers_to_ignore = [f"online_probe.{n}" for n, _ in self.online_probe.named_parameters()]
        self._probe_opt: torch.optim.Optimizer | None = None
        self._probe_opt_state: dict | None = None
        self._probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.last_val_step = -1
        self._total_steps: int | None = None
        self.last_train_loss: torch.Tensor | None = None
        self.val_results: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- progress
    def total_steps(self) -> int:
        if getattr(self, "_total_steps", None) is not None:
            return self._total_steps
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("schedules need a run length: set trainer.max_epochs or trainer.max_steps "
                             "(trainer.max_time alone gives no step count)")
        self._total_steps = int(total)
        return self._total_steps

    def steps_per_epoch(self) -> int:
        if self.trainer.max_epochs and self.trainer.max_epochs > 0 and self.trainer.max_steps in (-1, None):
            return max(1, self.total_steps() // self.trainer.max_epochs)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            return max(1, self.total_steps())
        return max(1, int(batches) // self.trainer.accumulate_grad_batches)

    def step_info(self, indices: torch.Tensor | None = None) -> StepInfo:
        return StepInfo(global_step=self.global_step, total_steps=self.total_steps(), epoch=self.current_epoch,
                        max_epochs=max(1, self.trainer.max_epochs or 1), steps_per_epoch=self.steps_per_epoch(),
                        indices=indices)

    def global_batch_size(self, per_device: int) -> int:
        t = self.trainer
        return per_device * t.world_size * t.accumulate_grad_batches  # world_size = devices × nodes

    # ----------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        spec = self.optim_spec
        per_device = self.trainer.datamodule.batch_size if self.trainer.datamodule is not None else None
        if per_device is None:
            raise ValueError("SSLModule needs a datamodule with a batch_size to scale the learning rate")
        lr = linear_scaled_lr(spec.base_lr, self.global_batch_size(per_device), rule=spec.lr_scaling)
        groups = param_groups(self.backbone.named_parameters(), spec.weight_decay, name="backbone")
        groups += self.objective.parameter_groups(spec.weight_decay)
        opt = build_optimizer(spec.name, groups, lr=lr, momentum=spec.momentum, betas=tuple(spec.betas),
                              nesterov=spec.nesterov, trust_coefficient=spec.trust_coefficient,
                              trust_clip=spec.trust_clip)
        warmup = int(round(spec.warmup_epochs * self.steps_per_epoch()))
        for g in opt.param_groups:
            g["initial_weight_decay"] = g.get("weight_decay", 0.0)
        sched = WarmupCosineLR(opt, total_steps=self.total_steps(), warmup_steps=min(warmup, self.total_steps()),
                               warmup_start_factor=spec.warmup_start_factor, final_factor=spec.final_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ----------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch, batch_idx) -> None:
        spec = self.optim_spec
        if spec.weight_decay_end is None:
            return
        for g in self.trainer.optimizers[0].param_groups:
            if g["initial_weight_decay"] > 0:  # 1-D params stay at 0
                g["weight_decay"] = cosine_between(self.global_step, self.total_steps(), g["initial_weight_decay"],
                                                   spec.weight_decay_end)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.objective.before_optimizer_step(self.step_info())

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``augment.backend=batched``: the train loader gives raw uint8 images (``ssl_vision.data.batched``); the
        datamodule's ``batch_views`` turns them into ``(views, labels, indices)`` here, on this module's device."""
        if is_raw_batch(batch):
            make_views = getattr(self.trainer.datamodule, "batch_views", None)
            if make_views is None:
                raise RuntimeError("a raw-image batch (augment.backend=batched) needs the SSLDataModule's batch_views")
            return make_views(batch)
        return batch

    def training_step(self, batch, batch_idx):
        views, labels, indices = batch
        views = views[: self.objective.num_views] if self.objective.num_views else views
        out = self.objective(views, self.backbone, self.step_info(indices))
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
                "likely causes: learning rate too high (lower method.optim.base_lr or lengthen warmup_epochs), "
                "temperature too low, or fp16 overflow (use trainer.precision=bf16-mixed or 32-true). Training "
                "stopped here; the last good checkpoint is kept (checkpoints/last.ckpt, written before this step): "
                "fix the cause and continue with resume=auto.")
        # The online probe steps here, on this micro-batch's detached features, not in on_train_batch_end: Lightning
        # runs the checkpoint callback's on_train_batch_end before the module's, so state changed there would be
        # missing from a mid-epoch checkpoint (and a resumed run would lag by that one update).
        self._probe_batch = (out.features.detach(), labels)
        self._step_probe()
        self.last_train_loss = out.loss.detach()  # a tensor: no device sync per step
        n = views[0].shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        self.log("train/collapse_std", collapse_std(out.embedding.detach()), batch_size=n)
        for k, v in out.logs.items():
            self.log(f"train/{k}", v, batch_size=n)
        return out.loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the objective's state updates that follow it (EMA teachers, bank writes).

        Here rather than in ``on_train_batch_end`` so that a checkpoint written at this step (``every_n_steps``,
        mid-epoch) already holds them. Lightning counts the step only after this hook returns, so the step info
        handed on is ``global_step + 1``: the number of optimizer steps taken, as the objectives expect.
        """
        optimizer.step(closure=optimizer_closure)
        info = self.step_info()
        self.objective.after_optimizer_step(self.backbone, replace(info, global_step=info.global_step + 1))

    def _step_probe(self) -> None:
        """One SGD step of the online linear probe on detached features (no gradient reaches the backbone)."""
        if self._probe_batch is None:
            return
        feats, labels = self._probe_batch
        self._probe_batch = None
        keep = labels >= 0                     # unlabeled samples (STL-10's unlabeled split) carry -1
        if not bool(keep.any()):
            return
        opt = self._probe_optimizer()
        with torch.autocast(self.device.type, enabled=False):
            logits = self.online_probe(feats[keep].float())
            loss = F.cross_entropy(logits, labels[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.online_probe.parameters())
        opt.step()
        self.log("train/probe_loss", loss.detach(), batch_size=int(keep.sum()))

    def _probe_optimizer(self) -> torch.optim.Optimizer:
        if self._probe_opt is None:
            self._probe_opt = torch.optim.SGD(self.online_probe.parameters(), lr=self.eval_spec.probe_lr,
                                              momentum=self.eval_spec.probe_momentum, weight_decay=0.0)
            if self._probe_opt_state is not None:
                self._probe_opt.load_state_dict(self._probe_opt_state)
        return self._probe_opt

    # ----------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {0: {"f": [], "y": []}, 1: {"f": [], "y": [], "p": []}}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """Loader 0: train split under the eval transform (kNN bank); loader 1: test split (queries, probe)."""
        x, y, _ = batch
        feats = self.backbone(x).float()
        store = self._val[dataloader_idx]
        store["f"].append(feats)
        store["y"].append(y)
        if dataloader_idx == 1:
            store["p"].append(self.online_probe(feats).argmax(1))

    def on_validation_epoch_end(self) -> None:
        if not self._val[0]["f"] or not self._val[1]["f"]:
            return
        cat = {i: {k: dist.gather_no_grad(torch.cat(v)) for k, v in d.items()} for i, d in self._val.items()}
        bank_y, test_y = cat[0]["y"], cat[1]["y"]
        keep = bank_y >= 0
        res = knn_accuracy(cat[0]["f"][keep].cpu(), bank_y[keep].cpu(), cat[1]["f"].cpu(), test_y.cpu(),
                           num_classes=self.num_classes, ks=tuple(self.eval_spec.knn_k),
                           temperature=self.eval_spec.knn_temperature)
        results = {}
        for i, k in enumerate(self.eval_spec.knn_k):
            prefix = "knn" if i == 0 else f"knn{k}"
            results[f"{prefix}_top1"] = res[k]["top1"]
            results[f"{prefix}_top5"] = res[k]["top5"]
        results["probe_top1"] = 100.0 * (cat[1]["p"] == test_y).float().mean().item()
        for name, value in results.items():
            self.log(f"val/{name}", value, sync_dist=True)  # identical on every rank (computed on gathered features)
        self.val_results = results
        self.last_val_step = self.global_step
        self._val = {}

    # ----------------------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ssl_vision"] = {"run_info": self.run_info, "optim": asdict(self.optim_spec),
                                    "probe_optimizer": self._probe_opt.state_dict() if self._probe_opt else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("ssl_vision") or {}
        self._probe_opt_state = extra.get("probe_optimizer")
        self._probe_opt = None


def collapse_std(embedding: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of the L2-normalised embedding (SimSiam's collapse monitor).

    Healthy ≈ 1/√E for an E-dim embedding; → 0 when all samples map to one point. (N, E) -> scalar.
    """
    if embedding.shape[0] < 2:
        warnings.warn("collapse_std needs at least 2 samples", stacklevel=2)
        return embedding.new_zeros(())
    return F.normalize(embedding.float(), dim=1).std(dim=0).mean()
