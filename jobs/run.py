"""`dlpipe run` and `dlpipe demo`: the stages in order (etl -> train -> promote -> score) as a scheduled job.

Each stage has a fingerprint over its config sections and its upstream stage's fingerprint (the ETL's
covers the raw file listing). A stage whose completion marker holds the same fingerprint is skipped;
`--force` reruns, `--from` starts later, `--only` runs one stage. The whole run holds the pipeline lock.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jobs.config import PipelineConfig, load_config
from jobs.state import (
    clear_marker,
    file_listing,
    fingerprint,
    mark_complete,
    pipeline_lock,
    read_marker,
    require_complete,
    section_hash,
)

STAGES = ("etl", "train", "promote", "score")
log = logging.getLogger("dlpipe.run")


class TrainingFailed(RuntimeError):
    """The training launcher (torchrun) exited non-zero."""


def _upstream(cfg: PipelineConfig, stage: str, needed_by: str) -> str:
    return require_complete(cfg, stage, needed_by)["fingerprint"]


def stage_fingerprint(cfg: PipelineConfig, stage: str) -> str:
    """What a stage's output depends on: its config sections and its inputs (upstream fingerprints)."""
    if stage == "etl":
        labels = getattr(cfg.source, "labels", None)  # an image folder's labels CSV is an input too
        return fingerprint(section_hash(cfg, "source", "split", "normalize", "output"), file_listing(cfg.source.path),
                           *([file_listing(labels.path)] if labels else []))
    if stage == "train":
        return fingerprint(section_hash(cfg, "model", "train", "mlflow"), _upstream(cfg, "etl", "train"))
    if stage == "promote":
        return fingerprint(section_hash(cfg, "promote"), _upstream(cfg, "train", "promote"))
    return fingerprint(
        section_hash(cfg, "score"), _upstream(cfg, "etl", "score"), _upstream(cfg, "promote", "score")
    )


