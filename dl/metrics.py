"""Classification metrics from confusion matrices built per rank and summed over all ranks.

Counts add up exactly across ranks, so metrics over a sharded split equal a single-process computation.
"""
from __future__ import annotations

import torch

from dl.distributed import all_reduce_sum


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs as an int64 [K, K] matrix, true classes on rows."""
    pairs = labels.long() * num_classes + predictions.long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(confusion: torch.Tensor, loss_sum: float | None = None) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 (0 for a class never predicted or never present), mean loss if given."""
    counts = confusion.double().cpu()
    total = counts.sum()
    hits = counts.diagonal()
    predicted, actual = counts.sum(dim=0), counts.sum(dim=1)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), 0.0)
    f1 = torch.where(predicted + actual > 0, 2 * hits / (predicted + actual).clamp(min=1), 0.0)
    loss = {} if loss_sum is None else {"loss": float(loss_sum / total)}
    return {
        **loss,
        "accuracy": float(hits.sum() / total),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
    }


class ClassificationMeter:
    """Accumulates this rank's confusion matrix and loss sum; `compute` sums both over all ranks."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """Add one batch: its logits, true labels and summed (not mean) loss."""
        self.confusion += confusion_matrix(labels, logits.argmax(dim=1), self.num_classes)
        self.loss_sum += loss_sum.detach().double()

    def compute(self) -> tuple[dict[str, float], torch.Tensor]:
        """(metrics, confusion matrix) over every rank's rows; every rank gets the same result."""
        confusion = all_reduce_sum(self.confusion.clone())
        loss_sum = all_reduce_sum(self.loss_sum.clone())
        return classification_metrics(confusion, float(loss_sum)), confusion.cpu()
