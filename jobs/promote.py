"""Promote stage: judge a registered version with the promotion gate and move `champion` if it passes."""
from __future__ import annotations

import functools

import mlflow
from mlflow import MlflowClient

from dl.promotion import SmokeTest, TestSplitMetric, promote
from dl.tasks import task_type
from jobs.config import PipelineConfig, PromoteConf
from jobs.stage import stage
from pipelines.spark import spark_session


def gate_settings(cfg: PipelineConfig) -> PromoteConf:
    """`promote` with the model's task's defaults filled in (metric and its direction); ConfigError when neither
    the config nor the task says which way the metric is better."""
    return task_type(cfg.require_model("the promote stage")).promotion(cfg.promote)


def run_promote(cfg: PipelineConfig, version: str | None = None, force: bool = False) -> dict:
    """Gate `version` (default: the newest) of the registered model against `champion`; return the decision."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    spark = functools.partial(spark_session, cfg.spark, f"dlpipe-promote-{cfg.name}")
    smoke_test = SmokeTest(spark=spark, test_split=cfg.dataset_dir / "split=test", rows=cfg.promote.smoke_rows,
                           workdir=cfg.run_dir, batch_size=cfg.score.batch_size)
    remeasure = TestSplitMetric(spark=spark, dataset_dir=cfg.dataset_dir, workdir=cfg.run_dir,
                                batch_size=cfg.score.batch_size, normal_label=cfg.train.anomaly.normal_label)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    gate = gate_settings(cfg)
    with stage("promote") as summary:
        decision = promote(client, cfg.registered_model_name, gate, smoke_test, version=version, force=force,
                           remeasure=remeasure)
        summary.update(
            model=decision.model_name,
            version=decision.candidate_version,
            decision=decision.decision,
            metric=decision.metric,
            candidate=decision.candidate_value,
            champion=decision.champion_value,
            champion_before=decision.champion_version_before,
            champion_after=decision.champion_version_after,
            smoke=decision.smoke_test,
            measured_on=decision.measured_on,
            reason=repr(decision.reason),
        )
    return decision.as_dict()

