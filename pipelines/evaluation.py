"""Quality of a predictions table, per task, counted by Spark where counts suffice.

Classification: only the K x K confusion matrix reaches the driver. Regression: sums of errors. Clustering: the
(label, cluster) contingency table and the mean distance. Anomaly: the call at the threshold is counted by Spark;
AUROC/AUPRC need every row's score in order, so (label, score) pairs of the scored split are collected (a flag
and a double a row: the 1.5M test rows of a 10M-row dataset take 14 MB).

A `label` is a class index into the model's classes (the dataset contract) or a class name. Rows whose label is
not one of the model's classes (a class never seen in training, an index out of range, a null) are counted by
label and left out of the metrics, with a warning; the report adds `rows_unseen_label`.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

from dl.metrics import classification_metrics, contingency_metrics, ranking_metrics, regression_metrics
from pipelines.dataset import encode_labels
from pipelines.errors import DataError
from pipelines.spark_progress import spark_step

log = logging.getLogger("dlpipe.evaluation")


def confusion_from_predictions(predictions: DataFrame, num_classes: int) -> torch.Tensor:
    """[K, K] counts of (label, prediction) pairs, true classes on rows."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for row in predictions.groupBy("label", "prediction").count().collect():
        confusion[row["label"], row["prediction"]] = row["count"]
    return confusion


def _labels_by_name(predictions: DataFrame) -> bool:
    return isinstance(predictions.schema["label"].dataType, StringType)


def _has_known_label(predictions: DataFrame, classes: list[str]) -> Column:
    """True where `label` is one of `classes`: a class name, or a class index 0..K-1; false for null."""
    label = F.col("label")
    known = label.isin(classes) if _labels_by_name(predictions) else label.between(0, len(classes) - 1)
    return F.coalesce(known, F.lit(False))


def labels_as_names(predictions: DataFrame, classes: list[str]) -> DataFrame:
    """`label` as the class name it indexes in `classes` (a dataset's), so it can be matched to another model's
    classes by name; an index out of range becomes null (an unseen label)."""
    names = F.array(*[F.lit(name) for name in classes])
    return predictions.withColumn("label", F.get(names, F.col("label").cast("int")))


def unseen_labels(predictions: DataFrame, classes: list[str]) -> dict:
    """Label -> rows, for the rows whose `label` is not one of `classes` (by name or by index; null included)."""
    unseen = predictions.where(~_has_known_label(predictions, classes)).groupBy("label").count().collect()
    return dict(sorted(((row["label"], row["count"]) for row in unseen), key=lambda item: str(item[0])))


def with_known_labels(predictions: DataFrame, classes: list[str]) -> tuple[DataFrame, int]:
    """(the rows whose label is one of `classes`, with `label` as the class index; how many rows were left out).

    The left-out rows are counted by label and logged as a warning; DataError when no row is left to measure.
    """
    unseen = unseen_labels(predictions, classes)
    left_out = sum(unseen.values())
    if left_out:
        log.warning("unseen labels: %s (%d rows): not among the model's classes %s; left out of the metrics",
                    unseen, left_out, classes)
    known = predictions.where(_has_known_label(predictions, classes))
    known = encode_labels(known, "label", classes) if _labels_by_name(predictions) else known
    if left_out and not known.limit(1).count():
        raise DataError(f"no predictions row has a label among the model's classes {classes}: unseen labels: {unseen}")
    return known, left_out


