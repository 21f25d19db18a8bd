"""Image augmentation on the training split's batches: random horizontal flip, rotation and padded crop.

All three are one random affine map per image, applied on the batch with `affine_grid` + `grid_sample` (on the
training device, no per-image Python). Shifts are whole pixels, so a crop moves pixels exactly; uncovered pixels
repeat the border. Randomness comes from torch's global generator, which checkpoints save and restore, so a resumed
epoch augments exactly as the uninterrupted one would have. Validation and test batches are never augmented.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.nn import functional as F

from jobs.config import AugmentConf


class ImageAugment:
    """Augments flat feature batches [N, C*H*W] (the dataset's layout) of `shape` (C, H, W) images."""

    def __init__(self, conf: AugmentConf, shape: tuple[int, int, int]):
        if len(shape) != 3:
            raise ValueError(f"train.augment needs images (C, H, W features); this dataset's feature shape is {list(shape)}")
        self.conf, self.shape = conf, tuple(shape)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        count = len(features)
        images = features.reshape(count, *self.shape).float()
        _, height, width = self.shape
        angle = (torch.rand(count) * 2 - 1) * math.radians(self.conf.rotate_degrees)
        mirror = torch.where(torch.rand(count) < 0.5, -1.0, 1.0) if self.conf.flip else torch.ones(count)
        pad = self.conf.crop_padding
        # whole-pixel shifts in [-pad, pad], in grid units (a pixel is 2 / size wide)
        shift_x = torch.randint(-pad, pad + 1, (count,)).float() * 2 / width
        shift_y = torch.randint(-pad, pad + 1, (count,)).float() * 2 / height
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * mirror, -sin, shift_x], dim=1),
            torch.stack([sin * mirror, cos, shift_y], dim=1),
        ], dim=1).to(images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return moved.reshape(count, -1).to(features.dtype)


class AugmentedLoader:
    """A training loader whose batches' `features` go through `augment`; epochs, steps and resume are the loader's."""

    def __init__(self, loader, augment: ImageAugment):
        self.loader, self.augment = loader, augment

    @property
    def equal_steps(self) -> bool:
        return self.loader.equal_steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield {**batch, "features": self.augment(batch["features"])}
