"""Score stage: apply a registered model to a Parquet dataset with Spark and write predictions."""
from __future__ import annotations

from pathlib import Path

import mlflow

from jobs.config import PipelineConfig
from jobs.stage import stage
from pipelines.scoring import score_parquet
from pipelines.spark import spark_session


def run_score(
    cfg: PipelineConfig,
    model_uri: str | None = None,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
) -> dict:
    """Score `input_path` (default: the test split) with `model_uri` (default: the `champion` alias)."""
    model_uri = model_uri or cfg.score_model_uri
    input_path = Path(input_path or cfg.score_input)
    output_path = Path(output_path or cfg.score_output)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    with stage("score") as summary:
        spark = spark_session(cfg.spark, f"dlpipe-score-{cfg.name}")
        result = score_parquet(spark, model_uri, input_path, output_path, batch_size=cfg.score.batch_size)
        summary.update(result, output=str(output_path))
    return {**result, "model_uri": model_uri, "input": str(input_path), "output": str(output_path)}

