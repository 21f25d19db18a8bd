"""What a model is trained to do, as one small object per task: classification, regression, anomaly detection,
clustering.

A task owns everything that differs between them: the loader columns, which rows fit the model, the loss's
inputs and targets, the all-reduced validation metrics (and which direction is better), a calibration step after
training (the anomaly threshold), and the columns the serving model returns. The trainer and the serving model
call these and never branch on the model kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure

from dl import plots
from dl.arrow_loader import list_column_to_numpy
from dl.clustering import DecLoss, target_distribution
from dl.losses import build_loss
from dl.metrics import AnomalyMeter, ClassificationMeter, ClusteringMeter, RegressionMeter, calibrate_threshold
from jobs.config import AnomalyConf, ConfigError, DecConf, EarlyStoppingConf, LossConf, PromoteConf, TrainConf

# Serving output column types (the Spark scorer and the MLflow signature map them): int, float, boolean, array<float>,
# string.
OutputColumns = dict[str, str]
FLOAT_TARGET_LOSSES = ("mse", "mae", "huber")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (ids and other lists untouched)."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


class Task:
    """The classification task's behaviour, and the defaults the other tasks share."""

    kind = "classification"
    columns: tuple[str, ...] = ("features", "label")
    directions: dict[str, str] = {"loss": "min", "accuracy": "max", "precision_macro": "max", "recall_macro": "max",
                                  "f1_macro": "max"}
    default_stopping = ("val_accuracy", "max")
    promoted_on = "test_accuracy"  # the promotion gate's default metric
    logged = ("loss", "accuracy", "f1_macro")  # what the per-epoch log line shows
    losses: tuple[str, ...] | None = None  # the train.loss names that fit the task (None: any)
    calibrated = False  # whether `calibrate` fits state on the validation split after training

    def __init__(self, num_outputs: int):
        self.num_outputs = num_outputs

    @property
    def output_columns(self) -> OutputColumns:
        return {"prediction": "int", "probability": "array<float>"}

    # --- training ---
    def check(self, conf: TrainConf) -> EarlyStoppingConf:
        """Raise on settings that do not fit the task; return the early-stopping settings with defaults filled in."""
        if self.losses is not None and conf.loss.name not in self.losses:
            raise ValueError(f"train.loss.name {conf.loss.name!r} does not fit the {self.kind} task; "
                             f"use one of {list(self.losses)}")
        metric = conf.early_stopping.metric or self.default_stopping[0]
        name = metric.removeprefix("val_")
        if name not in self.directions:
            known = ", ".join(f"val_{n}" for n in self.directions)
            raise ValueError(f"train.early_stopping.metric {metric!r} is not a metric of the {self.kind} task; "
                             f"use one of {known}")
        mode = conf.early_stopping.mode or self.directions[name]
        return conf.early_stopping.model_copy(update={"metric": metric, "mode": mode})

    @classmethod
    def promotion(cls, conf: PromoteConf) -> PromoteConf:
        """The promotion gate's settings with the task's defaults filled in: `promoted_on`, in its direction."""
        metric = conf.metric or cls.promoted_on
        mode = conf.mode or cls.directions.get(metric.removeprefix("test_"))
        if mode is None:
            raise ConfigError(f"'promote.mode': which way is better for promote.metric {metric!r} is not known for "
                              f"the {cls.kind} task (it knows {', '.join(f'test_{n}' for n in cls.directions)}); "
                              f"set promote.mode to max or min")
        return conf.model_copy(update={"metric": metric, "mode": mode})

    def training_batch(self, batch: dict) -> dict:
        """The rows of `batch` that fit the model (all of them, unless the task says otherwise)."""
        return batch

    def rows(self, batch: dict) -> int:
        """How many rows of a training batch the loss covers."""
        return 0 if batch.get("ignore") else len(batch["features"])

    def loss_inputs(self, outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) for the loss."""
        return outputs, batch["label"]

    def criterion(self, conf: LossConf, reduction: str = "mean") -> torch.nn.Module:
        """The training loss, called on `loss_inputs`; with `reduction="sum"`, what evaluation adds up."""
        return build_loss(conf, self.num_outputs, reduction=reduction)

    def target_statistics(self, train_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-output (mean, std) of the train split's targets, for networks that predict standardized values
        (None: the task has no float targets)."""
        return None

    # --- evaluation ---
    def meter(self, device: torch.device, details: bool = True):
        """A meter for one evaluation; `details`: whether the caller uses the details `compute` returns (a meter may
        then skip keeping rows that only they need)."""
        return ClassificationMeter(self.num_outputs, device)

    def update(self, meter, outputs: torch.Tensor, batch: dict, loss_sum: torch.nn.Module) -> None:
        """Add one evaluation batch (on the device) to `meter`; `loss_sum` is the training loss, summed."""
        meter.update(outputs, batch["label"], loss_sum(*self.loss_inputs(outputs, batch)))

    def compute(self, meter, state: dict | None = None) -> tuple[dict[str, float], Any]:
        """(metrics, details) over every rank's rows; `state` is what `calibrate` returned, None before it ran."""
        return meter.compute()

    def calibrate(self, details: Any) -> dict:
        """Plain-data state fitted on the validation split after training, saved with the model (none here)."""
        return {}

    def figures(self, details: Any, classes: list[str]) -> dict[str, Figure]:
        """Figures of the test evaluation, by name (logged as `plots/<name>.png`); `details` is what `compute`
        returned with the metrics. A new task overrides this to plot its own details."""
        return {"confusion_matrix": plots.confusion_matrix(details.tolist(), classes)}

    # --- serving ---
    def serve(self, outputs: torch.Tensor, inputs: torch.Tensor, state: dict) -> dict[str, np.ndarray]:
        """The serving columns of one batch: network outputs (and the scaled inputs) -> NumPy columns."""
        probability = torch.softmax(outputs.float(), dim=1).cpu().numpy()
        return {"prediction": probability.argmax(axis=1).astype(np.int64), "probability": probability}


