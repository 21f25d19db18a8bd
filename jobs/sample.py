"""Packaged data sets written out as raw files, so every pipeline ingests files like it would in production."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits

from pipelines.atomic import atomic_directory

DIGITS_MAX_VALUE = 16  # load_digits pixels are counts 0..16 of an 8x8 downsampled 32x32 bitmap


def write_digits(out_dir: Path) -> int:
    """Write sklearn's digits as grey PNGs `out_dir/<digit>/<index:04d>.png`, replacing out_dir; return the count."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    with atomic_directory(Path(out_dir)) as staging:
        for index, (image, target) in enumerate(zip(pixels, digits.target)):
            class_dir = staging / str(int(target))
            class_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(class_dir / f"{index:04d}.png")
    return len(pixels)


def write_breast_cancer(out_dir: Path) -> int:
    """Write sklearn's breast-cancer table as `out_dir/breast_cancer.csv` (id, 30 measurements, diagnosis).

    Returns the number of rows; the diagnosis is `malignant` or `benign`.
    """
    data = load_breast_cancer(as_frame=True)
    table = data.data.rename(columns=lambda name: name.replace(" ", "_"))
    table.insert(0, "id", range(len(table)))
    table["diagnosis"] = data.target.map(dict(enumerate(data.target_names)))  # 0 malignant, 1 benign
    with atomic_directory(Path(out_dir)) as staging:
        staging.mkdir()
        table.to_csv(staging / "breast_cancer.csv", index=False)
    return len(table)


SAMPLES: dict[str, Callable[[Path], int]] = {"digits": write_digits, "breast_cancer": write_breast_cancer}
