"""Score stage: apply a registered model to a Parquet dataset with Spark and write predictions."""
from __future__ import annotations

from pathlib import Path

import mlflow

from dl.serving import resolve_model_version
from jobs.config import PipelineConfig
from jobs.tracking import use_experiment
from jobs.stage import stage
from pipelines.scoring import score_parquet
from pipelines.spark import spark_session


def run_score(
    cfg: PipelineConfig,
    model_uri: str | None = None,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
) -> dict:
    """Score `input_path` (default: the test split) with `model_uri` (default: the `champion` alias).

    The job is an MLflow run of the pipeline's experiment, tagged with the model version it used and
    that version's training run, so a predictions table leads back to its model and data.
    """
    model_uri = model_uri or cfg.score_model_uri
    input_path = Path(input_path or cfg.score_input)
    output_path = Path(output_path or cfg.score_output)
    use_experiment(cfg)
    version = resolve_model_version(model_uri)
    with stage("score") as summary, mlflow.start_run(run_name=f"score-{cfg.name}") as run:
        mlflow.set_tags({
            "dlpipe.stage": "score",
            "model.uri": model_uri,
            "model.name": version.name,
            "model.version": str(version.version),
            "model.run_id": version.run_id,
            "input.path": str(input_path.resolve()),
            "output.path": str(output_path.resolve()),
        })
        spark = spark_session(cfg.spark, f"dlpipe-score-{cfg.name}")
        pinned = f"models:/{version.name}/{version.version}"
        result = score_parquet(spark, pinned, input_path, output_path, batch_size=cfg.score.batch_size)
        mlflow.log_metrics({"rows_in": result["rows_in"], "rows_out": result["rows_out"]})
        summary.update(result, output=str(output_path))
    return {**result, "model_uri": model_uri, "input": str(input_path), "output": str(output_path),
            "score_run_id": run.info.run_id}
