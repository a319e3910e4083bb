"""A pretraining run's loggers: the CSV record, always, plus the experiment trackers ``conf/logger/`` selects.

* ``logs/metrics.csv`` (:class:`~ssl_vision.run_record.RunCSVLogger`) is part of the run's record, like
  ``results.json``: ``tools/compare.py`` draws its curves from it and a resume continues it. It is written whatever
  ``logger=`` says; ``logger=csv`` (the default) and ``logger=none`` add no tracker to it.
* Trackers: ``logger=wandb``, ``logger=tensorboard``, or several at once, ``logger=[wandb,tensorboard]``. Each file
  of ``conf/logger/`` puts its node under ``logger.<name>`` (``# @package logger.<name>``), so a list merges them;
  any Lightning logger can be added the same way (a ``_target_`` and its arguments). ``save_dir: null`` means the
  run directory, so a resumed run logs where it started.
* Every logger receives the composed configuration (Hydra's own node left out) through Lightning's
  ``log_hyperparams``: wandb's run config, TensorBoard's ``hparams.yaml`` and HParams tab, the CSV logger's
  ``logs/hparams.yaml``; then, per epoch and at the end, the throughput (``throughput/images_per_s``,
  ``throughput/train_s``) and at the end the results' numbers.
* wandb: the run id is kept in ``<run dir>/trackers.json``; a resumed run (``resume=auto`` or a path) passes the same
  ``id`` with ``resume="allow"``, so it continues the same wandb run. In a Hydra multirun every job gets
  ``group=<the sweep directory's name>`` (kept in ``trackers.json`` too, so a resumed job stays in its group).
  Offline unless ``logger.wandb.offline=false``; ``tools/pretrain.py`` sets ``WANDB_MODE=offline`` unless the
  environment says otherwise, so no run waits on a login.
"""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from ssl_vision.run_lock import is_global_zero_process
from ssl_vision.run_record import RunCSVLogger, write_json_atomic

#: ``<run dir>/trackers.json``: the identity of the run in each tracker (wandb id, group, name), for resumes
TRACKERS_FILE = "trackers.json"
#: the CSV record: ``<run dir>/logs/metrics.csv`` and ``logs/hparams.yaml`` (tools/compare.py and resumes read it)
CSV_NAME = "logs"

_open_wandb_runs: list = []  # wandb runs this module started and has not finished (one process, several runs)


def tracker_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """``{name: node}`` of the trackers the config selects (``cfg.logger.<name>`` with a ``_target_``).

    A node of the older one-logger layout (``logger._target_`` itself) is taken as one tracker; an empty or absent
    ``logger`` (``logger=csv``, ``logger=none``, ``logger=[]``) has none.
    """
    node = cfg.get("logger")
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        raise TypeError(
            f"logger must be a group selection (logger=csv, logger=wandb, logger=[wandb,tensorboard]), got {node!r}"
        )
    if "_target_" in node:  # one flat logger node (a config written for the one-logger layout)
        return {} if node._target_ is None else {"logger": node}
    out = {}
    for name, sub in node.items():
        if not isinstance(sub, DictConfig) or "_target_" not in sub:
            raise ValueError(
                f"logger.{name} is not a logger config (it needs a _target_, e.g. "
                f"lightning.pytorch.loggers.TensorBoardLogger); the files of conf/logger/ each put "
                f"their node under logger.<name> with '# @package logger.<name>'"
            )
        if sub._target_ is not None:
            out[str(name)] = sub
    return out


