"""``SSLModule``: one LightningModule for every method: backbone + objective, optimizer wiring, logging.

Composition, not inheritance: the module owns the backbone, the objective owns heads and method state, the online
evaluator (:class:`~ssl_vision.eval.online.OnlineEvaluator`: linear probe with its own optimizer, weighted kNN at
validation) owns the evaluation. The module wires the optimizer (SGD / LARS / AdamW, no decay on 1-D params,
linear-scaled lr, per-step warmup-cosine), resume semantics, and logs loss / lr / the objective's collapse monitor
every step. Data-side hooks (raw batches to views, host label counts) belong to the data module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import lightning as L
import torch
from torch import nn

from ssl_vision.config_schema import OptimSpec  # the schema of method.optim (conf/method/); ssl_vision.module.OptimSpec
from ssl_vision.eval.checkpoints import create_kwargs, model_record
from ssl_vision.eval.online import EvalSpec, OnlineEvaluator, upgrade_checkpoint
from ssl_vision.nn.monitor import collapse_std
from ssl_vision.objectives.base import Objective, StepInfo
from ssl_vision.optim import (
    WarmupCosineLR,
    build_optimizer,
    check_same_optimizer,
    cosine_between,
    groups_for_resume,
    linear_scaled_lr,
    param_groups,
)


class SSLModule(L.LightningModule):
    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        objective: Objective,
        num_classes: int,
        optim: OptimSpec,
        evaluation: EvalSpec | None = None,
        run_info: dict | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.optim_spec = optim
        self.eval_spec = evaluation or EvalSpec()
        self.num_classes = num_classes
        self.run_info = dict(run_info or {})  # stored in checkpoints so tools can rebuild the model
        objective.bind(backbone)
        # The online evaluator (probe + kNN) has its own optimizer and is stepped outside the main backward; it is
        # kept out of DDP's gradient sync (it averages its grads itself) so the main loss need not touch it.
        self.online_probe = OnlineEvaluator(feature_dim, num_classes, self.eval_spec)
        self._ddp_params_and_buffers_to_ignore = [
            f"online_probe.{n}" for n, _ in (*self.online_probe.named_parameters(), *self.online_probe.named_buffers())
        ]
        self.last_val_step = -1
        self._total_steps: int | None = None
        self._resume_checkpoint: dict | None = None  # the checkpoint being resumed, until configure_optimizers
        self._resume_position: dict | None = None  # where its data position lands under this run's batch / data
        self.last_train_loss: torch.Tensor | None = None
        self._nonfinite: tuple[torch.Tensor, ...] | None = None  # step, epoch, value of the first non-finite loss
        self.val_results: dict[str, float] = {}
        self.knn_protocol: dict | None = None  # k, T, bank and test sizes of the kNN behind val_results

    # ----------------------------------------------------------------------------------------- progress
    def total_steps(self) -> int:
        if getattr(self, "_total_steps", None) is not None:
            return self._total_steps
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "schedules need a run length: set trainer.max_epochs or trainer.max_steps "
                "(trainer.max_time alone gives no step count)"
            )
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
        left = math.ceil(max(0, int(batches) - pos["batches_done"]) / acc) + max(
            0, t.max_epochs - pos["epoch"] - 1
        ) * math.ceil(int(batches) / acc)
        total = pos["global_step"] + left
        if t.max_steps not in (-1, None):
            total = min(total, t.max_steps)
        return max(1, total)

    def steps_per_epoch(self) -> int:
        pos = getattr(self, "_resume_position", None)
        if (
            self.trainer.max_epochs
            and self.trainer.max_epochs > 0
            and self.trainer.max_steps in (-1, None)
            and not (pos and pos.get("changed"))
        ):
            return max(1, self.total_steps() // self.trainer.max_epochs)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            return max(1, self.total_steps())
        return max(1, int(batches) // self.trainer.accumulate_grad_batches)

    def step_info(self, indices: torch.Tensor | None = None) -> StepInfo:
        return StepInfo(
            global_step=self.global_step,
            total_steps=self.total_steps(),
            epoch=self.current_epoch,
            max_epochs=max(1, self.trainer.max_epochs or 1),
            steps_per_epoch=self.steps_per_epoch(),
            indices=indices,
        )

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
        opt = build_optimizer(
            spec.name,
            groups,
            lr=lr,
            momentum=spec.momentum,
            betas=tuple(spec.betas),
            nesterov=spec.nesterov,
            trust_coefficient=spec.trust_coefficient,
            trust_clip=spec.trust_clip,
        )
        total = self.total_steps()  # first: it sets up the train data, which steps_per_epoch counts
        warmup = int(round(spec.warmup_epochs * self.steps_per_epoch()))
        for g in opt.param_groups:
            g["initial_weight_decay"] = g.get("weight_decay", 0.0)
        sched = WarmupCosineLR(
            opt,
            total_steps=total,
            warmup_steps=min(warmup, total),
            warmup_start_factor=spec.warmup_start_factor,
            final_factor=spec.final_factor,
        )
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
            print(
                f"[ssl_vision] resume: {'; '.join(changes)}; continuing at step {step} with lr "
                f"{new_sched['_last_lr'][0]:.6g}",
                flush=True,
            )

    # ----------------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch, batch_idx) -> None:
        spec = self.optim_spec
        if spec.weight_decay_end is None:
            return
        for g in self.trainer.optimizers[0].param_groups:
            if g["initial_weight_decay"] > 0:  # 1-D params stay at 0
                g["weight_decay"] = cosine_between(
                    self.global_step, self.total_steps(), g["initial_weight_decay"], spec.weight_decay_end
                )

    def on_before_optimizer_step(self, optimizer) -> None:
        self.objective.before_optimizer_step(self.step_info())

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
        # missing from a mid-epoch checkpoint (and a resumed run would lag by that one update). The labelled count
        # comes from the host copy of the labels (SSLDataModule.on_before_batch_transfer): read from the device it
        # would stall the host every step.
        labeled = getattr(self.trainer.datamodule, "labeled_on_host", None)
        probe_loss = self.online_probe.train_step(out.features, labels, labeled)
        self.last_train_loss = out.loss.detach()  # a tensor: no device sync per step
        n = views[0].shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        if probe_loss is not None:
            self.log("train/probe_loss", probe_loss, batch_size=int(labeled if labeled is not None else n))
        if self.objective.collapse_monitor is not None:  # the output the objective says is worth watching, if any
            watched = getattr(out, self.objective.collapse_monitor)
            self.log("train/collapse_std", collapse_std(watched.detach()), batch_size=n)
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
        self._nonfinite = (
            torch.where(first, self.global_step, step),
            torch.where(first, self.current_epoch, epoch),
            torch.where(first, loss, value),
        )

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
        weights = (
            ""
            if bad is None
            else f"; the weights themselves are already non-finite (first: {describe_nonfinite(*bad)})"
        )
        later = (
            ""
            if step == self.global_step
            else f" (noticed at global step {self.global_step}: the loss is read "
            "back every trainer.log_every_n_steps steps and before every checkpoint)"
        )
        callback = getattr(self.trainer, "checkpoint_callback", None) if self._trainer is not None else None
        raise FloatingPointError(
            f"non-finite loss {value} at global step {step} (epoch {epoch}){later}{weights}; likely causes: "
            "learning rate too high (lower method.optim.base_lr or lengthen warmup_epochs), temperature too low, or "
            "fp16 overflow (use trainer.precision=bf16-mixed or 32-true). Training stopped here; no checkpoint was "
            "written after that step. " + describe_newest_finite(getattr(callback, "dirpath", None))
        )

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the objective's state updates that follow it (EMA teachers, bank writes).

        Here rather than in ``on_train_batch_end`` so that a checkpoint written at this step (``every_n_steps``,
        mid-epoch) already holds them. Lightning counts the step only after this hook returns, so the step info
        handed on is ``global_step + 1``: the number of optimizer steps taken, as the objectives expect.
        """
        optimizer.step(closure=optimizer_closure)
        info = self.step_info()
        self.objective.after_optimizer_step(self.backbone, replace(info, global_step=info.global_step + 1))

    # ----------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.online_probe.start_validation()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """Loader 0: train split under the eval transform (kNN bank); loader 1: test split (queries, probe)."""
        x, y, _ = batch
        self.online_probe.add(dataloader_idx, self.backbone(x), y)

    def on_validation_epoch_end(self) -> None:
        done = self.online_probe.finish_validation()
        if done is None:
            return
        results, self.knn_protocol = done
        for name, value in results.items():
            self.log(f"val/{name}", value, sync_dist=True)  # identical on every rank (computed on gathered features)
        self.val_results = results
        self.last_val_step = self.global_step

    # ----------------------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite_loss()  # never a checkpoint of a state after a non-finite loss
        checkpoint["ssl_vision"] = {"run_info": self.run_info, "optim": asdict(self.optim_spec), **self.model_record()}

    def model_record(self) -> dict:
        """How to rebuild the backbone and where its (and its EMA teacher's) weights are in the state_dict, stored
        in every checkpoint for the evaluation tools (:func:`ssl_vision.eval.checkpoints.model_record`)."""
        info = self.run_info
        kwargs = create_kwargs(info["backbone"], info["data"]) if "backbone" in info and "data" in info else None
        return model_record(kwargs, self.objective)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint written before the online evaluator held its own optimizer state: moved to where it reads it
        # (on_load_checkpoint runs before Lightning loads the state_dict)
        upgrade_checkpoint(checkpoint)
        extra = checkpoint.get("ssl_vision") or {}
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
