"""ssl_vision: self-supervised vision pretraining with pluggable objectives.

One Lightning module (:class:`ssl_vision.module.SSLModule`) trains a backbone with one objective;
the evaluation harness (:mod:`ssl_vision.eval`) reads any checkpoint.
"""

__version__ = "0.1.0"
