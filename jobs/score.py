"""Score stage: apply a registered model to a Parquet dataset with Spark and write predictions.

`python -m jobs.score conf.yaml [k=v ...]` runs it on its own (what spark-submit or a scheduler calls).
"""
from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from jobs.config import PipelineConfig, load_config
from jobs.stage import configure_logging, stage
from pipelines.scoring import score_parquet
from pipelines.spark import spark_session


def run_score(
    cfg: PipelineConfig,
    model_uri: str | None = None,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
) -> dict:
    """Score `input_path` (default: the test split) with `model_uri` (default: the registered model's latest)."""
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m jobs.score CONFIG.yaml [key.sub=value ...]", file=sys.stderr)
        return 2
    configure_logging()
    run_score(load_config(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
