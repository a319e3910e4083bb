"""What a run prints while it works: the training progress bar, Lightning's log lines, offline tools' bars.

* :class:`StepBoundedProgressBar` -- Lightning's TQDM bar whose epoch total stops where ``trainer.max_steps`` ends
  the run (Lightning's own bar only does that for ``max_epochs=-1``; otherwise it shows the whole epoch and its ETA
  runs past the end of the run).
* :func:`route_lightning_logs` -- one copy of each Lightning INFO line. ``import lightning`` gives the
  ``lightning`` logger a console handler of its own (``INFO: ...``) and leaves it propagating to the root logger;
  under Hydra's job logging the root logger has a console (and a file) handler too, so every line was printed
  twice. When the root logger has handlers, Lightning's own handler is removed and the lines go through the
  root's (Hydra's format, and the job's log file), as ``lightning.pytorch`` itself does when it is imported
  after the root logger is configured.
* :func:`progress_enabled` / :func:`progress` -- tqdm bars for the offline tools (feature extraction, linear probe
  epochs): on stderr, shown when stderr is a terminal or when asked for with ``progress=true``, quiet otherwise
  (tests, logs redirected to a file).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepBoundedProgressBar", "route_lightning_logs", "progress_enabled", "progress"]

T = TypeVar("T")


class StepBoundedProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` with the epoch's total cut at ``trainer.max_steps``.

    ``max_steps`` counts optimizer steps; with ``accumulate_grad_batches = a`` the run has
    ``(max_steps - global_step) * a`` batches left, so an epoch that the step limit ends part-way shows that many
    batches (plus those already run in it, after a mid-epoch resume) instead of the whole epoch, and the ETA is the
    run's.
    """

    def _batches_left(self) -> float:
        t = self.trainer
        if t.max_steps is None or t.max_steps < 0:
            return math.inf
        return max(0, t.max_steps - t.global_step) * max(1, int(t.accumulate_grad_batches))

    @property
    def total_train_batches(self) -> int | float:
        # read at the start of an epoch (Lightning calls on_train_epoch_start for epochs that start at batch 0)
        return min(super().total_train_batches, self._batches_left())

    def on_train_start(self, trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if trainer.fit_loop.restarted_mid_epoch and self.train_progress_bar is not None:
            # Lightning skips on_train_epoch_start when it resumes mid-epoch: the bar would have no total at all
            # batches of this epoch run before the checkpoint (as restored: ``ready``; ``completed`` lags by one
            # when the checkpoint was written in on_train_batch_end, until Lightning's restart bookkeeping runs)
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            total = min(super().total_train_batches, done + self._batches_left())
            self.train_progress_bar.reset(total=None if math.isinf(total) else int(total))
            self.train_progress_bar.n = done
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")


class _DropAdverts(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines: advertisements, not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_DROP_ADVERTS = _DropAdverts()


def route_lightning_logs() -> None:
    """Print each Lightning INFO line once: drop Lightning's own console handler when the root logger has
    handlers (Hydra's job logging), so the lines go through those (see the module docstring). Lightning's
    "💡 Tip:" advertisements are dropped either way."""
    import lightning

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _DROP_ADVERTS not in rank_zero.filters:
        rank_zero.addFilter(_DROP_ADVERTS)
    if not logging.getLogger().handlers:
        return
    own = getattr(lightning, "_console", None)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler is own or (name != "lightning" and type(handler) is logging.StreamHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def progress_enabled(option: Any = None) -> bool:
    """``progress=true``: always; ``false``: never; ``null`` / ``auto``: when stderr is a terminal."""
    if option is None or (isinstance(option, str) and option.lower() == "auto"):
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    if isinstance(option, str):
        value = option.strip().lower()
        if value in ("true", "1", "yes", "on"):
            return True
        if value in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"progress must be true, false or auto (a bar when stderr is a terminal), got {option!r}")
    return bool(option)


def progress(
    iterable: Iterable[T],
    desc: str,
    enabled: Any = None,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on stderr when :func:`progress_enabled` says so, else unchanged. The
    finished bar stays on screen (its count, rate and time) unless ``leave=False`` (bars repeated per epoch)."""
    if not progress_enabled(enabled):
        return iterable
    from tqdm import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave)
