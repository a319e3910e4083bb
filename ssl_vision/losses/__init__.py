"""Pure loss functions: tensors in, scalar out. No state, no Lightning, no communication.

One file per family; everything is re-exported here (``from ssl_vision.losses import nt_xent``).
"""

from ssl_vision.losses.contrastive import multi_positive_nt_xent, nt_xent
from ssl_vision.losses.dino import dino_cross_entropy, teacher_temperature
from ssl_vision.losses.infonce import info_nce, moco_v3_contrastive
from ssl_vision.losses.mae import masked_mse, normalize_patches, patchify, unpatchify
from ssl_vision.losses.nce import NCE_EPS, bank_softmax_loss, nce_loss, partition_estimate
from ssl_vision.losses.regression import byol_loss, neg_cosine, regression_loss, simsiam_loss
from ssl_vision.losses.swav import sinkhorn_knopp, swapped_prediction

__all__ = [
    "NCE_EPS",
    "bank_softmax_loss",
    "byol_loss",
    "dino_cross_entropy",
    "info_nce",
    "masked_mse",
    "moco_v3_contrastive",
    "multi_positive_nt_xent",
    "nce_loss",
    "neg_cosine",
    "normalize_patches",
    "nt_xent",
    "partition_estimate",
    "patchify",
    "regression_loss",
    "simsiam_loss",
    "sinkhorn_knopp",
    "swapped_prediction",
    "teacher_temperature",
    "unpatchify",
]
