"""PNG figures for the MLflow run: learning curves of every epoch, and the test confusion matrix of classifiers."""
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
