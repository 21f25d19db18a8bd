"""The registered model: an MLflow pyfunc holding the fitted preprocessing and the network's weights.

It takes the *pre-normalization* features (what the dataset stores in `raw_features`), applies the
manifest's `FittedScaler` itself and returns the task's columns (dl/tasks.py): a class index and per-class
probabilities, a regression value, or an anomaly score and the call at the threshold calibrated in training.
The network is rebuilt from the stored model config and a weights-only state dict, never unpickled as a module.
"""
from __future__ import annotations

import math
import re
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema
from pydantic import TypeAdapter

from dl.models import build_model
from dl.tasks import Task, build_task
from jobs.config import Model, PipelineConfig
from pipelines.scaling import FittedScaler

ARTIFACT_NAME = "model"
WEIGHTS_ARTIFACT = "state_dict"
INPUT_COLUMN = "features"
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "pyspark", "pydantic", "pyyaml")

_MODEL_CONF = TypeAdapter(Model)

_MLFLOW_TYPES = {"int": "long", "float": "float", "boolean": "boolean", "array<float>": Array("float")}


def signature(output_columns: dict[str, str]) -> ModelSignature:
    """The pyfunc signature: raw features in, the task's columns out.

    Input as array<double>: MLflow refuses float64 (JSON, Python lists) into array<float>, while float32
    arrays (what Spark/Parquet give) widen to double safely.
    """
    return ModelSignature(
        inputs=Schema([ColSpec(Array("double"), INPUT_COLUMN)]),
        outputs=Schema([ColSpec(_MLFLOW_TYPES[kind], name) for name, kind in output_columns.items()]),
    )


SIGNATURE = signature({"prediction": "int", "probability": "array<float>"})  # classifiers


