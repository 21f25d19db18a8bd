"""Lineage in MLflow: the ETL stage as a run of the pipeline's experiment, and the training run's link to it.

The chain a user can walk back: predictions -> scoring run (tags `model.*`) -> model version -> training run
(MLflow) -> ETL run (tag `dlpipe.etl_run_id`, and the dataset as the run's input) -> the raw inputs' content hash
(tag `dataset.content_hash`). The dataset is identified by its digest: a hash of its `manifest.json`, which
holds the counts, the fitted preprocessing and the inputs' hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from jobs.config import PipelineConfig
from jobs.tracking import log_config, use_experiment

log = logging.getLogger("dlpipe.lineage")

ETL_SECTIONS = ("source", "split", "normalize", "output")  # the config an ETL run records as params


def dataset_digest(manifest: dict) -> str:
    """A short, stable hash of a dataset's manifest (key order does not matter)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dataset_input(cfg: PipelineConfig, manifest: dict) -> MetaDataset:
    """The Parquet dataset as an MLflow dataset entity (path, digest), for `mlflow.log_input`."""
    with warnings.catch_warnings():  # MLflow registers its local-files source twice (plain and file:// paths)
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(cfg.dataset_dir.resolve()))
    return MetaDataset(source, name=f"{cfg.name}-dataset", digest=dataset_digest(manifest))


@contextmanager
def etl_run(cfg: PipelineConfig) -> Iterator[mlflow.ActiveRun]:
    """The ETL stage's MLflow run: the ETL config as params (and `config.yaml`), tagged with the stage and the raw
    input path."""
    use_experiment(cfg)
    with mlflow.start_run(run_name=f"etl-{cfg.name}") as run:
        mlflow.set_tags({"dlpipe.stage": "etl", "source.path": str(cfg.source.path.resolve())})
        log_config(cfg, ETL_SECTIONS)
        yield run


def record_dataset(cfg: PipelineConfig, manifest: dict) -> None:
    """On the active ETL run: counts as metrics, manifest and quality report as artifacts, the dataset as output."""
    mlflow.set_tags({
        "dataset.path": str(cfg.dataset_dir.resolve()),
        "dataset.content_hash": manifest["source"]["content_hash"],
        "dataset.digest": dataset_digest(manifest),
    })
    mlflow.log_metrics({key: value for key, value in manifest["counts"].items() if isinstance(value, (int, float))})
    mlflow.log_dict(manifest, "manifest.json")
    quality = cfg.dataset_dir / "quality.json"
    if quality.is_file():
        mlflow.log_artifact(str(quality))
    mlflow.log_input(dataset_input(cfg, manifest), context="etl-output")


def link_training_to_dataset(cfg: PipelineConfig, manifest: dict) -> str | None:
    """On the active training run: the dataset as its input and the ETL run that wrote it; returns that run's id.

    A dataset written without tracking (or whose ETL run was deleted) has no ETL run: the link is then absent,
    with a warning, and training goes on.
    """
    digest = dataset_digest(manifest)
    mlflow.log_input(dataset_input(cfg, manifest), context="training")
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`dlpipe.stage` = 'etl' and tags.`dataset.digest` = '{digest}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    if not runs:
        log.warning("no ETL run of dataset %s (digest %s) in experiment %s: training is not linked to one",
                    cfg.dataset_dir, digest, cfg.experiment_name)
        return None
    etl_run_id = runs[0].info.run_id
    mlflow.set_tags({"dlpipe.etl_run_id": etl_run_id, "dataset.digest": digest})
    return etl_run_id
