"""The composition root: the only module that reads a Hydra config and turns it into objects.

Everything else in ``ssl_vision`` takes explicit typed arguments; ``tools/*.py`` are thin Hydra entry points
that call into here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssl_vision import distributed as dist
from ssl_vision.backbones import create_backbone
from ssl_vision.config_checks import check_pretrain_config, recipe_line
from ssl_vision.data import SSLDataModule
from ssl_vision.module import EvalSpec, OptimSpec, SSLModule
from ssl_vision.objectives import build_objective
from ssl_vision.progress import StepBoundedProgressBar, route_lightning_logs
from ssl_vision.checkpoint_io import AtomicCheckpointIO, RunCheckpoint
from ssl_vision.resume import check_resume_compatible, find_resume_checkpoint
from ssl_vision import run_record
from ssl_vision.loggers import RunTracking, build_loggers, finish_tracking, run_config
from ssl_vision.run_lock import RunLock, is_global_zero_process, register_resolvers
from ssl_vision.run_record import (
    RunCSVLogger,
    ThroughputTimer,
    adopt_leg_dir,
    read_results,
    trim_metrics_csv,
    write_results,
)

register_resolvers()  # ${ssl_vision_unique_dir:...} in conf/pretrain.yaml, for configs composed in-process


# A run writes init.ckpt before fit and a resumed run continues in its own checkpoints/: a non-empty directory is
# what our runs expect there, and Lightning's warning about it would only alarm.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def build_datamodule(cfg: DictConfig) -> SSLDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    views = OmegaConf.to_container(cfg.augment.views, resolve=True)
    dm = SSLDataModule(views=views, seed=int(cfg.seed), **data)
    return dm.with_backend(cfg.augment.get("backend", "per_sample"))  # per_sample | batched (data/batched.py)


def build_module(cfg: DictConfig, run_info: dict | None = None, num_samples: int | None = None) -> SSLModule:
    b = cfg.backbone
    backbone, dim = create_backbone(
        b.name,
        in_chans=cfg.data.in_chans,
        image_size=cfg.data.image_size,
        width=b.width,
        channels=None if b.channels is None else list(b.channels),
        small_stem=b.small_stem,
        zero_init_residual=b.zero_init_residual,
        patch_size=b.patch_size,
        drop_path_rate=b.drop_path_rate,
        timm_kwargs=OmegaConf.to_container(b.timm_kwargs, resolve=True) if b.get("timm_kwargs") else None,
    )
    if cfg.perf.channels_last:
        # NHWC weights: convolutions then produce NHWC outputs whatever the input layout; momentum / teacher copies
        # (deep copies) keep the format; state_dict values are unchanged, so checkpoints load either way
        backbone = backbone.to(memory_format=torch.channels_last)
    kwargs = OmegaConf.to_container(cfg.method.kwargs, resolve=True)
    objective = build_objective(cfg.method.name, dim, num_samples=num_samples, **kwargs)
    optim = OptimSpec(**OmegaConf.to_container(cfg.method.optim, resolve=True))
    ev = EvalSpec(knn_k=list(cfg.eval.knn_k), knn_temperature=cfg.eval.knn_temperature, probe_lr=cfg.eval.probe_lr)
    module = SSLModule(
        backbone, dim, objective, num_classes=cfg.data.num_classes, optim=optim, evaluation=ev, run_info=run_info
    )
    if cfg.perf.compile:
        compile_backbones(module, backend=cfg.perf.compile_backend, mode=cfg.perf.compile_mode)
    return module


def compile_backbones(module: SSLModule, backend: str = "inductor", mode: str | None = None) -> list[str]:
    """``perf.compile``: ``torch.compile`` the online backbone and its momentum / teacher copies, in place.

    ``nn.Module.compile`` compiles a module's call and leaves the module itself (parameters, buffers, state_dict
    keys) as it was, unlike ``torch.compile(module)``, whose wrapper prefixes every key with ``_orig_mod.``: so
    checkpoints, resumes, EMA updates and the evaluation tools see the same model either way. Run after
    ``objective.bind`` (the copies exist); each copy gets its own compiled call.

    What is compiled is what every code path calls: a ResNet (or any backbone) whole; a ViT's transformer
    ``blocks`` (nearly all its compute), since MAE's masked encoder calls the ViT's parts, not the ViT; plus the
    objective's own ``compile_targets`` (MAE: its decoder blocks). Returns the compiled modules' names.
    """
    names = backbone_trunks(module) + [f"objective.{n}" for n in module.objective.compile_targets()]
    for name in names:
        module.get_submodule(name).compile(backend=backend, mode=mode)
    return names


def backbone_trunks(module: SSLModule) -> list[str]:
    """Names of the modules that carry the backbone's compute in every code path: the online backbone and its
    momentum / teacher copies (the objective's children of the backbone's type), each whole for a ResNet, or its
    transformer ``blocks`` for a ViT (MAE's masked encoder calls the ViT's parts, not the ViT)."""
    kind = type(module.backbone)
    owners = ["backbone"] + [f"objective.{n}" for n, m in module.objective.named_children() if type(m) is kind]
    return [
        f"{o}.blocks" if isinstance(getattr(module.get_submodule(o), "blocks", None), nn.Sequential) else o
        for o in owners
    ]


def method_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The Lightning callbacks the method's config lists (``method.callbacks``: ``[{_target_: ..., key: value}]``),
    instantiated in order; none when the key is absent. They write into the trainer's ``default_root_dir``, the run
    directory."""
    from hydra.utils import instantiate

    specs = cfg.method.get("callbacks") or []
    built = [instantiate(spec, _convert_="all") for spec in specs]
    for spec, cb in zip(specs, built):
        if not isinstance(cb, L.Callback):
            raise TypeError(
                f"method.callbacks: {spec.get('_target_')!r} made a {type(cb).__name__}, not a lightning Callback"
            )
    return built


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    logger = build_loggers(cfg, run_dir)  # logs/metrics.csv always, plus the trackers logger= selects (loggers.py)
    sync_bn = bool(cfg.method.get("sync_batchnorm", False))
    multi = tcfg.get("devices") not in (1, "1") or tcfg.get("num_nodes", 1) != 1
    if sync_bn and multi and tcfg.get("accelerator") == "cpu":
        warnings.warn(
            "method asks for SyncBN but torch has no CPU SyncBatchNorm: BN stays per process on CPU", stacklevel=2
        )
        sync_bn = False
    if tcfg.get("strategy") == "ddp":  # the collective timeout (distributed.timeout_s) and a clear error when it fires
        tcfg["strategy"] = dist.TimeoutDDPStrategy(timeout_s=collective_timeout_s(cfg))
    if tcfg.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # the bar reads the logged loss back from the device at each refresh (a host-device sync): refresh it when
        # the loggers read the values anyway, every trainer.log_every_n_steps steps; the epoch's total stops where
        # trainer.max_steps ends the run (so does the ETA)
        callbacks = [*callbacks, StepBoundedProgressBar(refresh_rate=max(1, int(tcfg.get("log_every_n_steps") or 1)))]
    # AtomicCheckpointIO: a crash while saving leaves the previous checkpoint intact (temp file + fsync + rename)
    return L.Trainer(
        **tcfg,
        logger=logger,
        callbacks=callbacks,
        sync_batchnorm=sync_bn and multi,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )


