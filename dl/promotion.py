"""The promotion gate: a registered version becomes `champion` only if it beats the current champion on
the configured metric and survives a smoke test through the real Spark scorer.

Registry aliases only (stages are deprecated): the candidate gets `challenger`; `champion` moves only on
promotion. Every decision is written as `promotion.*` tags on the candidate version, both metric values
included, so the registry itself says why a version is (or is not) serving.
"""
from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from pyspark.sql import SparkSession

from dl.registry import CHAMPION, ModelNotFound, resolve_model_version
from jobs.config import PromoteConf
from jobs.lineage import dataset_digest
from pipelines.dataset import read_manifest
from pipelines.errors import DataError
from pipelines.shards import split_dir
from pipelines.spark import error_reason
from pipelines.spark_progress import spark_step

CHALLENGER = "challenger"
TAG_PREFIX = "promotion."
DIGEST_TAG = "dataset.digest"  # on a training run: the dataset it was trained and tested on (jobs/lineage.py)

PROMOTED, FORCED, REJECTED, ALREADY_CHAMPION = "promoted", "forced", "rejected", "already_champion"
SMOKE_PASSED, SMOKE_FAILED, SMOKE_SKIPPED = "passed", "failed", "skipped"


class PromotionError(RuntimeError):
    """The gate cannot decide: the model or version does not exist, or a metric is not logged."""


