"""Quality of a predictions table, per task, counted by Spark where counts suffice.

Classification: only the K x K confusion matrix reaches the driver. Regression: sums of errors. Anomaly: the
call at the threshold is counted by Spark; AUROC/AUPRC need every row's score, so (label, score) pairs of the
scored split are collected (the test split, small by construction).
"""
from __future__ import annotations

import numpy as np
import torch
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from dl.metrics import classification_metrics, ranking_metrics, regression_metrics


def confusion_from_predictions(predictions: DataFrame, num_classes: int) -> torch.Tensor:
    """[K, K] counts of (label, prediction) pairs, true classes on rows."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for row in predictions.groupBy("label", "prediction").count().collect():
        confusion[row["label"], row["prediction"]] = row["count"]
    return confusion


def classification_report(predictions: DataFrame, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 of `prediction` against `label`."""
    return classification_metrics(confusion_from_predictions(predictions, num_classes))


def regression_report(predictions: DataFrame, target: str = "target") -> dict[str, float]:
    """MAE, MSE and RMSE of `prediction` (a value, or an array of them) against `target`."""
    if predictions.schema["prediction"].dataType.typeName() == "array":
        pairs = predictions.select(F.explode(F.arrays_zip("prediction", target)).alias("pair"))
        errors = pairs.select((F.col("pair.prediction") - F.col(f"pair.{target}")).alias("error"))
    else:
        errors = predictions.select((F.col("prediction") - F.col(target)).alias("error"))
    row = errors.agg(F.sum(F.abs("error")).alias("abs"), F.sum(F.col("error") ** 2).alias("sq"),
                     F.count("error").alias("n")).collect()[0]
    return regression_metrics(float(row["abs"] or 0.0), float(row["sq"] or 0.0), float(row["n"]))


def anomaly_report(predictions: DataFrame, normal_index: int) -> dict[str, float]:
    """AUROC, AUPRC of `anomaly_score`, and precision/recall/F1 of `is_anomaly`, where label != `normal_index`
    marks the true anomalies."""
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


def predictions_report(predictions: DataFrame, task: str, classes: list[str], normal_label: str | None = None) -> dict:
    """The test-split quality of a predictions table for `task` (classification, regression or anomaly)."""
    if task == "regression":
        return regression_report(predictions)
    if task == "anomaly":
        if normal_label is None or "label" not in predictions.columns:
            return {"anomaly_rate": predictions.where(F.col("is_anomaly")).count() / max(predictions.count(), 1)}
        return anomaly_report(predictions, classes.index(normal_label))
    return classification_report(predictions, len(classes))