class ServingModel(mlflow.pyfunc.PythonModel):
    """Scaler + network as one pyfunc; `predict_arrays` is the NumPy fast path the Spark scorer uses."""

    def __init__(self, model_conf: dict, feature_shape, classes, scaler: dict, batch_size: int = 1024,
                 task_state: dict | None = None):
        # Plain data only: this object is pickled with the model; the network is built in load_context.
        self.model_conf = dict(model_conf)
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.classes = list(classes)
        self.scaler_state = dict(scaler)
        self.batch_size = int(batch_size)
        self.task_state = dict(task_state or {})  # calibrated in training, e.g. {"threshold": 0.8}
        self._network: torch.nn.Module | None = None
        self._device = torch.device("cpu")
        self._fitted_scaler: FittedScaler | None = None
        self._task: Task | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_network": None, "_device": "cpu", "_fitted_scaler": None, "_task": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._device = torch.device(state.get("_device", "cpu"))

    @property
    def task(self) -> Task:
        return build_task(_MODEL_CONF.validate_python(self.model_conf), self.classes)

    @property
    def output_columns(self) -> dict[str, str]:
        """Output column name -> type (int, float, boolean, array<float>)."""
        return self.task.output_columns

    @property
    def num_features(self) -> int:
        return math.prod(self.feature_shape)

    @property
    def scaler(self) -> FittedScaler:
        return FittedScaler.from_dict(self.scaler_state)

    def load_context(self, context) -> None:
        self.load_weights(context.artifacts[WEIGHTS_ARTIFACT])

    def load_weights(self, path: str | Path) -> None:
        """Rebuild the network from the stored config and load the weights-only state dict into it."""
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._task = self.task
        network = build_model(_MODEL_CONF.validate_python(self.model_conf), self.feature_shape, self._task.num_outputs)
        state = torch.load(path, map_location=self._device, weights_only=True)
        network.load_state_dict(state)
        self._network = network.to(self._device).eval()
        self._fitted_scaler = self.scaler

    def predict_columns(self, raw: np.ndarray, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Raw features [N, D] -> the task's output columns (`output_columns`), one NumPy array each."""
        if self._network is None:
            raise RuntimeError("the network is not loaded: load the model with mlflow.pyfunc.load_model")
        raw = np.asarray(raw)
        if raw.ndim != 2 or raw.shape[1] != self.num_features:
            raise ValueError(f"expected raw features of shape [N, {self.num_features}], got {list(raw.shape)}")
        step = batch_size or self.batch_size
        parts: list[dict[str, np.ndarray]] = []
        with torch.inference_mode():
            for start in range(0, raw.shape[0], step):
                scaled = torch.from_numpy(self._fitted_scaler.apply(raw[start : start + step])).to(self._device)
                parts.append(self._task.serve(self._network(scaled), scaled, self.task_state))
        if not parts:  # no rows: empty columns of the right kinds
            scaled = torch.zeros(1, self.num_features, device=self._device)
            with torch.inference_mode():
                parts = [{k: v[:0] for k, v in self._task.serve(self._network.eval()(scaled), scaled,
                                                                 self.task_state).items()}]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def predict_arrays(self, raw: np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Classifiers: raw features [N, D] -> (prediction int64 [N], probability float32 [N, K])."""
        columns = self.predict_columns(raw, batch_size)
        return columns["prediction"], columns["probability"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """DataFrame with `features` (raw C*H*W values per row) -> the task's columns (`output_columns`)."""
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"model input needs a '{INPUT_COLUMN}' column, got {list(model_input.columns)}")
        columns = self.predict_columns(self._stack(model_input[INPUT_COLUMN]))
        return pd.DataFrame({name: list(values) if values.ndim > 1 else values for name, values in columns.items()},
                            index=model_input.index)

    def _stack(self, column: pd.Series) -> np.ndarray:
        """One [N, D] array from a column of per-row sequences; a null or wrong-length row is named."""
        rows = []
        for index, value in column.items():
            if value is None or (np.ndim(value) == 0 and pd.isna(value)):
                raise ValueError(f"row {index!r}: '{INPUT_COLUMN}' is null")
            row = np.asarray(value, dtype=np.float64)
            if row.shape != (self.num_features,):
                raise ValueError(f"row {index!r}: '{INPUT_COLUMN}' has {row.size} values, expected {self.num_features}")
            rows.append(row)
        return np.stack(rows) if rows else np.empty((0, self.num_features))


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside a DistributedDataParallel wrapper (or the module itself)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


def log_and_register(network: torch.nn.Module, cfg: PipelineConfig, manifest: dict,
                     task_state: dict | None = None) -> ModelVersion:
    """Log the pyfunc (scaler + weights + calibrated task state) in the active MLflow run; register a new version."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register must be called inside an active MLflow run")
    serving = ServingModel(
        cfg.model.model_dump(mode="json"),
        manifest["feature_shape"],
        manifest["classes"],
        manifest["preprocessing"]["scaler"],
        batch_size=cfg.score.batch_size,
        task_state=task_state,
    )
    example = pd.DataFrame({INPUT_COLUMN: [np.zeros(serving.num_features, dtype=np.float32).tolist()] * 2})
    with tempfile.TemporaryDirectory(prefix="dlpipe-serving-") as tmp:
        weights = Path(tmp) / "state_dict.pt"
        torch.save({key: value.detach().cpu() for key, value in _unwrap(network).state_dict().items()}, weights)
        serving.load_weights(weights)  # fail here, not at scoring time, if weights and config disagree
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME,
            python_model=serving,
            artifacts={WEIGHTS_ARTIFACT: str(weights)},
            signature=signature(serving.output_columns),
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=cfg.registered_model_name,
            metadata={"feature_shape": list(serving.feature_shape), "classes": serving.classes,
                      "task": serving.task.kind, "outputs": serving.output_columns, **serving.task_state},
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    content_hash = manifest.get("source", {}).get("content_hash")
    if content_hash:
        client.set_model_version_tag(cfg.registered_model_name, version, "dataset_content_hash", content_hash)
    return client.get_model_version(cfg.registered_model_name, version)


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


def resolve_model_version(model_uri: str, client: MlflowClient | None = None) -> ModelVersion:
    """The registry version behind `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@alias`."""
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ValueError(f"model uri {model_uri!r}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@alias")
    client = client or MlflowClient()
    name, version, alias = match["name"], match["version"], match["alias"]
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"model uri {model_uri!r}: registered model '{name}' has no versions")
        return max(versions, key=lambda v: int(v.version))
    if not version.isdigit():
        raise ValueError(f"model uri {model_uri!r}: version must be a number or 'latest'")
    return client.get_model_version(name, version)


def load_scoring_model(model_uri: str) -> tuple[ServingModel, str, str, str]:
    """Resolve `model_uri` to one registry version and load it: (python_model, name, version, run_id)."""
    version = resolve_model_version(model_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    python_model = pyfunc.unwrap_python_model()
    if not isinstance(python_model, ServingModel):
        raise TypeError(f"{model_uri} is not a dlpipe serving model (got {type(python_model).__name__})")
    return python_model, version.name, str(version.version), version.run_id