class ClassificationTask(Task):
    """Classification; with the dataset's class names, serving also names each row's class (`predicted_class`)."""

    def __init__(self, num_outputs: int, classes: list[str] | None = None):
        super().__init__(num_outputs)
        self.classes = np.asarray(classes, dtype=object) if classes else None

    @property
    def output_columns(self) -> OutputColumns:
        return {**super().output_columns, **({"predicted_class": "string"} if self.classes is not None else {})}

    def serve(self, outputs, inputs, state):
        columns = super().serve(outputs, inputs, state)
        if self.classes is not None:
            columns["predicted_class"] = self.classes[columns["prediction"]]
        return columns


class RegressionTask(Task):
    """Float targets from the dataset's `target` column (float, or array<float> of `num_outputs` values)."""

    kind = "regression"
    columns = ("features", "target", "id")
    directions = {"loss": "min", "mae": "min", "mse": "min", "rmse": "min"}
    default_stopping = ("val_loss", "min")
    promoted_on = "test_mae"  # not test_loss: versions trained with different losses stay comparable
    logged = ("loss", "mae", "rmse")
    losses = FLOAT_TARGET_LOSSES

    @property
    def output_columns(self) -> OutputColumns:
        return {"prediction": "float" if self.num_outputs == 1 else "array<float>"}

    def loss_inputs(self, outputs, batch):
        return outputs, batch["target"].float().reshape(outputs.shape)

    def target_statistics(self, train_dir):
        column = pq.read_table(train_dir, columns=["target"]).column("target")
        if column.null_count:
            raise ValueError(f"{train_dir}: column 'target' has {column.null_count} nulls")
        targets = list_column_to_numpy(column) if pa.types.is_list(column.type) else column.to_numpy()
        targets = targets.reshape(len(targets), -1).astype(np.float64)
        if targets.shape[1] != self.num_outputs:
            raise ValueError(f"{train_dir}: column 'target' holds {targets.shape[1]} values per row, the model "
                             f"predicts {self.num_outputs} (model.outputs)")
        std = targets.std(axis=0)
        return targets.mean(axis=0), np.where(std > 0, std, 1.0)

    def meter(self, device, details=True):
        return RegressionMeter(device, keep_rows=details)

    def update(self, meter, outputs, batch, loss_sum):
        meter.update(outputs, batch["target"], loss_sum(*self.loss_inputs(outputs, batch)), batch.get("id"))

    def figures(self, details, classes):
        return {"forecast": plots.forecast(details["ids"], details["predictions"], details["targets"])}

    def serve(self, outputs, inputs, state):
        values = outputs.float().cpu().numpy()
        return {"prediction": values[:, 0] if self.num_outputs == 1 else values}


