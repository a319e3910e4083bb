"""``SSLModule``: one LightningModule for every method: backbone + objective + online evaluation.

Composition, not inheritance: the module owns the backbone, the objective owns heads and method state.
It wires the optimizer (SGD / LARS / AdamW, no decay on 1-D params, linear-scaled lr, per-step warmup-cosine),
logs loss / lr / collapse monitor every step, trains an online linear probe on detached features with its own
optimizer, and runs a weighted kNN (faiss) at validation time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.data.batched import is_raw_batch
from ssl_vision.eval.knn import knn_accuracy
from ssl_vision.nn.monitor import collapse_std  # noqa: F401  (re-exported: ssl_vision.module.collapse_std)
from ssl_vision.objectives.base import Objective, StepInfo
from ssl_vision.optim import (WarmupCosineLR, build_optimizer, check_same_optimizer, cosine_between,
                              groups_for_resume, linear_scaled_lr, param_groups)


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
        self._resume_checkpoint: dict | None = None  # the checkpoint being resumed, until configure_optimizers
        self._resume_position: dict | None = None    # where its data position lands under this run's batch / data
        self.last_train_loss: torch.Tensor | None = None
        self._nonfinite: tuple[torch.Tensor, ...] | None = None  # step, epoch, value of the first non-finite loss
        self._labeled_on_host: int | None = None                 # train labels >= 0 in the batch, from the host
        self.val_results: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- progress
    def total_steps(self) -> int:
        if getattr(self, "_total_steps", None) is not None:
            return self._total_steps
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("schedules need a run length: set trainer.max_epochs or trainer.max_steps "
                             "(trainer.max_time alone gives no step count)")
        resumed = self._steps_after_changed_resume()
        self._total_steps = int(total) if resumed is None else resumed
        return self._total_steps

    def _steps_after_changed_resume(self) -> int | None:
        """The run length when a run resumes under another global batch or data size with ``trainer.max_epochs``:
        the steps already taken plus those the rest of the epochs take under the new batch (Lightning's estimate,
        ``max_epochs × batches per epoch``, counts the earlier epochs at the new batch too, which would end the
        schedule too early or too late). None when the data position maps one to one (the estimate is then exact)."""
        pos, t = getattr(self, "_resume_position", None), self.trainer
        if not pos or not pos.get("changed") or not (t.max_epochs and t.max_epochs > 0):
            return None
        batches = t.num_training_batches
        if not math.isfinite(batches):
            return None
        acc = t.accumulate_grad_batches
        left = (math.ceil(max(0, int(batches) - pos["batches_done"]) / acc)
                + max(0, t.max_epochs - pos["epoch"] - 1) * math.ceil(int(batches) / acc))
        total = pos["global_step"] + left
        if t.max_steps not in (-1, None):
            total = min(total, t.max_steps)
        return max(1, total)

    def steps_per_epoch(self) -> int:
        pos = getattr(self, "_resume_position", None)
        if (self.trainer.max_epochs and self.trainer.max_epochs > 0 and self.trainer.max_steps in (-1, None)
                and not (pos and pos.get("changed"))):
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
        total = self.total_steps()  # first: it sets up the train data, which steps_per_epoch counts
        warmup = int(round(spec.warmup_epochs * self.steps_per_epoch()))
        for g in opt.param_groups:
            g["initial_weight_decay"] = g.get("weight_decay", 0.0)
        sched = WarmupCosineLR(opt, total_steps=total, warmup_steps=min(warmup, total),
                               warmup_start_factor=spec.warmup_start_factor, final_factor=spec.final_factor)
        ckpt, self._resume_checkpoint = self._resume_checkpoint, None
        if ckpt is not None:
            self._continue_schedule(ckpt, opt, sched)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _continue_schedule(self, ckpt: dict, opt: torch.optim.Optimizer, sched: WarmupCosineLR) -> None:
        """Resume semantics of the optimizer: the schedule and every optimizer hyper-parameter come from the
        *current* config, the position (step) and per-parameter state (momentum buffers, Adam moments) from the
        checkpoint.

        Rewrites the checkpoint's optimizer and scheduler states in place before Lightning loads them (the dict
        ``on_load_checkpoint`` received is the one Lightning restores from): the scheduler gets this run's length,
        warmup and base lrs at the saved step, each optimizer group this run's hyper-parameters with the lr of the
        new schedule at that step. A plain resume (same config) rebuilds the same values, bit for bit; extending a
        finished run continues the cosine over the new length instead of staying at the old end's lr of 0. Every
        value that differs from what the checkpoint ran with is printed in one notice.
        """
        saved_sched = (ckpt.get("lr_schedulers") or [None])[0]
        saved_opt = (ckpt.get("optimizer_states") or [None])[0]
        if not saved_sched or not saved_opt or "last_epoch" not in saved_sched:
            return
        new_sched = sched.state_continuing(saved_sched)
        saved_opt["param_groups"] = groups_for_resume(saved_opt["param_groups"], opt, new_sched["_last_lr"])
        ckpt["lr_schedulers"][0] = new_sched
        changes = []
        old_total, new_total = saved_sched.get("total_steps"), new_sched["total_steps"]
        if old_total != new_total:
            changes.append(f"schedule rebuilt for {new_total} steps (was {old_total})")
        if saved_sched.get("warmup_steps") != new_sched["warmup_steps"]:
            changes.append(f"warmup {new_sched['warmup_steps']} steps (was {saved_sched.get('warmup_steps')})")
        saved_spec, spec = (ckpt.get("ssl_vision") or {}).get("optim") or {}, asdict(self.optim_spec)
        for key, value in spec.items():
            old = saved_spec.get(key, value)
            if _plain(old) != _plain(value):
                changes.append(f"{key} {_plain(old)} -> {_plain(value)}")
        old_peak, new_peak = list(saved_sched.get("base_lrs") or []), list(new_sched["base_lrs"])
        if old_peak and old_peak != new_peak:
            changes.append(f"peak lr (after scaling by the global batch) {old_peak[0]:.6g} -> {new_peak[0]:.6g}")
        if changes and self.trainer.is_global_zero:
            step = int(saved_sched["last_epoch"])
            print(f"[ssl_vision] resume: {'; '.join(changes)}; continuing at step {step} with lr "
                  f"{new_sched['_last_lr'][0]:.6g}", flush=True)

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

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count a train batch's labelled samples while its labels are still on the host (for the online probe)."""
        self._labeled_on_host = None
        if self._trainer is not None and self.trainer.training:
            labels = batch.get("labels") if isinstance(batch, dict) else (
                batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 3 else None)
            if torch.is_tensor(labels) and labels.device.type == "cpu":
                self._labeled_on_host = int((labels >= 0).sum())
        return batch

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
        # The loss is checked on the device every step and read back only every trainer.log_every_n_steps steps
        # (when Lightning reads the logged values anyway) and before any checkpoint is written: a read per step
        # would stall the host on the device every step.
        self._track_nonfinite(out.loss)
        if (self.global_step + 1) % max(1, int(self.trainer.log_every_n_steps or 1)) == 0:
            self.raise_if_nonfinite_loss()
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

    def _track_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss is not finite (its step, epoch and value): a few tiny
        device ops, no host read."""
        loss = loss.detach().float()
        if self._nonfinite is None or self._nonfinite[0].device != loss.device:
            minus_one = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._nonfinite = (minus_one, minus_one.clone(), torch.zeros((), device=loss.device))
        step, epoch, value = self._nonfinite
        first = ~torch.isfinite(loss) & (step < 0)
        self._nonfinite = (torch.where(first, self.global_step, step), torch.where(first, self.current_epoch, epoch),
                           torch.where(first, loss, value))

    def raise_if_nonfinite_loss(self) -> None:
        """Raise ``FloatingPointError`` if a loss since the start of training was not finite (one device read)."""
        if self._nonfinite is None:
            return
        step, epoch = torch.stack(self._nonfinite[:2]).tolist()  # the one device read
        if step < 0:
            return
        value = self._nonfinite[2].item()
        # name the checkpoint to continue from as it is on disk: the writer never writes a non-finite state, but
        # weights can blow up between two checkpoints (or an older file may hold NaNs), so last.ckpt is not assumed
        from ssl_vision.checkpoint_io import describe_newest_finite, describe_nonfinite, first_nonfinite
        bad = first_nonfinite(self.state_dict())
        weights = ("" if bad is None else f"; the weights themselves are already non-finite (first: "
                   f"{describe_nonfinite(*bad)})")
        later = ("" if step == self.global_step else f" (noticed at global step {self.global_step}: the loss is read "
                 "back every trainer.log_every_n_steps steps and before every checkpoint)")
        callback = getattr(self.trainer, "checkpoint_callback", None) if self._trainer is not None else None
        raise FloatingPointError(
            f"non-finite loss {value} at global step {step} (epoch {epoch}){later}{weights}; likely causes: "
            "learning rate too high (lower method.optim.base_lr or lengthen warmup_epochs), temperature too low, or "
            "fp16 overflow (use trainer.precision=bf16-mixed or 32-true). Training stopped here; no checkpoint was "
            "written after that step. " + describe_newest_finite(getattr(callback, "dirpath", None)))

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
        # the count comes from the host copy of the labels (on_before_batch_transfer): reading it from the device,
        # or indexing by the mask, would stall the host every step
        labeled, self._labeled_on_host = self._labeled_on_host, None
        if labeled is None:
            labeled = int(keep.sum())
        if labeled == 0:
            return
        opt = self._probe_optimizer()
        with torch.autocast(self.device.type, enabled=False):
            logits = self.online_probe(feats.float())
            if labeled == labels.numel():
                loss = F.cross_entropy(logits, labels)
            else:  # the mean over the labelled samples, without gathering them
                loss = (F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * keep).sum() / labeled
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.online_probe.parameters())
        opt.step()
        self.log("train/probe_loss", loss.detach(), batch_size=labeled)

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
        self.raise_if_nonfinite_loss()  # never a checkpoint of a state after a non-finite loss
        checkpoint["ssl_vision"] = {"run_info": self.run_info, "optim": asdict(self.optim_spec),
                                    "probe_optimizer": self._probe_opt.state_dict() if self._probe_opt else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("ssl_vision") or {}
        self._probe_opt_state = extra.get("probe_optimizer")
        self._probe_opt = None
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        # Resuming a fit: the optimizer must be the one the checkpoint's state belongs to; everything else about the
        # optimizer and schedule is rebuilt from this run's config in configure_optimizers (_continue_schedule).
        check_same_optimizer((extra.get("optim") or {}).get("name"), self.optim_spec.name, "the resumed checkpoint")
        self._resume_checkpoint = checkpoint
        adapt = getattr(trainer.datamodule, "adapt_resume_position", None)
        self._resume_position = adapt(checkpoint) if adapt is not None else None
        if self._resume_position is not None:
            self._resume_position["global_step"] = int(checkpoint.get("global_step", 0))


def _plain(value):
    """Config values as comparable plain data (a tuple saved from the dataclass reads back as a list or tuple)."""
    return list(value) if isinstance(value, (tuple, list)) else value
