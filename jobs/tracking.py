"""Fail fast, before any work, when the MLflow tracking store a stage needs cannot be reached."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import mlflow

from jobs.config import PipelineConfig


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking/registry store is unreachable or unusable."""


def require_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Check an http(s) server's /health, or that a sqlite store's folder can be created; raise if not."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {reason}")
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(f"MLflow sqlite store {uri}: cannot create {folder}: {exc}") from None


def use_experiment(cfg: PipelineConfig) -> str:
    """Point MLflow at the pipeline's store and experiment (created with its artifact location if missing)."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        mlflow.create_experiment(cfg.experiment_name, artifact_location=cfg.artifact_location)
    return mlflow.set_experiment(cfg.experiment_name).experiment_id