def classification_report(predictions: DataFrame, classes: list[str]) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 of `prediction` against `label` (rows of known labels), and
    `rows_unseen_label`."""
    known, left_out = with_known_labels(predictions, classes)
    return {**classification_metrics(confusion_from_predictions(known, len(classes))), "rows_unseen_label": left_out}


def regression_report(predictions: DataFrame, target: str = "target") -> dict[str, float]:
    """MAE, MSE and RMSE of `prediction` (a value, or an array of them) against `target` (a value or an array: a
    single prediction value is compared with the array's one element, e.g. a horizon-1 forecast)."""
    if predictions.schema["prediction"].dataType.typeName() == "array":
        pairs = predictions.select(F.explode(F.arrays_zip("prediction", target)).alias("pair"))
        errors = pairs.select((F.col("pair.prediction") - F.col(f"pair.{target}")).alias("error"))
    else:
        actual = F.col(target)[0] if predictions.schema[target].dataType.typeName() == "array" else F.col(target)
        errors = predictions.select((F.col("prediction") - actual).alias("error"))
    row = errors.agg(F.sum(F.abs("error")).alias("abs"), F.sum(F.col("error") ** 2).alias("sq"),
                     F.count("error").alias("n")).collect()[0]
    return regression_metrics(float(row["abs"] or 0.0), float(row["sq"] or 0.0), float(row["n"]))


def anomaly_report(predictions: DataFrame, normal_index: int) -> dict[str, float]:
    """AUROC, AUPRC of `anomaly_score`, and precision/recall/F1 of `is_anomaly`, where label != `normal_index`
    marks the true anomalies (`label` a class index)."""
    actual = F.col("label") != F.lit(normal_index)
    counts = {(row["actual"], row["is_anomaly"]): row["count"]
              for row in predictions.groupBy(actual.alias("actual"), "is_anomaly").count().collect()}
    hits, called = counts.get((True, True), 0), counts.get((True, True), 0) + counts.get((False, True), 0)
    anomalies = hits + counts.get((True, False), 0)
    pairs = predictions.select(actual.alias("actual"), "anomaly_score").toPandas()
    return {
        **ranking_metrics(pairs["anomaly_score"].to_numpy(np.float64), pairs["actual"].to_numpy(bool)),
        "precision": hits / called if called else 0.0,
        "recall": hits / anomalies if anomalies else 0.0,
        "f1": 2 * hits / (called + anomalies) if called + anomalies else 0.0,
        "anomaly_rate": called / max(len(pairs), 1),
    }


def _contingency(counts: list) -> np.ndarray:
    """[labels, clusters] row counts from (label, cluster, rows) rows, each axis in sorted order of its values."""
    labels = {value: i for i, value in enumerate(sorted({row["label"] for row in counts}, key=str))}
    clusters = {value: i for i, value in enumerate(sorted({row["cluster"] for row in counts}, key=str))}
    table = np.zeros((len(labels), len(clusters)), dtype=np.int64)
    for row in counts:
        table[labels[row["label"]], clusters[row["cluster"]]] = row["rows"]
    return table


def clustering_report(predictions: DataFrame) -> dict[str, float]:
    """NMI and ARI of `cluster` against `label` (when the table has one), and the mean `distance` to the assigned
    centroid, from one Spark aggregation: rows and distance sums per (label, cluster)."""
    labelled = "label" in predictions.columns
    counts = predictions.groupBy(*(["label"] if labelled else []), "cluster").agg(
        F.count(F.lit(1)).alias("rows"), F.sum("distance").alias("distance_sum"), F.count("distance").alias("distances"),
    ).collect()
    distances = sum(row["distances"] for row in counts)
    distance_mean = sum(row["distance_sum"] or 0.0 for row in counts) / distances if distances else float("nan")
    return {**(contingency_metrics(_contingency(counts)) if labelled else {}), "distance_mean": distance_mean}


@spark_step("evaluate predictions")
def predictions_report(predictions: DataFrame, task: str, classes: list[str], normal_label: str | None = None) -> dict:
    """The test-split quality of a predictions table for `task` (classification, regression, anomaly or clustering)."""
    if task == "regression":
        return regression_report(predictions)
    if task == "anomaly":
        if normal_label is None or "label" not in predictions.columns:
            return {"anomaly_rate": predictions.where(F.col("is_anomaly")).count() / max(predictions.count(), 1)}
        known, left_out = with_known_labels(predictions, classes)
        return {**anomaly_report(known, classes.index(normal_label)), "rows_unseen_label": left_out}
    if task == "clustering":
        return clustering_report(predictions)
    return classification_report(predictions, classes)
