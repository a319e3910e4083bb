"""MAE reconstruction pictures: original / masked / reconstruction / reconstruction + visible, one column per image.

:func:`save_reconstruction_grid` writes the PNG for any batch; :class:`MAEReconstructionCallback` writes
``mae_reconstructions_step{N}.png`` into the run directory during training, on a fixed batch of the test loader with
fixed masks, so successive pictures are comparable.

With ``norm_pix_loss`` the decoder predicts each patch *standardised by its own mean and variance*; shown raw, these
look like noise (facebookresearch/mae#12, VideoMAE#25). The predictions are therefore mapped back with the target
patch's own statistics (``pred·sqrt(σ² + eps) + μ``) -- the visual uses information of the original, as MAE's
demo does -- and then un-normalised with the data mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchvision.utils import save_image

from ssl_vision.losses.mae import NORM_PIX_EPS, patch_stats, patchify, unpatchify

#: grey (display space, [0, 1]) that fills removed patches in the "masked" row
MASK_FILL = 0.5


def _to_display(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Normalised images (N, C, H, W) -> [0, 1] via ``x·std + mean`` per channel (identity without stats)."""
    if mean is not None and std is not None:
        c = x.shape[1]
        m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        x = x * s + m
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_rows(objective: nn.Module, backbone: nn.Module, images: torch.Tensor, *,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        seed: int = 0) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (4, N, C, H, W) in [0, 1]: original, masked, reconstruction (every patch
    predicted), reconstruction with the visible patches pasted from the original (MAE's figure).

    ``objective`` is a bound :class:`~ssl_vision.objectives.mae.MAE`; the masks come from a generator seeded with
    ``seed`` (not the training draws). Both modules run in eval mode and are put back as they were.
    """
    modes = (objective.training, backbone.training)
    objective.eval()
    backbone.eval()
    try:
        images = images.float()
        p, c = objective.patch_size, images.shape[1]
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        noise = torch.rand(images.shape[0], grid[0] * grid[1], generator=torch.Generator().manual_seed(seed))
        out = objective.reconstruct(images, backbone, noise.to(images.device))
        pred = out.pred.float()
        if objective.norm_pix_loss:
            mu, var = patch_stats(patchify(images, p))
            pred = pred * (var + NORM_PIX_EPS).sqrt() + mu
        recon = unpatchify(pred, p, grid, c)
        removed = unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, p * p * c), p, grid, c)  # 1 where removed
        original = _to_display(images, mean, std)
        recon = _to_display(recon, mean, std)
        masked = original * (1 - removed) + MASK_FILL * removed
        pasted = original * (1 - removed) + recon * removed
        return torch.stack([original, masked, recon, pasted])
    finally:
        objective.train(modes[0])
        backbone.train(modes[1])


def save_reconstruction_grid(objective: nn.Module, backbone: nn.Module, images: torch.Tensor, path: str | Path, *,
                             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                             seed: int = 0) -> Path:
    """Write the 4-row grid of :func:`reconstruction_rows` as a PNG (2 px padding, one column per image).

    Size: width ``N·(W + 2) + 2``, height ``4·(H + 2) + 2`` (torchvision ``make_grid``). Returns the path.
    """
    rows = reconstruction_rows(objective, backbone, images, mean=mean, std=std, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.flatten(0, 1).cpu(), path, nrow=images.shape[0], padding=2)
    return path


class MAEReconstructionCallback(L.Callback):
    """Write ``mae_reconstructions_step{N}.png`` every ``every_n_epochs`` train epochs and at the end of fit.

    The images are the first ``num_images`` of the datamodule's last validation loader (the test split under the
    eval transform), taken once and reused, with fixed masks (``seed``). ``out_dir`` defaults to the trainer's
    ``default_root_dir`` (the run directory). Only the global-zero process draws (no communication involved).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, out_dir: str | Path | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0):
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"every_n_epochs and num_images must be >= 1, got {every_n_epochs}, {num_images}")
        self.every_n_epochs, self.num_images, self.seed = every_n_epochs, num_images, seed
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.mean, self.std = mean, std
        self._images: torch.Tensor | None = None
        self.written: list[Path] = []

    def _batch(self, trainer: L.Trainer) -> torch.Tensor:
        if self._images is None:
            loaders = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else trainer.val_dataloaders
            loader = loaders[-1] if isinstance(loaders, (list, tuple)) else loaders
            images = []
            for batch in loader:
                images.append(batch[0])
                if sum(len(b) for b in images) >= self.num_images:
                    break
            self._images = torch.cat(images)[: self.num_images]
        return self._images

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = (self.out_dir or Path(trainer.default_root_dir)) / f"mae_reconstructions_step{trainer.global_step}.png"
        if path in self.written:
            return
        images = self._batch(trainer).to(pl_module.device)
        save_reconstruction_grid(pl_module.objective, pl_module.backbone, images, path, mean=self.mean, std=self.std,
                                 seed=self.seed)
        self.written.append(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
