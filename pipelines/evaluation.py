"""Quality of a predictions table, counted by Spark: only the K x K confusion matrix reaches the driver."""
from __future__ import annotations

import torch
from pyspark.sql import DataFrame

from dl.metrics import classification_metrics


def confusion_from_predictions(predictions: DataFrame, num_classes: int) -> torch.Tensor:
    """[K, K] counts of (label, prediction) pairs, true classes on rows."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for row in predictions.groupBy("label", "prediction").count().collect():
        confusion[row["label"], row["prediction"]] = row["count"]
    return confusion


def classification_report(predictions: DataFrame, num_classes: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 of `prediction` against `label`."""
    return classification_metrics(confusion_from_predictions(predictions, num_classes))
