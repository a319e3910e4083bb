"""Reusable layers and stateful building blocks of the objectives.

* ``heads.py``     -- ``build_mlp``: projection / prediction heads with the papers' BN layouts.
* ``momentum.py``  -- ``momentum_copy`` and ``ema_update_``: EMA teachers / key encoders (parameters only).
* ``memory.py``    -- ``KeyQueue``: MoCo's FIFO key queue with its pointer, in the checkpoint.
* ``dino_head.py`` -- DINO's head with the weight-normalised last layer.
* ``pos_embed.py`` -- fixed 2-D sin-cos position embeddings (MoCo v3 ViT, MAE).
"""