class AnomalyTask(Task):
    """Reconstruction: the loss compares the output with the input; the anomaly score is a row's MSE over features.

    With `normal_label`, rows of other classes are anomalies: they never fit the model when `fit_on` is normal,
    but count in the val/test metrics (AUROC, AUPRC; precision/recall/F1 at the calibrated threshold).
    """

    kind = "anomaly"
    directions = {"loss": "min", "score_mean": "min", "auroc": "max", "auprc": "max"}
    default_stopping = ("val_loss", "min")
    promoted_on = "test_loss"  # the reconstruction error: every dataset has it (AUROC needs normal_label)
    logged = ("loss", "auroc", "auprc")
    losses = FLOAT_TARGET_LOSSES
    calibrated = True

    def __init__(self, num_outputs: int, conf: AnomalyConf, classes: list[str], min_rows: int = 1):
        super().__init__(num_outputs)
        self.conf, self.min_rows = conf, min_rows  # min_rows: 2 with batch-norm (undefined on one row)
        self.normal_index = None
        if conf.normal_label is not None:
            if conf.normal_label not in classes:
                raise ValueError(f"train.anomaly.normal_label {conf.normal_label!r} is not a class of the dataset "
                                 f"{list(classes)}")
            self.normal_index = list(classes).index(conf.normal_label)
        self.columns = ("features", "label") if self.labelled else ("features",)

    @property
    def labelled(self) -> bool:
        return self.normal_index is not None

    @property
    def output_columns(self) -> OutputColumns:
        return {"anomaly_score": "float", "is_anomaly": "boolean"}

    def check(self, conf):
        stopping = super().check(conf)
        if stopping.metric in ("val_auroc", "val_auprc") and not self.labelled:
            raise ValueError(f"train.early_stopping.metric {stopping.metric} needs train.anomaly.normal_label")
        return stopping

    def _fitted(self, batch: dict) -> torch.Tensor | None:
        """Mask of the rows that fit the model (None: all of them)."""
        if self.labelled and self.conf.fit_on == "normal":
            return batch["label"] == self.normal_index
        return None

    def training_batch(self, batch):
        mask = self._fitted(batch)
        if mask is None:
            return batch
        if int(mask.sum()) < self.min_rows:  # keep DDP in step: a zero-weight step on the whole batch
            return {**batch, "ignore": True}
        return {key: value[mask] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}

    def loss_inputs(self, outputs, batch):
        return outputs, batch["features"].reshape(outputs.shape)

    def meter(self, device, details=True):  # the metrics (AUROC) need every row's score anyway
        return AnomalyMeter(device)

    @staticmethod
    def scores(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Per-row reconstruction error: the mean squared difference over the features."""
        return (outputs.float() - inputs.float().reshape(outputs.shape)).pow(2).reshape(len(outputs), -1).mean(dim=1)

    def update(self, meter, outputs, batch, loss_sum):
        mask = self._fitted(batch)
        fitted = outputs if mask is None else outputs[mask]
        target = batch["features"] if mask is None else batch["features"][mask]
        loss = loss_sum(*self.loss_inputs(fitted, {"features": target})) if len(fitted) else outputs.new_zeros(())
        anomalous = batch["label"] != self.normal_index if self.labelled else None
        meter.update(self.scores(outputs, batch["features"]), anomalous, loss, len(fitted))

    def compute(self, meter, state=None):
        threshold = None if state is None else state.get("threshold")
        metrics, details = meter.compute(threshold, labelled=self.labelled)
        return metrics, {**details, "threshold": threshold}

    def calibrate(self, details):
        threshold = calibrate_threshold(details["scores"], details["anomalous"], self.conf.threshold, self.conf.quantile)
        return {"threshold": threshold, "threshold_method": self.conf.threshold}

    def figures(self, details, classes):
        return {"anomaly_scores": plots.anomaly_scores(details["scores"], details["anomalous"], details["threshold"])}

    def serve(self, outputs, inputs, state):
        scores = self.scores(outputs, inputs).cpu().numpy().astype(np.float32)
        return {"anomaly_score": scores, "is_anomaly": scores > float(state["threshold"])}


class ClusteringTask(Task):
    """DEC clustering (`model.kind: dec`): a row belongs to the nearest centroid in the autoencoder's embedding.

    Refinement fits KL(P || Q) (+ an optional reconstruction term) against the target that `set_target` fixes
    (`dl/dec.py` recomputes it over the whole train split). Metrics over every rank's rows: NMI and ARI against the
    labels (when the dataset has classes) and the silhouette of the embeddings. Serving: `cluster`, `distance`.
    """

    kind = "clustering"
    directions = {"loss": "min", "nmi": "max", "ari": "max", "silhouette": "max"}
    default_stopping = ("val_silhouette", "max")  # label-free: labels only measure
    promoted_on = "test_silhouette"
    logged = ("loss", "nmi", "ari", "silhouette")
    losses = FLOAT_TARGET_LOSSES  # the reconstruction loss: pre-training, and the optional refinement term

    def __init__(self, conf: DecConf, classes: list[str]):
        super().__init__(conf.clusters)
        self.conf, self.labelled = conf, bool(classes)
        self.columns = ("features", "label") if self.labelled else ("features",)
        self.reference: torch.nn.Module | None = None  # a frozen copy of the network as of the last target update
        self.frequencies: torch.Tensor | None = None  # f_j over the whole train split at that update

    @property
    def output_columns(self) -> OutputColumns:
        return {"cluster": "int", "distance": "float"}

    def check(self, conf):
        # dl/dec.py runs each phase with train.epochs set to that phase's epochs; a user's own value would be ignored
        if "epochs" in conf.model_fields_set and conf.epochs != self.conf.refine.epochs:
            raise ValueError("train.epochs does not apply to model.kind dec: set model.pretrain.epochs and "
                             "model.refine.epochs")
        if conf.loader != "arrow":
            raise ValueError("model.kind dec needs train.loader arrow (target updates compare each row's cluster in a "
                             "fixed order)")
        stopping = super().check(conf)
        if stopping.metric in ("val_nmi", "val_ari") and not self.labelled:
            raise ValueError(f"train.early_stopping.metric {stopping.metric} needs a labelled dataset")
        return stopping

    def criterion(self, conf, reduction="mean"):
        return DecLoss(super().criterion(conf, "sum"), self.conf.refine.reconstruction, reduction)

    def set_target(self, reference: torch.nn.Module, frequencies: torch.Tensor) -> None:
        """Fix the target: `reference`'s soft assignments, sharpened with the train split's cluster `frequencies`."""
        self.reference, self.frequencies = reference.eval().requires_grad_(False), frequencies

    def target(self, features: torch.Tensor) -> torch.Tensor:
        """P for these rows: from the reference network's Q and the train split's cluster frequencies."""
        if self.reference is None:
            raise RuntimeError("the DEC target distribution is not set: dl.dec computes it over the train split")
        with torch.no_grad():
            return target_distribution(self.reference(features).q, self.frequencies)

    def loss_inputs(self, outputs, batch):
        features = batch["features"].reshape(outputs.reconstruction.shape)
        return outputs.q, self.target(features), outputs.reconstruction, features

    def meter(self, device, details=True):  # the metrics (silhouette) need every row's embedding anyway
        return ClusteringMeter(device, self.labelled)

    def update(self, meter, outputs, batch, loss_sum):
        labels = batch["label"] if self.labelled else None
        loss = loss_sum(*self.loss_inputs(outputs, batch))
        meter.update(outputs.embedding, outputs.distance.argmin(dim=1), labels, loss)

    def figures(self, details, classes):
        return {"cluster_embeddings": plots.cluster_projection(details["embeddings"], details["clusters"])}

    def serve(self, outputs, inputs, state):
        distance, cluster = outputs.distance.detach().min(dim=1)
        return {"cluster": cluster.cpu().numpy().astype(np.int64), "distance": distance.float().cpu().numpy()}


def task_type(model_conf) -> type[Task]:
    """The task a model config trains for (its `task_kind`): CNNs classify; MLPs and RNNs classify or regress
    (`model.task`); autoencoders (dense or LSTM) detect anomalies; DEC models cluster."""
    tasks = (ClassificationTask, RegressionTask, AnomalyTask, ClusteringTask)
    return next(task for task in tasks if task.kind == model_conf.task_kind)


def build_task(model_conf, classes: list[str], anomaly: AnomalyConf | None = None) -> Task:
    """The task object of a model config (`task_type`) for a dataset with `classes`."""
    kind = task_type(model_conf)
    if kind is AnomalyTask:
        min_rows = 2 if getattr(model_conf, "batch_norm", False) else 1
        return AnomalyTask(0, anomaly or AnomalyConf(), classes, min_rows=min_rows)
    if kind is ClusteringTask:
        return ClusteringTask(model_conf, classes)
    if kind is RegressionTask:
        return RegressionTask(model_conf.outputs)
    if not classes:
        raise ValueError(f"a {model_conf.kind} classifier needs a labelled dataset (manifest classes is empty)")
    return ClassificationTask(len(classes), classes)


def as_task(task: Task | int) -> Task:
    """A task object; a bare class count means classification (the trainer's original signature)."""
    return ClassificationTask(task) if isinstance(task, int) else task