class SmokeTestFailed(RuntimeError):
    """The candidate could not score sample rows through the Spark scorer; the message says why."""


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate decided for one candidate, with both metric values and the champion before/after."""

    model_name: str
    candidate_version: str
    decision: str  # promoted | forced | rejected | already_champion
    metric: str
    mode: str
    min_delta: float
    candidate_value: float | None
    champion_value: float | None
    champion_version_before: str | None
    champion_version_after: str | None
    smoke_test: str  # passed | failed | skipped
    smoke_rows: int
    reason: str
    measured_on: str = "training runs"  # or `test split of dataset <digest> (<rows> rows)`: both versions re-scored

    @property
    def promoted(self) -> bool:
        return self.decision in (PROMOTED, FORCED)

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags (strings; a missing value or version is "none")."""
        text = lambda value: "none" if value is None else str(value)  # noqa: E731
        return {
            f"{TAG_PREFIX}decision": self.decision,
            f"{TAG_PREFIX}metric": self.metric,
            f"{TAG_PREFIX}mode": self.mode,
            f"{TAG_PREFIX}min_delta": str(self.min_delta),
            f"{TAG_PREFIX}candidate_value": text(self.candidate_value),
            f"{TAG_PREFIX}champion_value": text(self.champion_value),
            f"{TAG_PREFIX}champion_version_before": text(self.champion_version_before),
            f"{TAG_PREFIX}smoke_test": self.smoke_test,
            f"{TAG_PREFIX}measured_on": self.measured_on,
            f"{TAG_PREFIX}reason": self.reason[:4000],
            f"{TAG_PREFIX}decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def as_dict(self) -> dict:
        return {**asdict(self), "promoted": self.promoted}


def beats(candidate: float, champion: float, mode: str, min_delta: float) -> bool:
    """True if `candidate` is better than `champion` by more than `min_delta` in direction `mode`."""
    if mode == "max":
        return candidate > champion + min_delta
    if mode == "min":
        return candidate < champion - min_delta
    raise ValueError(f"promotion mode must be 'max' or 'min', got {mode!r}")


def metric_of_version(client: MlflowClient, version: ModelVersion, metric: str) -> float:
    """`metric` as logged on the training run behind a registry version; missing is a PromotionError."""
    where = f"model '{version.name}' version {version.version}"
    if not version.run_id:
        raise PromotionError(f"{where} has no training run, so its metric '{metric}' cannot be read")
    metrics = client.get_run(version.run_id).data.metrics
    if metric not in metrics:
        raise PromotionError(
            f"metric '{metric}' is not logged on run {version.run_id} ({where}); "
            f"the run has {sorted(metrics) or 'no metrics'} (check promote.metric)"
        )
    return float(metrics[metric])


def find_candidate(client: MlflowClient, model_name: str, version: str | None = None) -> ModelVersion:
    """The version to judge: `version` if given, else the newest version of `model_name`."""
    try:
        return resolve_model_version(f"models:/{model_name}/{version or 'latest'}", client)
    except (ModelNotFound, ValueError) as exc:
        raise PromotionError(str(exc)) from None


@dataclass(frozen=True)
class SmokeTest:
    """Score the first `rows` rows (by id) of `test_split` with a model URI through the real Spark scorer.

    The sample and predictions live in a temporary folder under `workdir` (a path the executors can read),
    which is removed afterwards. `spark` is called only when a smoke test actually runs.
    """

    spark: Callable[[], SparkSession]
    test_split: Path
    rows: int
    workdir: Path
    batch_size: int = 1024
    input_col: str | None = None  # None: the column the model declares (raw features or text)

    def run(self, model_uri: str) -> int:
        """Rows scored; raises SmokeTestFailed if scoring fails or the predictions are not one valid row per id."""
        from pipelines.scoring import model_contract, score_parquet  # the real scorer, as `dlpipe score` runs it

        if not Path(self.test_split).exists():
            raise DataError(f"{self.test_split}: no test split to smoke-test the candidate on (run the ETL first)")
        spark = self.spark()
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        with spark_step("smoke test"), tempfile.TemporaryDirectory(prefix=".promote-smoke-", dir=self.workdir) as tmp:
            sample, predictions = Path(tmp) / "sample", Path(tmp) / "predictions"
            rows = spark.read.parquet(str(self.test_split)).orderBy("id").limit(self.rows)
            rows.coalesce(1).write.parquet(str(sample))
            ids = [row.id for row in spark.read.parquet(str(sample)).select("id").collect()]
            if not ids:
                raise DataError(f"{self.test_split}: the test split is empty; nothing to smoke-test on")
            try:
                score_parquet(spark, model_uri, sample, predictions, input_col=self.input_col, batch_size=self.batch_size)
            except Exception as exc:  # whatever breaks the scorer breaks the candidate: report it, do not promote
                reason = error_reason(exc).replace(str(sample), f"{self.rows} rows of {self.test_split}")
                raise SmokeTestFailed(reason) from exc
            outputs = model_contract(model_uri).outputs
            scored = spark.read.parquet(str(predictions)).select("id", *outputs).collect()
        _check_predictions(ids, scored, outputs)
        return len(ids)


@dataclass(frozen=True)
class TestSplitMetric:
    """A registered version's test metric measured afresh on the pipeline's current test split (`dataset_dir`),
    through the real Spark scorer and the report `dlpipe run` prints: what the gate compares when the two versions'
    training runs were tested on different datasets. Predictions live in a temporary folder under `workdir`."""

    spark: Callable[[], SparkSession]
    dataset_dir: Path
    workdir: Path
    batch_size: int = 1024
    normal_label: str | None = None  # train.anomaly.normal_label: which class is normal, for an anomaly model

    @functools.cached_property
    def manifest(self) -> dict:
        """The current dataset's manifest (read once); DataError when the pipeline has no dataset."""
        return read_manifest(self.dataset_dir)

    def dataset(self) -> str:
        """What the values are measured on: `test split of dataset <digest> (<rows> rows)`."""
        return f"test split of dataset {dataset_digest(self.manifest)} ({self.manifest['counts']['test']} rows)"

    def measure(self, model_uri: str, metric: str) -> float | None:
        """`metric` (a `test_` name, e.g. test_accuracy) of `model_uri` on the test split; None when predictions do
        not give it (test_loss). The split's class indexes are matched to the model's classes by name."""
        from pipelines.evaluation import labels_as_names, predictions_report
        from pipelines.scoring import model_contract, score_parquet

        contract = model_contract(model_uri)
        spark = self.spark()
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".promote-measure-", dir=self.workdir) as tmp:
            score_parquet(spark, model_uri, split_dir(self.dataset_dir, "test"), tmp, batch_size=self.batch_size)
            predictions = spark.read.parquet(tmp)
            if "label" in predictions.columns and contract.task in ("classification", "anomaly"):
                predictions = labels_as_names(predictions, self.manifest["classes"])
            report = predictions_report(predictions, contract.task, contract.classes, self.normal_label)
        value = report.get(metric.removeprefix("test_"))
        return None if value is None else float(value)


