"""Promote stage: judge a registered version with the promotion gate and move `champion` if it passes."""
from __future__ import annotations

import functools

import mlflow
from mlflow import MlflowClient

from dl.promotion import SmokeTest, promote
from jobs.config import PipelineConfig
from jobs.stage import stage
from pipelines.spark import spark_session


def run_promote(cfg: PipelineConfig, version: str | None = None, force: bool = False) -> dict:
    """Gate `version` (default: the newest) of the registered model against `champion`; return the decision."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    smoke_test = SmokeTest(
        spark=functools.partial(spark_session, cfg.spark, f"dlpipe-promote-{cfg.name}"),
        test_split=cfg.dataset_dir / "split=test",
        rows=cfg.promote.smoke_rows,
        workdir=cfg.run_dir,
        batch_size=cfg.score.batch_size,
    )
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    with stage("promote") as summary:
        decision = promote(client, cfg.registered_model_name, cfg.promote, smoke_test, version=version, force=force)
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
            reason=repr(decision.reason),
        )
    return decision.as_dict()