def sweep_group() -> str | None:
    """The multirun's directory name (``outputs/multirun/<time>``) for a job of a Hydra multirun, else None."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.runtime.output_dir).parent.name  # <sweep dir>/<subdir>


def read_trackers(run_dir: Path) -> dict:
    """``<run dir>/trackers.json`` as a dict ({} when there is none; an unreadable one is named and ignored)."""
    path = Path(run_dir) / TRACKERS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"[ssl_vision] cannot read {path} ({exc}); the wandb run gets a new id")
        return {}
    return data if isinstance(data, dict) else {}


def new_wandb_id(length: int = 8) -> str:
    """A new wandb run id: lowercase letters and digits, as wandb's own (``wandb.sdk.lib.runid.generate_id``)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_identity(node: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``id``, ``group``, ``name`` and ``resume`` for the WandbLogger of the run in ``run_dir``.

    Taken from the config when set there, else from ``trackers.json`` (a resumed run: the same wandb run), else new:
    a fresh id, the sweep's group in a multirun, and the run directory as the name. Written back to
    ``trackers.json`` by global rank 0 before the run starts, so a run killed at any point resumes into its own id.
    """
    known = read_trackers(run_dir)
    rec = dict(known.get("wandb") or {})
    run_dir = Path(run_dir)
    default_name = run_dir.name if sweep_group() else f"{run_dir.parent.name}/{run_dir.name}"
    ident = {
        "id": node.get("id") or rec.get("id") or new_wandb_id(),
        "group": node.get("group") or rec.get("group") or sweep_group(),
        "name": node.get("name") or rec.get("name") or default_name,
        "project": node.get("project") or rec.get("project"),
    }
    if is_global_zero_process() and ident != {k: rec.get(k) for k in ident}:
        write_json_atomic(run_dir / TRACKERS_FILE, {**known, "wandb": ident})
    return {**ident, "resume": "allow"}


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The CSV record plus every tracker ``cfg.logger`` selects (see the module's docstring)."""
    run_dir = Path(run_dir)
    _finish_stale_wandb()
    loggers: list[Logger] = [
        RunCSVLogger(save_dir=str(run_dir), name=CSV_NAME, version="", flush_logs_every_n_steps=1)
    ]  # a killed run loses no row
    for name, node in tracker_nodes(cfg).items():
        kwargs: dict[str, Any] = {}
        if "save_dir" in node and node.save_dir is None:
            kwargs["save_dir"] = str(run_dir)
        try:
            target = get_class(node._target_)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"logger.{name}._target_={node._target_!r} is not an importable class ({exc}); e.g. "
                f"lightning.pytorch.loggers.WandbLogger"
            ) from exc
        if isinstance(target, type) and issubclass(target, WandbLogger):
            kwargs.update(wandb_identity(node, run_dir))
        logger = instantiate(node, **kwargs)
        if isinstance(logger, RunCSVLogger) and Path(logger.log_dir) == run_dir / CSV_NAME:
            continue  # the record is already there
        loggers.append(logger)
    return loggers


def run_config(cfg: DictConfig) -> dict:
    """The composed configuration as logged: resolved, Hydra's own node left out, plus the command-line overrides
    (``overrides``: what differs between the runs of a sweep)."""
    params = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    if HydraConfig.initialized():
        params["overrides"] = list(HydraConfig.get().overrides.task)
    return params


def _write_tb_hparams(logger: TensorBoardLogger) -> None:
    """TensorBoard's ``hparams.yaml`` with everything logged so far (Lightning writes it once, when first saved)."""
    from lightning.pytorch.core.saving import save_hparams_to_yaml

    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    save_hparams_to_yaml(str(Path(logger.log_dir) / TensorBoardLogger.NAME_HPARAMS_FILE), logger.hparams)


