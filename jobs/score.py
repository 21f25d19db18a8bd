"""Score stage: apply a registered model to a Parquet dataset with Spark and write predictions."""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from pyspark.sql import SparkSession

from dl.registry import resolve_model_version
from jobs.config import ConfigError, DriftConf, PipelineConfig
from jobs.stage import stage
from jobs.tracking import use_experiment
from pipelines.atomic import output_lock
from pipelines.drift import population_stability
from pipelines.errors import DataError
from pipelines.file_refusals import file_refusals_named
from pipelines.input_schema import NUMERIC_ARRAY_TYPES, check_columns, check_parquet_input, pattern_root
from pipelines.scoring import score_parquet
from pipelines.spark import spark_session
from pipelines.spark_progress import spark_step

log = logging.getLogger("dlpipe.score")


@spark_step("drift check")
def check_drift(spark: SparkSession, conf: DriftConf, training_run_id: str, input_path: Path) -> dict:
    """PSI of the input's features against the training manifest's reference; logged, then warn or fail."""
    if conf.action == "off":
        return {}
    try:
        manifest = mlflow.artifacts.load_dict(f"runs:/{training_run_id}/manifest.json")
    except (MlflowException, OSError) as exc:
        log.warning("drift check skipped: no manifest.json on training run %s (%s)", training_run_id, exc)
        return {}
    reference = manifest.get("reference_distribution")
    if reference is None:
        log.warning("drift check skipped: the training manifest of run %s has no reference_distribution", training_run_id)
        return {}
    source = spark.read.parquet(str(input_path))
    check_columns(source.schema, {reference["column"]: NUMERIC_ARRAY_TYPES}, input_path)  # before any row is read
    rows = source.count()
    sample = source.sample(fraction=min(1.0, conf.sample_rows / max(rows, 1)), seed=0)
    values = population_stability(sample, reference)
    worst = max(range(len(values)), key=values.__getitem__)
    mlflow.log_metrics({"drift_psi_max": values[worst], "drift_psi_mean": sum(values) / len(values)})
    mlflow.log_dict({"column": reference["column"], "psi": values, "threshold": conf.threshold}, "drift.json")
    if values[worst] > conf.threshold:
        message = (f"{input_path}: feature {worst} of '{reference['column']}' drifted from training "
                   f"(PSI {values[worst]:.3f} > score.drift.threshold {conf.threshold})")
        if conf.action == "fail":
            raise DataError(message)
        log.warning("%s; scoring anyway (score.drift.action=warn)", message)
    return {"drift_psi_max": round(values[worst], 4)}


def _check_output_apart(cfg: PipelineConfig, input_path: Path, output_path: Path) -> None:
    """ConfigError when the predictions, which replace `output_path` whole, would replace or land inside the scoring
    input, the pipeline's source, dataset or quarantine, or would replace its run folder."""
    target = output_path.resolve()
    if cfg.run_dir.resolve().is_relative_to(target):
        raise ConfigError(f"scoring output {target} would replace the run folder {cfg.run_dir.resolve()} (its "
                          "dataset, state and MLflow store); choose another --output (or score.output)")
    kept = {"the scoring input": pattern_root(input_path), "source.path": cfg.source.path,
            "the dataset": cfg.dataset_dir, "the quarantine": cfg.quarantine_dir}
    for what, path in kept.items():
        path = path.resolve()
        if path.is_relative_to(target) or target.is_relative_to(path):
            where = "replace" if path.is_relative_to(target) else "be written inside"
            raise ConfigError(f"scoring output {target} would {where} {what} {path}; choose another --output "
                              "(or score.output)")


def run_score(
    cfg: PipelineConfig,
    model_uri: str | None = None,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
) -> dict:
    """Score `input_path` (default: the test split) with `model_uri` (default: the `champion` alias).

    DataError when the input does not exist or holds no Parquet file; ModelNotFound when the registry has no
    such model, version or alias; ConfigError when the output would replace or land inside the input, the source,
    the dataset or the quarantine, or replace the run folder.

    The job is an MLflow run of the pipeline's experiment, tagged with the model version it used and
    that version's training run, so a predictions table leads back to its model and data. The job holds
    `output_lock(output_path)` throughout: a second job writing the same output is refused (OutputLocked).
    """
    model_uri = model_uri or cfg.score_model_uri
    input_path = Path(input_path or cfg.score_input)
    output_path = Path(output_path or cfg.score_output)
    use_experiment(cfg)
    try:  # only registry URIs, resolved in the configured registry: never a path, runs:/ URI or pickle elsewhere
        version = resolve_model_version(model_uri)
    except ValueError as exc:
        raise ConfigError(f"{exc}; models are scored only from the configured registry {cfg.tracking_uri}") from None
    check_parquet_input(input_path, "scoring input")
    _check_output_apart(cfg, input_path, output_path)
    with output_lock(output_path), stage("score") as summary, mlflow.start_run(run_name=f"score-{cfg.name}") as run, \
            file_refusals_named():
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
        drift = check_drift(spark, cfg.score.drift, version.run_id, input_path)
        pinned = f"models:/{version.name}/{version.version}"
        result = score_parquet(spark, pinned, input_path, output_path, batch_size=cfg.score.batch_size,
                               device=cfg.score.device)
        mlflow.log_metrics({"rows_in": result["rows_in"], "rows_out": result["rows_out"]})
        summary.update(result, output=str(output_path), **drift)
    return {**result, **drift, "model_uri": model_uri, "input": str(input_path), "output": str(output_path),
            "score_run_id": run.info.run_id}