def _run_etl(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> dict:
    from jobs.etl import run_etl

    return {"counts": run_etl(cfg)["counts"]}


def _run_train(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> dict:
    from jobs.tracking import outage_reported
    from jobs.train import launch

    with outage_reported(cfg.run_dir):  # a rank that lost the tracking server: exit with the tracking code
        code = launch(config_path, overrides, cfg.train.world_size)
    if code:
        raise TrainingFailed(f"torchrun exited with code {code} (see the rank logs above)")
    return json.loads((cfg.run_dir / "train_result.json").read_text())


def _run_promote(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> dict:
    from dl.promotion import PromotionError
    from jobs.promote import run_promote

    trained = require_complete(cfg, "train", "promote")["summary"]
    decision = run_promote(cfg, version=str(trained["model_version"]))
    if decision["smoke_test"] == "failed":
        raise PromotionError(f"version {decision['candidate_version']} failed the scoring smoke test: {decision['reason']}")
    return decision


def _run_score(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> dict:
    from jobs.score import run_score

    return run_score(cfg)


RUNNERS: dict[str, Callable[[PipelineConfig, str, list[str]], dict]] = {
    "etl": _run_etl,
    "train": _run_train,
    "promote": _run_promote,
    "score": _run_score,
}


def selected_stages(start: str | None = None, only: str | None = None) -> tuple[str, ...]:
    """The stages a run executes: all, those from `start` on, or just `only`."""
    if only:
        return (only,)
    return STAGES[STAGES.index(start):] if start else STAGES


def run_stages(
    config_path: str | Path, overrides: list[str], *, start: str | None = None, only: str | None = None,
    force: bool = False,
) -> dict[str, dict]:
    """Run the selected stages in order under the pipeline lock; return each stage's summary (marker)."""
    cfg = load_config(config_path, overrides)
    stages = selected_stages(start, only)
    if "train" in stages:
        cfg.require_model("the train stage")  # before the ETL runs, not after
    if "promote" in stages:
        from jobs.promote import gate_settings

        gate_settings(cfg)  # a gate that cannot judge fails before training, not after
    markers: dict[str, dict] = {}
    with pipeline_lock(cfg):
        for stage in stages:
            wanted = stage_fingerprint(cfg, stage)
            marker = read_marker(cfg, stage)
            if not force and marker and marker["fingerprint"] == wanted:
                log.info("%s: up to date (inputs and config unchanged), skipped", stage)
                markers[stage] = marker
                continue
            for downstream in STAGES[STAGES.index(stage):]:
                clear_marker(cfg, downstream)  # this stage and everything after it are now stale
            summary = RUNNERS[stage](cfg, str(config_path), list(overrides))
            mark_complete(cfg, stage, wanted, summary)
            markers[stage] = read_marker(cfg, stage)
    return markers


@dataclass(frozen=True)
class RunReport:
    """What a user needs after a run: what each completed stage made, quality on the scored test split (once the
    score stage is complete) and where everything went."""

    cfg: PipelineConfig
    manifest: dict
    markers: dict[str, dict]  # the completed stages' markers
    metrics: dict

    def as_text(self) -> str:
        counts = self.manifest["counts"]
        lines = [
            f"pipeline {self.cfg.name}: {counts['rows_clean']} clean rows "
            f"({counts['rows_quarantined']} quarantined), split train/val/test = "
            f"{counts['train']}/{counts['val']}/{counts['test']}",
        ]
        if "train" in self.markers:
            trained = self.markers["train"]["summary"]
            lines.append(
                f"trained {trained['model_name']} version {trained['model_version']} (MLflow run {trained['run_id']})"
                + "".join(f"; {key} {value:.6g}" for key, value in (trained.get("serving_state") or {}).items()
                          if isinstance(value, float)))
        if "promote" in self.markers:
            promotion = self.markers["promote"]["summary"]
            lines.append(f"promotion: {promotion['decision']} ({promotion['reason']}); "
                         f"champion = version {promotion['champion_version_after']}")
        if "score" in self.markers:
            scored = self.markers["score"]["summary"]
            lines += [f"scored {scored['rows_out']} test rows with {scored['model_name']} version "
                      f"{scored['model_version']} ({self.markers['train']['summary']['task']}):",
                      *(f"  {name:<18} {value:.4f}" for name, value in self.metrics.items())]
        pending = [stage for stage in STAGES if stage not in self.markers]
        if pending:
            how = f"`dlpipe run CONFIG --from {pending[0]}`" if self.cfg.model else "this config has no model section"
            lines.append(f"not run yet: {', '.join(pending)} ({how})")
        lines += [
            f"dataset:      {self.cfg.dataset_dir}",
            f"quarantine:   {self.cfg.quarantine_dir}",
            *([f"predictions:  {self.markers['score']['summary']['output']}"] if "score" in self.markers else []),
            f"MLflow store: {self.cfg.tracking_uri}  (mlflow ui --backend-store-uri {self.cfg.tracking_uri})",
        ]
        return "\n".join(lines)


def run_pipeline(config_path: str | Path, overrides: list[str], **selection) -> RunReport:
    """Run the stages, then report them; once the score stage is complete, with the scored test split's metrics
    (counted by Spark from the predictions)."""
    from pipelines.dataset import read_manifest

    ran = run_stages(config_path, overrides, **selection)
    cfg = load_config(config_path, overrides)
    manifest = read_manifest(cfg.dataset_dir)
    markers = {stage: ran.get(stage) or read_marker(cfg, stage) for stage in STAGES}
    markers = {stage: marker for stage, marker in markers.items() if marker}
    metrics = _test_metrics(cfg, manifest, markers) if "score" in markers else {}
    return RunReport(cfg, manifest, markers, metrics)


def _test_metrics(cfg: PipelineConfig, manifest: dict, markers: dict[str, dict]) -> dict:
    """The scored test split's metrics, counted by Spark from the predictions the score stage wrote."""
    from pipelines.evaluation import predictions_report
    from pipelines.spark import spark_session

    scored = markers["score"]["summary"]
    if scored["rows_out"] != manifest["counts"]["test"]:
        raise RuntimeError(f"scored {scored['rows_out']} rows but the manifest's test split has {manifest['counts']['test']}")
    spark = spark_session(cfg.spark, f"dlpipe-report-{cfg.name}")
    task = markers["train"]["summary"]["task"]
    predictions = spark.read.parquet(str(scored["output"]))
    return predictions_report(predictions, task, manifest["classes"], cfg.train.anomaly.normal_label)


def run_demo(config_path: str | Path, overrides: list[str]) -> RunReport:
    """Write the config's sample data set as raw files (when missing), then run every stage."""
    from jobs.sample import SAMPLES

    cfg = load_config(config_path, overrides)
    if cfg.source.sample and not Path(cfg.source.path).is_dir():
        SAMPLES[cfg.source.sample](cfg.source.path)
    return run_pipeline(config_path, overrides)
