"""ssl_vision: self-supervised vision pretraining with pluggable objectives.

One Lightning module (:class:`ssl_vision.module.SSLModule`) trains a backbone with one objective;
the evaluation harness (:mod:`ssl_vision.eval`) reads any checkpoint.
"""

__version__ = "0.1.0"

from ssl_vision.config_schema import register as _register_config_schema  # noqa: E402

_register_config_schema()  # schema/method, schema/augment, ... in Hydra's ConfigStore: conf/*.yaml merge onto them
