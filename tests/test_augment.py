"""Image augmentation: flips mirror exactly, crops shift by whole pixels, rotations stay in range, and only the
training split is ever augmented."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dl.augment import ImageAugment
from dl.distributed import distributed
from dl.models import build_model
from dl.trainer import fit
from jobs.config import AugmentConf, ConfigError, load_config
from tests.test_training import CLASSES, EVEN, MODEL, SHAPE, _train_conf, write_dataset

BREAST_CANCER = "conf/breast_cancer_anomaly.yaml"


def _images(count: int, shape=(2, 5, 7)) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(count, *shape)


def test_flip_mirrors_exactly_and_about_half_the_time():
    images = _images(400)
    torch.manual_seed(0)
    out = ImageAugment(AugmentConf(flip=True), (2, 5, 7))(images.reshape(400, -1)).reshape(images.shape)
    mirrored = torch.isclose(out, images.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(out, images, atol=1e-5).flatten(1).all(1)
    assert bool((mirrored | same).all())
    assert 150 < int(mirrored.sum()) < 250


def test_crop_shifts_by_whole_pixels_repeating_the_border():
    images, pad = _images(200), 2
    torch.manual_seed(0)
    out = ImageAugment(AugmentConf(crop_padding=pad), (2, 5, 7))(images.reshape(200, -1)).reshape(images.shape)
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    windows = torch.stack([padded[:, :, dy:dy + 5, dx:dx + 7] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)])
    matches = torch.isclose(windows, out.unsqueeze(0), atol=1e-5).flatten(2).all(2)  # [shifts, images]
    assert bool(matches.any(0).all())  # every image is one of the 25 crops
    assert int(matches.any(1).sum()) == 25  # and 200 images used every shift


def test_rotation_moves_pixels_within_the_input_range():
    images = _images(50, (1, 8, 8))
    torch.manual_seed(0)
    out = ImageAugment(AugmentConf(rotate_degrees=30), (1, 8, 8))(images.reshape(50, -1)).reshape(images.shape)
    lowest, highest = images.flatten(1).min(1).values, images.flatten(1).max(1).values
    assert bool((out.flatten(1).min(1).values >= lowest - 1e-5).all())
    assert bool((out.flatten(1).max(1).values <= highest + 1e-5).all())
    assert float((out - images).abs().mean()) > 0.1


def test_only_training_batches_are_augmented(tmp_path):
    write_dataset(tmp_path, EVEN)
    seen: list[int] = []

    class Counting(ImageAugment):
        def __call__(self, features):
            seen.append(len(features))
            return super().__call__(features)

    with distributed("gloo", seed=0) as ctx:
        result = fit(build_model(MODEL, SHAPE, len(CLASSES)), _train_conf(epochs=2), tmp_path, len(CLASSES), ctx,
                     tmp_path / "checkpoints", augment=Counting(AugmentConf(crop_padding=1), SHAPE))
    assert sum(seen) == sum(row["train_samples"] for row in result.history) == 2 * 4 * 30


def test_augmentation_is_for_image_datasets_only():
    with pytest.raises(ConfigError, match="'train.augment': image augmentation needs source.kind image_folder"):
        load_config(BREAST_CANCER, ["train.augment.flip=true"])
    with pytest.raises(ValueError, match="feature shape is \\[30\\]"):
        ImageAugment(AugmentConf(flip=True), (30,))
