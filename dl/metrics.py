"""Validation/test metrics per task, equal over a sharded split to a single-process computation.

Classification and regression add up exact counts and sums across ranks; anomaly ranking metrics (AUROC, AUPRC)
and clustering metrics (NMI, ARI, silhouette) all-gather every row (val/test splits are small), so they are exact too.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch
from sklearn import metrics as skm

from dl.distributed import all_gather, all_reduce_sum


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


def regression_metrics(abs_sum: float, sq_sum: float, count: float, loss_sum: float | None = None,
                       rows: float | None = None) -> dict[str, float]:
    """MAE, MSE and RMSE over `count` predicted values; mean loss per row if given."""
    count = max(count, 1.0)
    loss = {} if loss_sum is None else {"loss": loss_sum / max(rows or count, 1.0)}
    return {**loss, "mae": abs_sum / count, "mse": sq_sum / count, "rmse": math.sqrt(sq_sum / count)}


class RegressionMeter:
    """Sums of absolute and squared errors, values, rows and loss on this rank; `compute` sums them over ranks and,
    with `keep_rows`, gathers every row's id, prediction and target, e.g. for a forecast plot (without it the
    metrics are the same and no row is kept: what each epoch's validation needs)."""

    def __init__(self, device: torch.device, keep_rows: bool = True):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # abs, squared, values, rows, loss
        self.keep_rows = keep_rows
        self.rows: list[tuple[list, np.ndarray, np.ndarray]] = []  # (ids, predictions [n, H], targets [n, H])

    def update(self, predictions: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor,
               ids: list[str] | None = None) -> None:
        error = (predictions.double() - targets.double().reshape(predictions.shape))
        self.sums += torch.stack([error.abs().sum(), error.pow(2).sum(), error.new_tensor(error.numel()),
                                  error.new_tensor(len(error)), loss_sum.detach().double()])
        if not self.keep_rows:
            return
        values = predictions.detach().float().reshape(len(predictions), -1)
        self.rows.append((list(ids) if ids is not None else [None] * len(values), values.cpu().numpy(),
                          targets.detach().float().reshape(values.shape).cpu().numpy()))

    def compute(self) -> tuple[dict[str, float], dict | None]:
        """(metrics, {"ids", "predictions", "targets"} over all ranks' rows in rank order, or None without
        `keep_rows`)."""
        abs_sum, sq_sum, values, rows, loss_sum = all_reduce_sum(self.sums.clone()).tolist()
        if not self.keep_rows:
            return regression_metrics(abs_sum, sq_sum, values, loss_sum, rows), None
        gathered = [row for part in all_gather(self.rows) for row in part]
        details = {"ids": [i for row in gathered for i in row[0]],
                   "predictions": np.concatenate([row[1] for row in gathered]) if gathered else np.empty((0, 1)),
                   "targets": np.concatenate([row[2] for row in gathered]) if gathered else np.empty((0, 1))}
        return regression_metrics(abs_sum, sq_sum, values, loss_sum, rows), details


def ranking_metrics(scores: np.ndarray, anomalous: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC (average precision) of `scores` ranking the anomalous rows first; NaN without both kinds."""
    if anomalous.all() or not anomalous.any():
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {"auroc": float(skm.roc_auc_score(anomalous, scores)),
            "auprc": float(skm.average_precision_score(anomalous, scores))}


def threshold_metrics(scores: np.ndarray, anomalous: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of `score > threshold` as the anomaly call (0 where undefined)."""
    called = scores > threshold
    hits = float(np.sum(called & anomalous))
    precision = hits / called.sum() if called.any() else 0.0
    recall = hits / anomalous.sum() if anomalous.any() else 0.0
    f1 = 2 * hits / (called.sum() + anomalous.sum()) if called.any() or anomalous.any() else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def calibrate_threshold(scores: np.ndarray, anomalous: np.ndarray | None, method: str, quantile: float = 0.95) -> float:
    """The anomaly threshold (a row is anomalous when its score is above it), from validation scores.

    `quantile`: that quantile (linear interpolation) of the normal rows' scores (every row's without labels).
    `best_f1`: the midpoint between consecutive distinct scores that maximises F1 (ties: the higher threshold);
    below every score when calling every row anomalous is best.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if method == "quantile":
        normal = scores if anomalous is None else scores[~np.asarray(anomalous, bool)]
        if not len(normal):
            raise ValueError("no normal validation rows to calibrate the anomaly threshold on")
        return float(np.quantile(normal, quantile))
    if method != "best_f1":
        raise ValueError(f"unknown threshold method {method!r}")
    if anomalous is None or not np.any(anomalous):
        raise ValueError("threshold best_f1 needs anomalous validation rows")
    anomalous = np.asarray(anomalous, bool)
    distinct = np.unique(scores)  # ascending
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2])
    f1 = [threshold_metrics(scores, anomalous, t)["f1"] for t in candidates]
    best = max(range(len(candidates)), key=lambda i: (f1[i], candidates[i]))
    return float(candidates[best])


class AnomalyMeter:
    """Per-row anomaly scores and labels of this rank; `compute` gathers every rank's rows (small splits only)."""

    def __init__(self, device: torch.device):
        self.scores: list[np.ndarray] = []
        self.anomalous: list[np.ndarray] = []
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, rows it covers

    def update(self, scores: torch.Tensor, anomalous: torch.Tensor | None, loss_sum: torch.Tensor, rows: int) -> None:
        self.scores.append(scores.detach().float().cpu().numpy())
        self.anomalous.append(np.zeros(len(scores), bool) if anomalous is None else anomalous.cpu().numpy().astype(bool))
        self.loss += torch.stack([loss_sum.detach().double(), self.loss.new_tensor(float(rows))])

    def compute(self, threshold: float | None = None, labelled: bool = True) -> tuple[dict[str, float], dict]:
        """(metrics, {"scores", "anomalous"} over all ranks); precision/recall/F1 at `threshold` when given."""
        loss_sum, rows = all_reduce_sum(self.loss.clone()).tolist()
        mine = (np.concatenate(self.scores or [np.empty(0, np.float32)]),
                np.concatenate(self.anomalous or [np.empty(0, bool)]))
        gathered = all_gather(mine)
        scores = np.concatenate([part[0] for part in gathered])
        anomalous = np.concatenate([part[1] for part in gathered])
        metrics = {"loss": loss_sum / max(rows, 1.0), "score_mean": float(scores.mean()) if len(scores) else 0.0}
        if labelled:
            metrics.update(ranking_metrics(scores, anomalous))
        if threshold is not None:
            metrics["threshold"] = float(threshold)
            metrics["anomaly_rate"] = float(np.mean(scores > threshold)) if len(scores) else 0.0
            if labelled:
                metrics.update(threshold_metrics(scores, anomalous, threshold))
        return metrics, {"scores": scores, "anomalous": anomalous if labelled else None}


def contingency_metrics(contingency: np.ndarray) -> dict[str, float]:
    """NMI (arithmetic-mean normalization) and ARI from a [classes, clusters] table of row counts: what
    `normalized_mutual_info_score` and `adjusted_rand_score` give for the rows counted, without the rows."""
    counts = np.asarray(contingency, dtype=np.int64)
    counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]  # the classes and clusters that occur
    return {"nmi": _nmi(counts), "ari": _ari(counts)}


