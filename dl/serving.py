"""The registered model: an MLflow pyfunc holding the fitted preprocessing and the network's weights.

It takes the *pre-normalization* inputs and applies the manifest's preprocessing itself: numeric features (what
the dataset stores in `raw_features`) through the `FittedScaler`, or raw text (the dataset's `text`) through the
same tokenizing and vocabulary as the ETL (`pipelines.text.TextEncoder`). It returns the task's columns
(dl/tasks.py): a class index and per-class probabilities, a regression value, or an anomaly score and the call at
the threshold calibrated in training. The network is rebuilt from the stored model config and a weights-only state
dict, never unpickled as a module.
"""
from __future__ import annotations

import math
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

from dl.models import build_model
from dl.registry import resolve_model_version
from dl.tasks import Task, build_task
from jobs.config import MODEL_CONF, PipelineConfig
from pipelines.scaling import FittedScaler
from pipelines.text import TextEncoder, empty_text_reason

ARTIFACT_NAME = "model"
WEIGHTS_ARTIFACT = "state_dict"
INPUT_COLUMN = "features"
TEXT_COLUMN = "text"
REASON_COLUMN = "reason"  # text models: why a row was not scored (its outputs are null); null when it was
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "pyspark", "pydantic", "pyyaml")


_MLFLOW_TYPES = {"int": "long", "float": "float", "boolean": "boolean", "array<float>": Array("float"),
                 "string": "string"}


def signature(output_columns: dict[str, str], input_spec: ColSpec | None = None) -> ModelSignature:
    """The pyfunc signature: raw inputs in (default: the raw feature array), the task's columns out."""
    return ModelSignature(
        inputs=Schema([input_spec or FeatureInput.spec]),
        outputs=Schema([ColSpec(_MLFLOW_TYPES[kind], name) for name, kind in output_columns.items()]),
    )


class FeatureInput:
    """Numeric models: pre-normalization feature vectors [N, D], scaled by the manifest's FittedScaler.

    The pyfunc column is array<double>: MLflow refuses float64 (JSON, Python lists) into array<float>, while float32
    arrays (what Spark/Parquet give) widen to double safely.
    """

    kind, column, dataset_column = "features", INPUT_COLUMN, "raw_features"
    spec = ColSpec(Array("double"), INPUT_COLUMN)
    extra_outputs: dict[str, str] = {}

    def __init__(self, scaler: FittedScaler, width: int):
        self.scaler, self.width = scaler, width

    def model_kwargs(self) -> dict:
        return {}

    def example(self) -> list:
        return [np.zeros(self.width, dtype=np.float32).tolist()] * 2

    def from_pandas(self, column: pd.Series) -> np.ndarray:
        """One [N, D] array from a column of per-row sequences; a null or wrong-length row is named."""
        rows = []
        for index, value in column.items():
            if value is None or (np.ndim(value) == 0 and pd.isna(value)):
                raise ValueError(f"row {index!r}: '{self.column}' is null")
            row = np.asarray(value, dtype=np.float64)
            if row.shape != (self.width,):
                raise ValueError(f"row {index!r}: '{self.column}' has {row.size} values, expected {self.width}")
            rows.append(row)
        return np.stack(rows) if rows else np.empty((0, self.width))

    def encode(self, raw: np.ndarray) -> tuple[np.ndarray, None]:
        """(scaled float32 [N, D], None: every row is scored)."""
        raw = np.asarray(raw)
        if raw.ndim != 2 or raw.shape[1] != self.width:
            raise ValueError(f"expected raw features of shape [N, {self.width}], got {list(raw.shape)}")
        return self.scaler.apply(raw), None


