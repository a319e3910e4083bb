"""MAE reconstruction pictures: original / masked / reconstruction / reconstruction + visible, one column per image.

:func:`save_reconstruction_grid` writes the PNG for any batch; :class:`MAEReconstructionCallback` writes
``mae_reconstructions_step{N}.png`` into the run directory during training, on a fixed batch of the test loader with
fixed masks, so successive pictures are comparable, and logs the same picture to the run's loggers that take images
(wandb, TensorBoard) as ``mae/reconstructions``. Small images are enlarged by an integer factor (nearest neighbour,
so each pixel stays a sharp square) to at least ``min_size`` px, and each row is labelled in a margin on the left.

With ``norm_pix_loss`` the decoder predicts each patch *standardised by its own mean and variance*; shown raw, these
look like noise (facebookresearch/mae#12, VideoMAE#25). The predictions are therefore mapped back with the target
patch's own statistics (``pred·sqrt(σ² + eps) + μ``) -- the visual uses information of the original, as MAE's
demo does -- and then un-normalised with the data mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn import functional as F
from torchvision.utils import make_grid

from ssl_vision.losses.mae import NORM_PIX_EPS, patch_stats, patchify, unpatchify

#: grey (display space, [0, 1]) that fills removed patches in the "masked" row
MASK_FILL = 0.5
#: the rows of :func:`reconstruction_rows`, as labelled in the picture
ROW_LABELS = ("original", "masked", "reconstruction", "recon. + visible")
#: images smaller than this (px, the longer side) are enlarged by an integer factor to at least this size
MIN_SIZE = 96
#: padding between the images of the grid (px, after enlarging)
PADDING = 2


def _to_display(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Normalised images (N, C, H, W) -> [0, 1] via ``x·std + mean`` per channel (identity without stats)."""
    if mean is not None and std is not None:
        c = x.shape[1]
        m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        x = x * s + m
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_rows(
    objective: nn.Module,
    backbone: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> torch.Tensor:
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


def upscale_factor(height: int, width: int, min_size: int = MIN_SIZE) -> int:
    """The integer factor that brings an image's longer side to at least ``min_size`` px (1 when it is already)."""
    return max(1, math.ceil(min_size / max(height, width)))


def grid_image(rows: torch.Tensor, labels: Sequence[str] | None = ROW_LABELS, min_size: int = MIN_SIZE) -> Image.Image:
    """(R, N, C, H, W) pictures in [0, 1] -> an RGB image: R rows of N images, each enlarged by
    :func:`upscale_factor` (nearest neighbour), :data:`PADDING` px between them (torchvision ``make_grid``), and, when
    ``labels`` are given (one per row), a white margin on the left with each row's label, centred on its row.

    Size: the grid is ``N·(W·s + 2) + 2`` wide and ``R·(H·s + 2) + 2`` high; the labels add their margin's width.
    """
    n_rows, n, _, h, w = rows.shape
    if labels is not None and len(labels) != n_rows:
        raise ValueError(f"labels: one per row, {n_rows} rows, got {len(labels)} labels {list(labels)}")
    scale = upscale_factor(h, w, min_size)
    tiles = rows.flatten(0, 1).detach().float().cpu().clamp(0, 1)
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles, nrow=n, padding=PADDING)  # (3, H', W'): one channel is repeated to three
    grid_img = Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    if labels is None:
        return grid_img
    row_h = h * scale + PADDING
    font = ImageFont.load_default(size=max(10, min(16, row_h // 4)))
    margin = max(int(ImageDraw.Draw(grid_img).textlength(str(t), font=font)) for t in labels) + 2 * 6
    out = Image.new("RGB", (margin + grid_img.width, grid_img.height), "white")
    out.paste(grid_img, (margin, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        draw.text((6, PADDING + r * row_h + (row_h - PADDING) / 2), str(text), fill="black", font=font, anchor="lm")
    return out


def save_reconstruction_grid(
    objective: nn.Module,
    backbone: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    labels: bool = True,
    min_size: int = MIN_SIZE,
) -> Path:
    """Write the 4-row grid of :func:`reconstruction_rows` as a PNG (:func:`grid_image`: one column per image,
    enlarged to at least ``min_size`` px, rows labelled with :data:`ROW_LABELS` unless ``labels=False``).

    Size: the grid is ``N·(W·s + 2) + 2`` wide and ``4·(H·s + 2) + 2`` high, ``s`` = :func:`upscale_factor`; the
    labels' margin adds to the width. Returns the path.
    """
    rows = reconstruction_rows(objective, backbone, images, mean=mean, std=std, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, labels=ROW_LABELS if labels else None, min_size=min_size).save(path)
    return path


def log_image_to_loggers(loggers: Sequence, key: str, path: str | Path, step: int) -> list[str]:
    """Log the PNG at ``path`` to each logger that takes images: wandb (``WandbLogger.log_image``) and TensorBoard
    (``add_image``); others (CSV) are skipped. Returns the names of the loggers it went to. Global rank 0 only."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    done = []
    img = Image.open(path).convert("RGB")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[img], step=step, caption=[Path(path).name])
        elif isinstance(logger, TensorBoardLogger):
            tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, H, W) uint8
            logger.experiment.add_image(key, tensor, global_step=step, dataformats="CHW")
        else:
            continue
        done.append(type(logger).__name__)
    return done


class MAEReconstructionCallback(L.Callback):
    """Write ``mae_reconstructions_step{N}.png`` every ``every_n_epochs`` train epochs and at the end of fit.

    The images are the first ``num_images`` of the datamodule's last validation loader (the test split under the
    eval transform), taken once and reused, with fixed masks (``seed``). ``out_dir`` defaults to the trainer's
    ``default_root_dir`` (the run directory). Each picture also goes to the trainer's loggers that take images
    (wandb, TensorBoard: ``mae/reconstructions`` at the global step). Only the global-zero process draws (no
    communication involved).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        out_dir: str | Path | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        min_size: int = MIN_SIZE,
    ):
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"every_n_epochs and num_images must be >= 1, got {every_n_epochs}, {num_images}")
        self.every_n_epochs, self.num_images, self.seed, self.min_size = every_n_epochs, num_images, seed, min_size
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
        save_reconstruction_grid(
            pl_module.objective,
            pl_module.backbone,
            images,
            path,
            mean=self.mean,
            std=self.std,
            seed=self.seed,
            min_size=self.min_size,
        )
        self.written.append(path)
        log_image_to_loggers(trainer.loggers, "mae/reconstructions", path, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
