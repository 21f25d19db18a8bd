"""PNG figures for the MLflow run: learning curves of every epoch, and per task (`Task.figures`) the test split's
confusion matrix (classification), forecast vs actual (regression) and anomaly-score histogram (anomaly)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: training runs on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def learning_curves(history: list[dict[str, float]]) -> Figure:
    """Train/val loss on the left, every other val metric on the right, one point per epoch."""
    epochs = np.arange(1, len(history) + 1)
    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("train_loss", "val_loss"):
        if name in history[0]:
            losses.plot(epochs, [row[name] for row in history], marker=".", label=name)
    for name in history[0]:
        if name.startswith("val_") and name != "val_loss":
            metrics.plot(epochs, [row[name] for row in history], marker=".", label=name)
    for axes, title in ((losses, "loss"), (metrics, "validation metrics")):
        axes.set(xlabel="epoch", title=title)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.tight_layout()
    return figure


def confusion_matrix(matrix: list[list[int]], classes: list[str]) -> Figure:
    """Counts of (true class, predicted class), true classes on rows, each cell labelled."""
    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    axes.imshow(counts, cmap="Blues")
    axes.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
             xlabel="predicted", ylabel="true", title="test confusion matrix")
    for (row, column), count in np.ndenumerate(counts):
        color = "white" if count > counts.max() / 2 else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    return figure


def forecast(ids: list, predictions: np.ndarray, targets: np.ndarray) -> Figure:
    """Predicted vs actual first horizon step of every test row, rows ordered by id (time order for time series)."""
    order = sorted(range(len(ids)), key=lambda i: (ids[i] is None, ids[i] or "", i))
    predicted = np.asarray(predictions).reshape(len(order), -1)[order, 0]
    actual = np.asarray(targets).reshape(len(order), -1)[order, 0]
    mae = float(np.abs(predicted - actual).mean()) if len(order) else float("nan")
    figure, axes = plt.subplots(figsize=(10, 4))
    axes.plot(actual, label="actual", color="black", linewidth=1)
    axes.plot(predicted, label="forecast", color="tab:orange", linewidth=1)
    ticks = np.linspace(0, len(order) - 1, min(6, len(order))).astype(int) if len(order) else []
    axes.set_xticks(ticks, [str(ids[order[i]]) for i in ticks], fontsize=7)
    axes.set(xlabel="row (ordered by id)", ylabel="target", title=f"test forecast vs actual (MAE {mae:.3f})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def anomaly_scores(scores: np.ndarray, anomalous: np.ndarray | None, threshold: float | None) -> Figure:
    """Histogram of test anomaly scores (normal and anomalous rows apart when labelled) with the threshold line."""
    scores = np.asarray(scores, dtype=np.float64)
    bins = np.histogram_bin_edges(scores, bins=40)
    figure, axes = plt.subplots(figsize=(7, 4))
    if anomalous is None:
        axes.hist(scores, bins=bins, label="all rows", alpha=0.7)
    else:
        anomalous = np.asarray(anomalous, bool)
        axes.hist(scores[~anomalous], bins=bins, label="normal", alpha=0.6)
        axes.hist(scores[anomalous], bins=bins, label="anomalous", alpha=0.6)
    if threshold is not None:
        axes.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set(xlabel="anomaly score (reconstruction MSE)", ylabel="rows", title="test anomaly scores")
    axes.legend()
    figure.tight_layout()
    return figure


def cluster_projection(embeddings: np.ndarray, clusters: np.ndarray) -> Figure:
    """The test embeddings projected on their first two principal components, each point coloured by its cluster."""
    from sklearn.decomposition import PCA

    points = np.asarray(embeddings, dtype=np.float64)
    clusters = np.asarray(clusters)
    projected = PCA(n_components=2).fit_transform(points) if len(points) > 1 else np.zeros((len(points), 2))
    figure, axes = plt.subplots(figsize=(6, 5))
    scatter = axes.scatter(projected[:, 0], projected[:, 1], c=clusters, cmap="tab10" if clusters.max(initial=0) < 10
                           else "tab20", s=10)
    axes.legend(*scatter.legend_elements(), title="cluster", fontsize=7, loc="best")
    axes.set(xlabel="PC 1", ylabel="PC 2", title=f"test embeddings by cluster ({len(points)} rows, PCA)")
    figure.tight_layout()
    return figure
