"""Test helpers for a real MLflow registry: small CNN versions registered through `log_and_register`,
and Parquet inputs shaped as the dataset contract says. Shared by the scoring and promotion tests."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.entities.model_registry import ModelVersion

from dl.models import build_model
from dl.serving import log_and_register
from jobs.config import PipelineConfig
from pipelines.scaling import FittedScaler

SHAPE = (1, 8, 8)
WIDTH = 64
CLASSES = [str(i) for i in range(10)]


def pipeline_config(root: Path, name: str, registered_model: str, **sections) -> PipelineConfig:
    """A small-CNN pipeline rooted at `root` (sqlite store in its run_dir), with `sections` merged in."""
    data = {
        "name": name,
        "run_dir": str(root / "run"),
        "source": {"kind": "image_folder", "path": str(root / "images")},
        "model": {"kind": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.25},
        "spark": {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4},  # as conftest's
        "mlflow": {"registered_model": registered_model},
        "score": {"batch_size": 64},
    }
    return PipelineConfig.model_validate({**data, **sections})


def scaler(width: int = WIDTH) -> FittedScaler:
    return FittedScaler("zscore", "channel", width, (6.5,), (5.25,))


def manifest(fitted: FittedScaler, shape: tuple[int, int, int] = SHAPE) -> dict:
    """The parts of the dataset manifest the serving model reads, shaped as the dataset contract says."""
    return {
        "pipeline": "registry-test",
        "source": {"kind": "image_folder", "path": "unused", "files": 0, "content_hash": "0" * 64},
        "feature_shape": list(shape),
        "classes": CLASSES,
        "preprocessing": {"image_size": list(shape[1:]), "channels": shape[0], "scaler": fitted.to_dict()},
    }


def network(cfg: PipelineConfig, fitted: FittedScaler, seed: int, shape=SHAPE) -> torch.nn.Module:
    """A small CNN whose batch-norm running stats moved off their defaults, so eval mode matters."""
    torch.manual_seed(seed)
    net = build_model(cfg.model, shape, len(CLASSES))
    warmup = np.random.default_rng(seed).integers(0, 17, (256, int(np.prod(shape)))).astype(np.float32)
    net.train()
    with torch.no_grad():
        for chunk in np.split(warmup, 4):
            net(torch.from_numpy(fitted.apply(chunk)))
    return net.eval()


def expected(net: torch.nn.Module, fitted: FittedScaler, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class, probability) straight from torch: what the registered model must reproduce."""
    with torch.no_grad():
        probability = torch.softmax(net(torch.from_numpy(fitted.apply(raw))), dim=1).numpy()
    return probability.argmax(axis=1), probability


def register(
    cfg: PipelineConfig,
    net: torch.nn.Module,
    fitted: FittedScaler,
    experiment_id: str,
    metrics: dict[str, float] | None = None,
    shape=SHAPE,
) -> ModelVersion:
    """One training-run stand-in: log `metrics` in a new run, then register `net` as a new version."""
    with mlflow.start_run(experiment_id=experiment_id):
        if metrics:
            mlflow.log_metrics(metrics)
        return log_and_register(net, cfg, manifest(fitted, shape))


@contextmanager
def tracking(uri: str) -> Iterator[None]:
    """Point MLflow's tracking and registry at `uri`, with no active experiment (an id set by an earlier test
    belongs to another store), restoring the previous settings afterwards (an unset registry URI stays unset:
    pinning it would send later clients to this test's registry)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils

    variables = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    previous = (mlflow.get_tracking_uri(), registry_utils._registry_uri, {v: os.environ.get(v) for v in variables},
                fluent._active_experiment_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        registry_utils._registry_uri = previous[1]
        fluent._active_experiment_id = previous[3]
        for variable, value in previous[2].items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def raw_rows(rows: int, seed: int = 0, width: int = WIDTH) -> np.ndarray:
    """Pixel-like raw features 0..16 (what `raw_features` holds for digits)."""
    return np.random.default_rng(seed).integers(0, 17, (rows, width)).astype(np.float32)


def write_dataset(path: Path, raw: np.ndarray, files: int, ids: list[str] | None = None, rows_list=None) -> list[str]:
    """Parquet in `files` files with the dataset contract's columns; `rows_list` overrides raw_features."""
    ids = ids or [f"{i % 10}/{i:04d}.png" for i in range(len(raw))]
    values = rows_list if rows_list is not None else list(raw)
    path.mkdir(parents=True)
    for part, index in enumerate(np.array_split(np.arange(len(ids)), files)):
        table = pa.table(
            {
                "id": pa.array([ids[i] for i in index], pa.string()),
                "label": pa.array((index % 10).astype(np.int32)),
                "raw_features": pa.array([values[i] for i in index], pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, path / f"part-{part:05d}.parquet", row_group_size=40)
    return ids