def collective_timeout_s(cfg: DictConfig) -> float:
    """``distributed.timeout_s``, or when null the default of the accelerator: 1800 s on GPUs (torch's own default,
    room for NCCL start-up, compilation and large checkpoint writes), 300 s on the CPU (see conf/pretrain.yaml)."""
    value = cfg.get("distributed", {}).get("timeout_s")
    if value is None:
        return 300.0 if cfg.trainer.get("accelerator") == "cpu" else 1800.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"distributed.timeout_s must be a positive number of seconds or null (the accelerator's "
            f"default), got {value!r}"
        )
    return float(value)


def save_init_checkpoint(module: SSLModule, path: Path) -> None:
    """``checkpoints/init.ckpt``: the weights before the first optimizer step (the objective's own initialisation
    included), in the format the evaluation tools read, so the random-init baseline of the *same* backbone can be
    kNN-evaluated, linear-probed or fine-tuned like any checkpoint. Not resumable (no optimizer state)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(
        {
            "state_dict": module.state_dict(),
            "global_step": 0,
            "epoch": 0,
            "ssl_vision": {"run_info": module.run_info, "init": True, **module.model_record()},
        },
        path,
    )


def build_checkpoint_callback(cfg: DictConfig, run_dir: Path) -> RunCheckpoint:
    """Periodic checkpoints (the newest ``save_top_k`` kept) plus ``last.ckpt``.

    ``checkpoint.every_n_steps`` (optimizer steps) replaces ``checkpoint.every_n_epochs`` when set: Lightning takes
    one trigger per callback, and two callbacks would fight over ``last.ckpt``. ``last.ckpt`` is written with every
    periodic checkpoint and at the end of training (:class:`~ssl_vision.checkpoint_io.RunCheckpoint`). A resume from a
    mid-epoch checkpoint continues with the next unseen batch (``ResumableLoader`` in :mod:`ssl_vision.data`).
    Such a checkpoint is written in the callbacks' ``on_train_batch_end``; ``SSLModule`` does all of a step's state
    updates before that (probe step in ``training_step``, ``objective.after_optimizer_step`` in ``optimizer_step``),
    so the checkpoint holds the complete state after the step.
    """
    c = cfg.checkpoint
    every_steps = c.get("every_n_steps")
    if every_steps is not None and int(every_steps) < 1:
        raise ValueError(
            f"checkpoint.every_n_steps must be a positive number of optimizer steps or null, got {every_steps}"
        )
    trigger = (
        {"every_n_train_steps": int(every_steps), "every_n_epochs": None}
        if every_steps
        else {"every_n_epochs": c.every_n_epochs}
    )
    return RunCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}-step{step:07d}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=c.save_top_k,
        monitor="step",
        mode="max",
        **trigger,
    )


def run_pretraining(cfg: DictConfig, extra_callbacks: list | None = None) -> dict:
    """Pretrain as the config says; returns the results dict (also written to ``<run dir>/results.json``).

    ``extra_callbacks`` are added to the Trainer's (tests use one to stop a run part-way).

    The run directory is Hydra's output directory, or for a resume the directory of the checkpoint resumed (its
    checkpoints, ``logs/metrics.csv`` and ``results.json`` continue there; this leg's own Hydra directory moves to
    ``<run dir>/resumes/``). Global rank 0 locks it for the duration (:class:`~ssl_vision.run_lock.RunLock`), so a
    resume into a run that is still alive is refused. ``results.json`` covers every leg of the run
    (:class:`~ssl_vision.run_record.ThroughputTimer`).
    """
    check_pretrain_config(cfg)  # a value of the wrong type or range is named here, before anything is built
    if is_global_zero_process():  # which paper recipe of (method, backbone family) this run trains with, if any
        print(recipe_line(cfg), flush=True)
    route_lightning_logs()  # each Lightning INFO line once (through Hydra's handlers), not twice
    t_start = run_record.clock()  # wall_s covers the whole call: building, evaluation at init, fit, final eval
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_prefix = f"{cfg.method.name}-{cfg.backbone.name}-{cfg.data.name}"
    resume = find_resume_checkpoint(cfg.resume, Path(cfg.paths.output_root), run_prefix)
    leg_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = leg_dir
    if resume is not None and resume.parent.name == "checkpoints":
        run_dir = resume.parent.parent  # a resumed run continues writing where it started
        print(f"[ssl_vision] resuming {resume}")
    elif cfg.resume == "auto":
        print(f"[ssl_vision] resume=auto: no earlier {run_prefix} run under {cfg.paths.output_root}; starting fresh")
    # one live run per directory: global rank 0 holds <run_dir>/.lock until it returns (the kernel drops it if the
    # process dies); a resume into a directory whose run is still alive is refused here, before anything is written
    lock = RunLock(run_dir)
    if is_global_zero_process():
        lock.acquire()
    try:
        return _run_locked(cfg, extra_callbacks, t_start, resume, run_dir, leg_dir)
    finally:
        lock.release()


def _run_locked(
    cfg: DictConfig, extra_callbacks: list | None, t_start: float, resume: Path | None, run_dir: Path, leg_dir: Path
) -> dict:
    leader = is_global_zero_process()
    resumed_elsewhere = resume is not None and leg_dir.resolve() != run_dir.resolve()
    if leader and resumed_elsewhere:  # this leg's .hydra/ and log join the run directory (resumes/<time>/)
        adopt_leg_dir(leg_dir, run_dir)
    run_info = {
        "method": cfg.method.name,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "data": {k: cfg.data[k] for k in ("name", "image_size", "in_chans", "num_classes")},
        "config": OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True),
    }  # the job's config (Hydra's own node left out)
    resume_step, timer_state = None, None
    if resume is not None:  # before anything is built: a pickle is refused without running it, a mismatch named
        resumed = check_resume_compatible(
            resume,
            cfg.method.name,
            run_info["backbone"],
            run_info["data"],
            optim=OmegaConf.to_container(cfg.method.optim, resolve=True),
        )
        resume_step = int(resumed.get("global_step", 0))
        timer_state = (resumed.get("callbacks") or {}).get(ThroughputTimer.__qualname__)  # the legs before this one
        del resumed
    previous = read_results(run_dir) if resume is not None else None
    dm = build_datamodule(cfg)
    dm.setup()  # the training-set size is part of some objectives (InstDisc's memory bank)
    module = build_module(cfg, run_info, num_samples=dm.num_train_samples)
    timer = ThroughputTimer(
        start=t_start, resumed_from=str(resume.resolve()) if resume is not None else None, previous_results=previous
    )
    if timer_state:  # known before fit (Lightning loads it again there): this leg's number marks its metrics.csv rows
        timer.load_state_dict(timer_state)
    ckpt = build_checkpoint_callback(cfg, run_dir)
    callbacks = [timer, ckpt, RunTracking(run_config(cfg), timer)]  # the config and throughput to every logger
    callbacks += method_callbacks(cfg)  # e.g. MAE's reconstruction grid (conf/method/mae.yaml: callbacks)
    trainer = build_trainer(cfg, run_dir, [*callbacks, *(extra_callbacks or [])])
    for csv_log in (lg for lg in trainer.loggers if isinstance(lg, RunCSVLogger)):
        csv_log.leg = timer.leg_number  # the leg column of metrics.csv
        if resume_step is not None and leader:  # rows after the checkpoint go, a finished leg's end-of-run rows stay
            trim_metrics_csv(Path(csv_log.log_dir) / "metrics.csv", before_step=resume_step, results=previous)

    if cfg.eval.knn_at_init and resume is None:
        trainer.validate(module, datamodule=dm, verbose=False)
        timer.knn_top1_init = module.val_results.get("knn_top1")  # kept in the checkpoints: resumes report it too
    if cfg.checkpoint.get("save_init") and resume is None and trainer.is_global_zero:
        save_init_checkpoint(module, run_dir / "checkpoints" / "init.ckpt")
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    if cfg.eval.final_eval and module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=dm, verbose=False)

    loss = module.last_train_loss
    if loss is not None:
        loss = dist.all_reduce_mean(loss)  # the global mean, not one process's share
    steps = int(trainer.global_step)
    timer.finish(steps)
    results = {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        "steps": steps,
        "images_seen": int(timer.images_seen),
        "wall_s": round(timer.wall_s, 2),
        "train_s": round(timer.train_s, 2),
        "images_per_s": round(timer.images_per_s, 2),
        "images_per_s_steady": None if timer.images_per_s_steady is None else round(timer.images_per_s_steady, 2),
        "train_loss": None if loss is None else float(loss),
        "knn_top1": module.val_results.get("knn_top1"),
        "knn_top1_init": timer.knn_top1_init,
        "probe_top1": module.val_results.get("probe_top1"),
        "knn_protocol": module.knn_protocol,  # k, temperature, bank_size, test_size behind knn_top1 (and _init)
        "eval_skipped": dm.eval_skipped,  # why knn_top1 / probe_top1 are null (data without labels), else null
        "checkpoint": str(Path(ckpt.last_model_path).resolve()) if ckpt.last_model_path else None,
        "run_dir": str(run_dir.resolve()),
        "legs": timer.legs,
    }
    if previous and previous.get("steps") == steps:
        # nothing (or nothing new) was trained or evaluated in this leg -- a resume of a finished run: keep the
        # numbers the run's results.json has rather than replacing them with empty ones
        for key in ("train_loss", "knn_top1", "probe_top1", "knn_top1_init", "knn_protocol"):
            if results[key] is None and previous.get(key) is not None:
                results[key] = previous[key]
    if leader and resumed_elsewhere:  # what DDP processes wrote into this leg's directory since
        adopt_leg_dir(leg_dir, run_dir)
    results["is_global_zero"] = trainer.is_global_zero
    if trainer.is_global_zero:
        write_results(run_dir, {k: v for k, v in results.items() if k != "is_global_zero"})
    finish_tracking(trainer, results, run_config(cfg))  # throughput and results to the loggers; wandb run finished
    return results