def _check_predictions(ids: list[str], scored: list, outputs: dict[str, str] | None = None) -> None:
    """One prediction per sampled id: a class index with a finite probability per class (classifiers), or
    every output column present and finite."""
    if sorted(row.id for row in scored) != sorted(ids):
        raise SmokeTestFailed(f"{len(ids)} rows sampled but {len(scored)} predictions came back, not one per id")
    if outputs is not None and "probability" not in outputs:
        for row in scored:
            for name, kind in outputs.items():
                values = row[name] if kind == "array<float>" else [row[name]]
                if values is None or any(v is None or (kind != "boolean" and not math.isfinite(v)) for v in values):
                    raise SmokeTestFailed(f"row id={row.id!r}: {name} {row[name]!r} is missing or not finite")
        return
    for row in scored:
        probability = row.probability or []
        if row.prediction is None or not 0 <= row.prediction < len(probability):
            raise SmokeTestFailed(f"row id={row.id!r}: prediction {row.prediction} is not a class index")
        if not all(math.isfinite(p) for p in probability):
            raise SmokeTestFailed(f"row id={row.id!r}: probabilities are not finite")


def promote(
    client: MlflowClient,
    model_name: str,
    conf: PromoteConf,
    smoke_test: SmokeTest,
    version: str | None = None,
    force: bool = False,
    remeasure: TestSplitMetric | None = None,
) -> PromotionDecision:
    """Judge a candidate (default: the newest version): set `challenger`, gate on `conf.metric`, smoke-test,
    move `champion` if both pass (or if forced and the smoke test passes), and tag the decision.

    The metric is the one each version's training run logged on its own test split. When the two runs name
    different datasets, `remeasure` scores both versions on the same, current test split and the gate compares
    those values (a metric predictions cannot give, like test_loss, stays the runs', and the reason says so)."""
    candidate = find_candidate(client, model_name, version)
    number = str(candidate.version)
    aliases = client.get_registered_model(model_name).aliases
    champion = str(aliases[CHAMPION]) if CHAMPION in aliases else None
    decided = functools.partial(
        PromotionDecision, model_name=model_name, candidate_version=number, metric=conf.metric, mode=conf.mode,
        min_delta=conf.min_delta, champion_version_before=champion,
    )
    if champion == number:  # nothing to decide; the tags of the decision that made it champion stay
        return decided(decision=ALREADY_CHAMPION, candidate_value=None, champion_value=None,
                       champion_version_after=champion, smoke_test=SMOKE_SKIPPED, smoke_rows=0,
                       reason=f"version {number} is already {CHAMPION}")

    # Read both metrics before touching any alias: a missing metric leaves the registry as it was.
    candidate_value = metric_of_version(client, candidate, conf.metric)
    champion_value = None
    champion_version = client.get_model_version(model_name, champion) if champion is not None else None
    if champion_version is not None:
        try:
            champion_value = metric_of_version(client, champion_version, conf.metric)
        except PromotionError:
            if not force:
                raise
    measured_on, note = "training runs", ""
    if champion_value is not None:
        remeasure = None if force else remeasure  # a forced promotion does not compare
        (candidate_value, champion_value), measured_on, note = _comparable(
            client, remeasure, (candidate, champion_version), (candidate_value, champion_value), conf.metric)
    client.set_registered_model_alias(model_name, CHALLENGER, number)

    passed, reason = _gate(candidate_value, champion_value, champion, conf)
    reason += note
    smoke, rows = SMOKE_SKIPPED, 0
    if passed or force:
        try:
            rows, smoke = smoke_test.run(f"models:/{model_name}/{number}"), SMOKE_PASSED
        except SmokeTestFailed as exc:
            smoke, reason = SMOKE_FAILED, f"smoke test failed: {exc}"
    if smoke == SMOKE_PASSED:
        decision, reason = (FORCED, f"forced; {reason}") if force else (PROMOTED, reason)
        client.set_registered_model_alias(model_name, CHAMPION, number)
    else:
        decision = REJECTED
        reason = f"{reason} (promotion was forced)" if force else reason

    result = decided(
        decision=decision, candidate_value=candidate_value, champion_value=champion_value,
        champion_version_after=champion if decision == REJECTED else number, smoke_test=smoke, smoke_rows=rows,
        reason=reason, measured_on=measured_on,
    )
    for key, value in result.tags().items():
        client.set_model_version_tag(model_name, number, key, value)
    return result


