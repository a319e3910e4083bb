"""Reusable layers and stateful building blocks of the objectives.

* ``heads.py``     -- the papers' heads by name (``simclr_projector``, ``moco_v2_projector``, ``moco_v3_projector`` /
                      ``moco_v3_predictor``, ``byol_mlp``, ``simsiam_projector`` / ``simsiam_predictor``,
                      ``swav_projector``, ``instdisc_head``, ...) over the generic ``build_mlp``.
* ``momentum.py``  -- the EMA teacher of every momentum method (``EMATeacher``: copies, the one schedule
                      ``ema_momentum`` from ``momentum`` to ``momentum_end``, the one update; parameters only).
* ``memory.py``    -- MoCo's ``KeyQueue``, InstDisc's memory bank, SwAV's per-rank queue blocks, ``HostMirror``.
* ``vit.py``       -- ViT surgery: fixed 2-D sin-cos position embeddings, MoCo v3 init and frozen patch projection,
                      MAE's checks and init.
* ``dino_head.py`` -- DINO's head with the weight-normalised last layer.
* ``monitor.py``   -- the collapse monitor.
"""