def log_config(loggers: list[Logger], params: dict, metrics: dict | None = None) -> None:
    """``log_hyperparams(params)`` to each logger; TensorBoard also gets ``metrics`` (its HParams tab links them to
    the parameters) and its ``hparams.yaml`` rewritten. Global rank 0 only (Lightning's loggers check it)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=metrics or None)
            if logger.experiment is not None and is_global_zero_process():
                _write_tb_hparams(logger)
        else:
            logger.log_hyperparams(params)


def epoch_end_step(global_step: int) -> int:
    """The step a summary after ``global_step`` optimizer steps is logged at: ``global_step - 1``, the step of the
    last batch's rows, as Lightning logs epoch-end metrics. (So a resume from the checkpoint at ``global_step``,
    which drops the rows an interrupted leg logged at that step or later, keeps them.)"""
    return max(0, int(global_step) - 1)


class RunTracking(L.Callback):
    """Sends the run's configuration to every logger at the start of each trainer entry (``validate`` for the kNN at
    init, ``fit``: before Lightning's own, empty, hyperparameter logging), and the throughput at each epoch's end.

    ``timer`` is the run's :class:`~ssl_vision.run_record.ThroughputTimer` (its totals cover every leg).
    """

    def __init__(self, params: dict, timer=None) -> None:
        self.params, self.timer = params, timer

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_config(trainer.loggers, self.params)
        remember_wandb_runs(trainer.loggers)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.timer is None or not trainer.loggers or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = {
            "throughput/images_per_s": self.timer.images_per_s,
            "throughput/train_s": self.timer.train_s,
            "throughput/images_seen": float(self.timer.images_seen),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=epoch_end_step(trainer.global_step))


#: results.json keys logged at the end of a run (as ``final/<key>``; throughput ones as ``throughput/<key>``)
FINAL_KEYS = ("knn_top1", "knn_top1_init", "probe_top1", "train_loss")
THROUGHPUT_KEYS = ("images_per_s", "images_per_s_steady", "train_s", "wall_s", "images_seen")


def finish_tracking(trainer: L.Trainer, results: dict, params: dict | None = None) -> None:
    """At the end of a run: its throughput and results to every logger (at :func:`epoch_end_step`), TensorBoard's
    HParams entry with the results as its metrics, the files flushed, and the wandb run finished (its summary holds
    the results) so the next run in this process (a multirun's next job) starts its own."""
    metrics = {f"throughput/{k}": float(results[k]) for k in THROUGHPUT_KEYS if results.get(k) is not None}
    metrics.update({f"final/{k}": float(results[k]) for k in FINAL_KEYS if results.get(k) is not None})
    step = epoch_end_step(int(results.get("steps") or trainer.global_step))
    for logger in trainer.loggers:
        try:
            _finish_one(logger, trainer, results, metrics, step, params)
        # results.json is written already: a tracker failing here does not fail the run
        except Exception as exc:  # noqa: BLE001
            print(
                f"[ssl_vision] {type(logger).__name__} could not record the end of the run: {type(exc).__name__}: {exc}"
            )


def _finish_one(
    logger: Logger, trainer: L.Trainer, results: dict, metrics: dict, step: int, params: dict | None
) -> None:
    if metrics:
        logger.log_metrics(metrics, step=step)
    if isinstance(logger, TensorBoardLogger) and params is not None:
        final = {k: v for k, v in metrics.items() if k.startswith("final/")}
        if final:
            log_config([logger], params, metrics={f"hp/{k[6:]}": v for k, v in final.items()})
    logger.save()
    if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
        run = logger.experiment  # its summary holds the last value of each metric: the ones just logged
        run.finish()
        if run in _open_wandb_runs:
            _open_wandb_runs.remove(run)
    elif isinstance(logger, TensorBoardLogger) and logger._experiment is not None:
        logger.experiment.flush()


def remember_wandb_runs(loggers: list[Logger]) -> None:
    """Note the wandb runs these loggers started (see :func:`_finish_stale_wandb`)."""
    for logger in loggers:
        if (
            isinstance(logger, WandbLogger)
            and logger._experiment is not None
            and logger._experiment not in _open_wandb_runs
        ):
            _open_wandb_runs.append(logger._experiment)


def _finish_stale_wandb() -> None:
    """A wandb run this module started for an earlier run in this process that ended without
    :func:`finish_tracking` (it raised) is finished now, with a failure exit code: Lightning's WandbLogger would
    otherwise log the new run into it."""
    while _open_wandb_runs:
        run = _open_wandb_runs.pop()
        try:
            run.finish(exit_code=1)
        except Exception as exc:  # noqa: BLE001 -- a stale tracker never stops a new run
            print(f"[ssl_vision] could not finish the earlier wandb run {getattr(run, 'id', '?')}: {exc}")