def _different_datasets(client: MlflowClient, candidate: ModelVersion, champion: ModelVersion) -> str:
    """`different datasets: champion's <digest>, the candidate's <digest>` when the two versions' training runs name
    different datasets (`dataset.digest`: their test metrics come from different test rows, e.g. after new input
    files); empty when they match or a run does not say."""
    candidate_digest, champion_digest = (client.get_run(v.run_id).data.tags.get(DIGEST_TAG) if v.run_id else None
                                         for v in (candidate, champion))
    if candidate_digest is None or champion_digest is None or candidate_digest == champion_digest:
        return ""
    return f"different datasets: {CHAMPION}'s {champion_digest[:12]}, the candidate's {candidate_digest[:12]}"


def _comparable(client: MlflowClient, remeasure: TestSplitMetric | None, versions: tuple[ModelVersion, ModelVersion],
                logged: tuple[float, float], metric: str) -> tuple[tuple[float, float], str, str]:
    """((candidate value, champion value), what they were measured on, a note for the reason): the runs' logged
    values while the runs name the same dataset, else both versions' `metric` on the current test split when
    `remeasure` is given and predictions give the metric. PromotionError (nothing moved yet) naming a version that
    cannot be scored on that split; DataError when the pipeline has no dataset to measure on."""
    datasets = _different_datasets(client, *versions)
    if not datasets:
        return logged, "training runs", ""
    if remeasure is None:
        return logged, "training runs", f" (measured on {datasets})"
    measured_on = remeasure.dataset()  # DataError when there is no dataset to measure on
    values = []
    for version in versions:
        try:
            value = remeasure.measure(f"models:/{version.name}/{version.version}", metric)
        except Exception as exc:  # a model that cannot score today's test rows cannot be compared on them
            raise PromotionError(f"version {version.version} of '{version.name}' cannot be measured on the "
                                 f"{measured_on}: {error_reason(exc)}") from exc
        if value is None:
            return logged, "training runs", f" (measured on {datasets}; {metric} cannot be measured from predictions)"
        values.append(value)
    note = f" (both measured on the {measured_on}; their training runs were tested on {datasets})"
    return (values[0], values[1]), measured_on, note


def _gate(candidate: float, champion: float | None, champion_version: str | None, conf: PromoteConf) -> tuple[bool, str]:
    """(passed, reason) of the metric comparison alone."""
    name = conf.metric
    if not math.isfinite(candidate):
        return False, f"candidate {name} is {candidate}, not a finite value"
    if champion_version is None:
        return True, f"first model: no {CHAMPION} yet (candidate {name} {candidate:g})"
    if champion is None:
        return False, f"{CHAMPION} version {champion_version} has no {name} to compare with"
    verdict = "beats" if beats(candidate, champion, conf.mode, conf.min_delta) else "does not beat"
    reason = (f"candidate {name} {candidate:g} {verdict} {CHAMPION} version {champion_version}'s {champion:g} "
              f"(mode {conf.mode}, min_delta {conf.min_delta:g})")
    return verdict == "beats", reason