def _nmi(counts: np.ndarray) -> float:
    if counts.shape[0] == counts.shape[1] <= 1:
        return 1.0  # neither labelling splits the rows: a perfect match
    mutual = skm.mutual_info_score(None, None, contingency=counts)
    if mutual == 0:
        return 0.0
    mean_entropy = (scipy.stats.entropy(counts.sum(axis=1)) + scipy.stats.entropy(counts.sum(axis=0))) / 2
    return float(mutual / max(mean_entropy, np.finfo(np.float64).eps))


def _ari(counts: np.ndarray) -> float:
    """From the pair counts (ordered pairs of distinct rows), in Python integers: a product of pair counts of 10M
    rows overflows int64."""
    rows, same_both = int(counts.sum()), int((counts ** 2).sum())
    same_class = int(counts.sum(axis=1) @ counts.sum(axis=1))
    same_cluster = int(counts.sum(axis=0) @ counts.sum(axis=0))
    together = same_both - rows  # same class and same cluster
    cluster_only, class_only = same_cluster - same_both, same_class - same_both
    apart = rows ** 2 - cluster_only - class_only - same_both
    if cluster_only == 0 and class_only == 0:
        return 1.0
    return 2.0 * (together * apart - class_only * cluster_only) / (
        (together + class_only) * (class_only + apart) + (together + cluster_only) * (cluster_only + apart))


def clustering_metrics(clusters: np.ndarray, labels: np.ndarray | None = None, embeddings: np.ndarray | None = None,
                       silhouette_rows: int = 5000, seed: int = 0) -> dict[str, float]:
    """NMI and ARI of `clusters` against `labels` (when given); silhouette of the clusters in `embeddings` (when
    given; on a seeded sample of `silhouette_rows` rows when there are more; NaN with fewer than 2 clusters)."""
    metrics: dict[str, float] = {}
    if labels is not None:
        metrics.update(contingency_metrics(skm.cluster.contingency_matrix(labels, clusters)))
    if embeddings is not None:
        separable = 1 < len(np.unique(clusters)) < len(clusters)
        sample = silhouette_rows if len(clusters) > silhouette_rows else None
        metrics["silhouette"] = float(skm.silhouette_score(embeddings, clusters, sample_size=sample, random_state=seed)
                                      if separable else float("nan"))
    return metrics


class ClusteringMeter:
    """This rank's embeddings, cluster assignments and labels; `compute` gathers every rank's rows (val/test splits
    are small) and scores them as one process would."""

    def __init__(self, device: torch.device, labelled: bool):
        self.labelled = labelled
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, rows

    def update(self, embeddings: torch.Tensor, clusters: torch.Tensor, labels: torch.Tensor | None,
               loss_sum: torch.Tensor | None = None) -> None:
        self.parts.append((embeddings.detach().float().cpu().numpy(), clusters.cpu().numpy().astype(np.int64),
                           None if labels is None else labels.cpu().numpy().astype(np.int64)))
        loss = self.loss.new_zeros(()) if loss_sum is None else loss_sum.detach().double()
        self.loss += torch.stack([loss, self.loss.new_tensor(float(len(clusters)))])

    def compute(self) -> tuple[dict[str, float], dict]:
        """(loss, nmi, ari (labelled only), silhouette; {"embeddings", "clusters", "labels"} in rank order)."""
        loss_sum, rows = all_reduce_sum(self.loss.clone()).tolist()
        parts = [part for gathered in all_gather(self.parts) for part in gathered]
        embeddings = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 0), np.float32)
        clusters = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
        labels = np.concatenate([p[2] for p in parts]) if parts and self.labelled else None
        metrics = {"loss": loss_sum / max(rows, 1.0), **clustering_metrics(clusters, labels, embeddings)}
        return metrics, {"embeddings": embeddings, "clusters": clusters, "labels": labels}
