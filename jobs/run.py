"""`dlpipe run` and `dlpipe demo`: every stage in order, ending with a report on the scored test split."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jobs.config import PipelineConfig, load_config


class TrainingFailed(RuntimeError):
    """The training launcher (torchrun) exited non-zero."""


@dataclass(frozen=True)
class RunReport:
    """What a user needs after a run: quality on the test split and where everything went."""

    cfg: PipelineConfig
    manifest: dict
    train_result: dict
    scored: dict
    metrics: dict

    def as_text(self) -> str:
        counts = self.manifest["counts"]
        lines = [
            f"pipeline {self.cfg.name}: {counts['rows_clean']} clean rows "
            f"({counts['rows_quarantined']} quarantined), split train/val/test = "
            f"{counts['train']}/{counts['val']}/{counts['test']}",
            f"model {self.train_result['model_name']} version {self.train_result['model_version']} "
            f"(MLflow run {self.train_result['run_id']})",
            f"scored {self.scored['rows_out']} test rows with the registered model:",
            *(f"  {name:<18} {value:.4f}" for name, value in self.metrics.items() if name != "confusion_matrix"),
            f"dataset:      {self.cfg.dataset_dir}",
            f"quarantine:   {self.cfg.quarantine_dir}",
            f"predictions:  {self.scored['output']}",
            f"MLflow store: {self.cfg.tracking_uri}  (mlflow ui --backend-store-uri {self.cfg.tracking_uri})",
        ]
        return "\n".join(lines)


def run_pipeline(config_path: str | Path, overrides: list[str]) -> RunReport:
    """ETL -> DDP training (torchrun) -> Spark scoring of the new model version over the test split."""
    from jobs.etl import run_etl
    from jobs.score import run_score
    from jobs.train import launch
    from pipelines.evaluation import classification_report
    from pipelines.spark import spark_session

    cfg = load_config(config_path, overrides)
    manifest = run_etl(cfg)
    code = launch(str(config_path), list(overrides), cfg.train.world_size)
    if code:
        raise TrainingFailed(f"torchrun exited with code {code} (see the rank logs above)")
    train_result = json.loads((cfg.run_dir / "train_result.json").read_text())
    scored = run_score(cfg, model_uri=train_result["model_uri"])
    if scored["rows_out"] != manifest["counts"]["test"]:
        raise RuntimeError(
            f"scored {scored['rows_out']} rows but the manifest's test split has {manifest['counts']['test']}"
        )
    spark = spark_session(cfg.spark, f"dlpipe-report-{cfg.name}")
    metrics = classification_report(spark.read.parquet(str(scored["output"])), len(manifest["classes"]))
    return RunReport(cfg, manifest, train_result, scored, metrics)


def run_demo(config_path: str | Path, overrides: list[str]) -> RunReport:
    """Write the config's sample data set as raw files, then run every stage."""
    from jobs.sample import SAMPLES

    cfg = load_config(config_path, overrides)
    if cfg.source.sample:
        SAMPLES[cfg.source.sample](cfg.source.path)
    return run_pipeline(config_path, overrides)
