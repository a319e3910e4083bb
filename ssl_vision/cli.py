"""Command-line errors of the tools: one line on stderr, ``[ssl_vision] error: ...``, and exit status 2 (a bad
command line), never a traceback."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

__all__ = ["fail", "require", "CHECKPOINT_EXAMPLE"]

#: what ``checkpoint=`` looks like, for the messages of the evaluation tools
CHECKPOINT_EXAMPLE = "outputs/simclr-resnet18-fashion_mnist/2026-01-01_12-00-00/checkpoints/last.ckpt"


def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``[ssl_vision] error: <message>`` on stderr (one line) and exit with ``status``."""
    print(f"[ssl_vision] error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def require(cfg: Any, key: str, what: str, example: str) -> None:
    """Exit with one line naming ``key`` and an example value when the config leaves it unset (``???``), before
    Hydra's ``MissingMandatoryValue`` traceback would."""
    from omegaconf import OmegaConf

    if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
        fail(f"{key}= is required: {what} (e.g. {key}={example})")