class TextInput:
    """Text models: raw strings, tokenized exactly as the Spark ETL did. A text without a single token (null, blank,
    punctuation only: what the ETL quarantines) is not scored; its outputs are null and `reason` says why."""

    kind, column, dataset_column = "text", TEXT_COLUMN, TEXT_COLUMN
    spec = ColSpec("string", TEXT_COLUMN)
    extra_outputs = {REASON_COLUMN: "string"}

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder

    def model_kwargs(self) -> dict:
        return {"vocab_size": len(self.encoder.vocabulary.tokens)}

    def example(self) -> list:
        return [" ".join(self.encoder.vocabulary.tokens[2:8]) or "example", "..."]

    def from_pandas(self, column: pd.Series) -> list[str | None]:
        return [value if isinstance(value, str) else None for value in column]

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int64 [N, max_length], reason per row: None where the text has tokens)."""
        ids, lengths = self.encoder.encode(texts)
        reasons = np.full(len(ids), None, dtype=object)
        reasons[lengths == 0] = empty_text_reason(TEXT_COLUMN)
        return ids, reasons


def unscored_rows(columns: dict[str, np.ndarray]) -> np.ndarray | None:
    """Mask of the rows whose output columns are null (they carry a `reason`); None when every row was scored."""
    if REASON_COLUMN not in columns:
        return None
    return np.array([reason is not None for reason in columns[REASON_COLUMN]], dtype=bool)


class ServingModel(mlflow.pyfunc.PythonModel):
    """Preprocessing + network as one pyfunc; `predict_columns` is the NumPy fast path the Spark scorer uses."""

    def __init__(self, model_conf: dict, feature_shape, classes, scaler: dict | None, batch_size: int = 1024,
                 task_state: dict | None = None, text: dict | None = None):
        # Plain data only: this object is pickled with the model; the network is built in load_context.
        # `scaler` (numeric inputs) or `text` (a text dataset's manifest preprocessing) says what the input is.
        self.model_conf = dict(model_conf)
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.classes = list(classes)
        self.scaler_state = dict(scaler) if scaler is not None else None
        self.text_state = dict(text) if text is not None else None
        self.batch_size = int(batch_size)
        self.task_state = dict(task_state or {})  # calibrated in training, e.g. {"threshold": 0.8}
        self._network: torch.nn.Module | None = None
        self._device = torch.device("cpu")
        self._inputs: FeatureInput | TextInput | None = None
        self._task: Task | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_network": None, "_device": "cpu", "_inputs": None, "_task": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._device = torch.device(state.get("_device", "cpu"))

    @property
    def task(self) -> Task:
        return build_task(MODEL_CONF.validate_python(self.model_conf), self.classes)

    @property
    def inputs(self) -> FeatureInput | TextInput:
        """What the model takes and how it is preprocessed: raw features (scaled) or raw text (tokenized)."""
        if self.text_state is not None:
            return TextInput(TextEncoder.from_preprocessing(self.text_state))
        return FeatureInput(FittedScaler.from_dict(self.scaler_state), self.num_features)

    @property
    def output_columns(self) -> dict[str, str]:
        """Output column name -> type (int, float, boolean, array<float>, string)."""
        return {**self.task.output_columns, **self.inputs.extra_outputs}

    @property
    def num_features(self) -> int:
        return math.prod(self.feature_shape)

    def load_context(self, context) -> None:
        self.load_weights(context.artifacts[WEIGHTS_ARTIFACT])

    def load_weights(self, path: str | Path, device: str = "auto") -> None:
        """Rebuild the network from the stored config and load the weights-only state dict into it, on `device`
        (`resolve_device`): weights saved from CUDA load on a CPU-only machine."""
        self._device = resolve_device(device)
        self._task, self._inputs = self.task, self.inputs
        network = build_model(MODEL_CONF.validate_python(self.model_conf), self.feature_shape, self._task.num_outputs,
                              **self._inputs.model_kwargs())
        state = torch.load(path, map_location=self._device, weights_only=True)
        network.load_state_dict(state)
        self._network = network.to(self._device).eval()

    def use_device(self, device: torch.device) -> None:
        """Run the loaded network on `device` from now on."""
        self._device = device
        self._network.to(device)

    def predict_columns(self, raw, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Raw inputs (features [N, D], or N texts) -> the output columns (`output_columns`), one NumPy array each.

        A row the model cannot score (text models: no token) has placeholder outputs and a `reason`.
        """
        if self._network is None:
            raise RuntimeError("the network is not loaded: load the model with mlflow.pyfunc.load_model")
        step = batch_size or self.batch_size
        parts = [self._serve(*self._inputs.encode(raw[start : start + step])) for start in range(0, len(raw), step)]
        if not parts:  # no rows: empty columns of the right kinds
            parts = [self._serve(*self._inputs.encode(raw))]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _serve(self, encoded: np.ndarray, reasons: np.ndarray | None) -> dict[str, np.ndarray]:
        """The output columns of one encoded batch; rows with a reason skip the network and get zero placeholders."""
        if reasons is None:
            return self._network_columns(encoded) if len(encoded) else self._placeholders(0)
        columns = self._placeholders(len(encoded))
        scored = np.flatnonzero(reasons == None)  # noqa: E711 (elementwise over an object array)
        if len(scored):
            for name, values in self._network_columns(encoded[scored]).items():
                columns[name][scored] = values
        return {**columns, REASON_COLUMN: reasons}

    def _network_columns(self, encoded: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            inputs = torch.from_numpy(encoded).to(self._device)
            return self._task.serve(self._network(inputs), inputs, self.task_state)

    def _placeholders(self, rows: int) -> dict[str, np.ndarray]:
        """Task columns of `rows` rows, of the dtypes `Task.serve` returns: zeros, or None for text."""
        def placeholder(kind: str) -> np.ndarray:
            if kind == "string":
                return np.full(rows, None, object)
            if kind == "array<float>":
                return np.zeros((rows, self._task.num_outputs), np.float32)
            return np.zeros(rows, {"int": np.int64, "float": np.float32, "boolean": np.bool_}[kind])

        return {name: placeholder(kind) for name, kind in self._task.output_columns.items()}

    def predict_arrays(self, raw: np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Classifiers: raw features [N, D] -> (prediction int64 [N], probability float32 [N, K])."""
        columns = self.predict_columns(raw, batch_size)
        return columns["prediction"], columns["probability"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """DataFrame with the raw input column (`features`: raw C*H*W values per row; `text`: strings) -> the output
        columns (`output_columns`); an unscored row's outputs are null (nullable dtypes) and its `reason` is set."""
        inputs = self._inputs or self.inputs
        if inputs.column not in model_input.columns:
            raise ValueError(f"model input needs a '{inputs.column}' column, got {list(model_input.columns)}")
        columns = self.predict_columns(inputs.from_pandas(model_input[inputs.column]))
        unscored = unscored_rows(columns)
        return pd.DataFrame({name: _pandas_column(values, None if name == REASON_COLUMN else unscored)
                             for name, values in columns.items()}, index=model_input.index)


def _pandas_column(values: np.ndarray, unscored: np.ndarray | None):
    """One output column for pandas: rows of [N, K] arrays as lists; unscored rows null (None / NA)."""
    if values.ndim > 1:
        rows = list(values)
        return rows if unscored is None else [None if skip else row for row, skip in zip(rows, unscored)]
    if unscored is None:
        return values
    return pd.Series(values).convert_dtypes().mask(unscored).array


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside a DistributedDataParallel wrapper (or the module itself)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


def log_and_register(network: torch.nn.Module, cfg: PipelineConfig, manifest: dict,
                     task_state: dict | None = None) -> ModelVersion:
    """Log the pyfunc (preprocessing + weights + calibrated task state) in the active MLflow run; register a new
    version."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register must be called inside an active MLflow run")
    preprocessing = manifest["preprocessing"]
    text = preprocessing if manifest["source"].get("kind") == "text" else None
    serving = ServingModel(
        cfg.model.model_dump(mode="json"),
        manifest["feature_shape"],
        manifest["classes"],
        None if text else preprocessing["scaler"],
        batch_size=cfg.score.batch_size,
        task_state=task_state,
        text=text,
    )
    inputs = serving.inputs
    example = pd.DataFrame({inputs.column: inputs.example()})
    with tempfile.TemporaryDirectory(prefix="dlpipe-serving-") as tmp:
        weights = Path(tmp) / "state_dict.pt"
        torch.save({key: value.detach().cpu() for key, value in _unwrap(network).state_dict().items()}, weights)
        serving.load_weights(weights)  # fail here, not at scoring time, if weights and config disagree
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME,
            python_model=serving,
            artifacts={WEIGHTS_ARTIFACT: str(weights)},
            signature=signature(serving.output_columns, inputs.spec),
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=cfg.registered_model_name,
            metadata={"feature_shape": list(serving.feature_shape), "classes": serving.classes,
                      "task": serving.task.kind, "outputs": serving.output_columns,
                      "input": {"kind": inputs.kind, "column": inputs.dataset_column}, **serving.task_state},
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    content_hash = manifest.get("source", {}).get("content_hash")
    if content_hash:
        client.set_model_version_tag(cfg.registered_model_name, version, "dataset_content_hash", content_hash)
    return client.get_model_version(cfg.registered_model_name, version)


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA when this process has a GPU, else CPU; `cpu`; or `cuda`, which must be there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("score.device is cuda but this process sees no CUDA device (use auto or cpu)")
    return torch.device(device)


def load_scoring_model(model_uri: str, device: str = "auto") -> tuple[ServingModel, str, str, str]:
    """Resolve `model_uri` to one registry version and load it on `device`: (python_model, name, version, run_id)."""
    target = resolve_device(device)  # before loading: a missing GPU fails at once
    version = resolve_model_version(model_uri)
    with tempfile.TemporaryDirectory(prefix="dlpipe-model-") as tmp:  # the weights are in memory once loaded
        pyfunc = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}", dst_path=tmp)
    python_model = pyfunc.unwrap_python_model()
    if not isinstance(python_model, ServingModel):
        raise TypeError(f"{model_uri} is not a dlpipe serving model (got {type(python_model).__name__})")
    python_model.use_device(target)
    return python_model, version.name, str(version.version), version.run_id
