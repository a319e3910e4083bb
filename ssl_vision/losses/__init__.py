"""Pure loss functions: tensors in, scalar out. No state, no Lightning, no communication.

One file per family; everything is re-exported here (``from ssl_vision.losses import nt_xent``).
"""

from ssl_vision.losses.contrastive import nt_xent

__all__ = ["nt_xent"]
