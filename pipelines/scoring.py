"""Spark batch scoring: a registered model applied to Parquet, Arrow batch by Arrow batch.

The driver resolves the model URI to one registry version, so every executor scores with the same
model even if `latest` or an alias moves mid-job, and reads from the model's metadata what it takes (raw
features or raw text, and from which column) and what it returns. Each Python worker loads that version once and
reads Arrow's flat list values as an [N, D] array without touching rows one by one (text: the strings).
"""
from __future__ import annotations

import functools
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from mlflow.models import Model
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import ArrayType, BooleanType, FloatType, IntegerType, StringType, StructField, StructType

from dl.registry import resolve_model_version
from pipelines.atomic import atomic_directory
from pipelines.errors import DataError
from pipelines.input_schema import KEY_TYPES, LABEL_TYPES, NUMERIC_ARRAY_TYPES, TARGET_TYPES, check_columns
from pipelines.spark_progress import spark_step

_BAD_ROW = "dlpipe-bad-feature-row:"
_MODELS: dict[tuple[str, str, str, str], tuple] = {}  # per Python worker: (tracking, registry, uri, device) -> model
# The serving model's output columns by type name (dl/tasks.py): Spark and Arrow types.
_SPARK_TYPES = {"int": IntegerType(), "float": FloatType(), "boolean": BooleanType(), "array<float>": ArrayType(FloatType()),
                "string": StringType()}
_ARROW_TYPES = {"int": pa.int32(), "float": pa.float32(), "boolean": pa.bool_()}
_INPUT_TYPES = {"features": NUMERIC_ARRAY_TYPES, "text": ("string",)}  # model input kind -> accepted Spark types


class BadFeatureRow(DataError):
    """An input row whose feature array is null, has null values, or has the wrong length."""


def _cached_model(tracking_uri: str, registry_uri: str, model_uri: str, device: str) -> tuple:
    """The worker's loaded model for `model_uri` on `device`, loading it on first use only."""
    key = (tracking_uri, registry_uri, model_uri, device)
    if key not in _MODELS:
        from dl.serving import load_scoring_model  # torch is imported in workers only when they score

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        _MODELS[key] = load_scoring_model(model_uri, device)
    return _MODELS[key]


def _limit_threads_to_task() -> None:
    """Give torch the task's cores (`spark.task.cpus`), not the machine's: executors run tasks side by side."""
    import torch

    context = TaskContext.get()
    if context is not None:
        torch.set_num_threads(max(1, context.cpus()))


def feature_matrix(features: pa.Array, ids: pa.Array, width: int, column: str) -> np.ndarray:
    """[N, width] view of a list<float> Arrow column; a null or wrong-length row raises naming its id."""
    if isinstance(features, pa.ChunkedArray):
        features = features.combine_chunks()
    bad = pc.invert(pc.fill_null(pc.equal(pc.list_value_length(features), width), False))
    if pc.any(bad).as_py():
        row = pc.indices_nonzero(bad)[0].as_py()
        value = features[row]
        what = "is null" if not value.is_valid else f"has {len(value)} values, expected {width}"
        raise BadFeatureRow(f"{_BAD_ROW} row id={ids[row].as_py()!r}: '{column}' {what}")
    values = features.flatten()  # respects the slice offset: only this batch's values, in row order
    if values.null_count:
        row = pc.indices_nonzero(pc.is_null(values))[0].as_py() // width
        raise BadFeatureRow(f"{_BAD_ROW} row id={ids[row].as_py()!r}: '{column}' holds null values")
    return values.to_numpy(zero_copy_only=False).reshape(len(features), width)


def _repeat(value: str, length: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(length, dtype=np.int64)))


def _arrow_column(values: np.ndarray, kind: str, nulls: np.ndarray | None = None) -> pa.Array:
    """One output column as Arrow: a flat array, or a list<float> array built from [N, K] values without row loops;
    rows in the `nulls` mask are null."""
    if kind == "string":
        return pa.array(values, pa.string())
    if kind == "array<float>":
        rows, width = values.shape
        offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
        mask = None if nulls is None else pa.array(nulls, pa.bool_())
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.float32, copy=False)), mask=mask)
    return pa.array(values.astype(_ARROW_TYPES[kind].to_pandas_dtype(), copy=False), _ARROW_TYPES[kind], mask=nulls)


def _model_inputs(kind: str, column: pa.Array, ids: pa.Array, name: str, width: int):
    """One Arrow batch's model input: [N, width] raw features, or the texts (None where null)."""
    if kind == "text":
        return column.to_pylist()
    return feature_matrix(column, ids, width, name)


@dataclass(frozen=True)
class ModelContract:
    """What a registered dlpipe model takes and gives, as its MLmodel metadata declares it."""

    input_kind: str  # `features` (a numeric array) or `text`
    input_column: str  # where the input is by default: `raw_features` or `text`
    outputs: dict[str, str]  # output column -> type
    task: str  # classification, regression, anomaly or clustering
    classes: list[str]  # the training dataset's classes: a `prediction` or `label` index is into these


def model_contract(model_uri: str) -> ModelContract:
    """The `ModelContract` of a registered dlpipe model (one read of its MLmodel file)."""
    with tempfile.TemporaryDirectory(prefix="dlpipe-mlmodel-") as tmp:  # mlflow's own download would stay in /tmp
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/MLmodel", dst_path=tmp)
        metadata = Model.load(mlmodel).metadata or {}
    missing = [key for key in ("input", "outputs", "task", "classes") if key not in metadata]
    if missing:
        raise ValueError(f"{model_uri} declares no '{missing[0]}' in its metadata: it was not logged by "
                         f"dl.serving.log_and_register")
    return ModelContract(metadata["input"]["kind"], metadata["input"]["column"], dict(metadata["outputs"]),
                         metadata["task"], list(metadata["classes"]))


def _score_batches(
    batches: Iterator[pa.RecordBatch],
    *,
    model_uri: str,
    tracking_uri: str,
    registry_uri: str,
    input_col: str,
    input_kind: str,
    keep: tuple[str, ...],
    outputs: dict[str, str],
    batch_size: int,
    device: str,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: raw inputs in, `keep` columns + the model's `outputs` and model lineage out."""
    from dl.serving import unscored_rows

    model, name, version, run_id = _cached_model(tracking_uri, registry_uri, model_uri, device)
    _limit_threads_to_task()
    for batch in batches:
        rows = batch.num_rows
        inputs = _model_inputs(input_kind, batch.column(input_col), batch.column("id"), input_col, model.num_features)
        scored = model.predict_columns(inputs, batch_size=batch_size)
        nulls = unscored_rows(scored)
        columns = [batch.column(c) for c in keep] + [
            _arrow_column(scored[o], kind, None if kind == "string" else nulls) for o, kind in outputs.items()
        ] + [
            _repeat(name, rows),
            _repeat(version, rows),
            _repeat(run_id or "", rows),
        ]
        names = list(keep) + list(outputs) + ["model_name", "model_version", "model_run_id"]
        yield pa.RecordBatch.from_arrays(columns, names=names)


def _one_line_reason(exc: Exception) -> str | None:
    """The bad-row message a worker raised, dug out of Spark's wrapped traceback."""
    found = re.search(re.escape(_BAD_ROW) + r"\s*(.*)", str(exc))
    return found.group(1).strip() if found else None


@spark_step("score")
def score_parquet(
    spark: SparkSession,
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    input_col: str | None = None,
    batch_size: int = 1024,
    device: str = "auto",
) -> dict:
    """Score a Parquet dataset with a registered model; write predictions atomically; return counts.

    The model's metadata says what it takes: raw features (default column `raw_features`) or raw text (`text`);
    `input_col` names another column holding it. `device` is where workers run the model: `auto` (CUDA on
    executors that have it, else CPU), `cpu` or `cuda`.
    """
    version = resolve_model_version(model_uri)
    pinned = f"models:/{version.name}/{version.version}"
    contract = model_contract(pinned)
    input_kind, input_col, outputs = contract.input_kind, input_col or contract.input_column, contract.outputs
    source: DataFrame = spark.read.parquet(str(input_path))
    check_columns(source.schema, {"id": KEY_TYPES, input_col: _INPUT_TYPES[input_kind]}, input_path,
                  optional={"label": LABEL_TYPES, "target": TARGET_TYPES})
    keep = ("id", *(c for c in ("label", "target") if c in source.columns))  # truth columns, for evaluation
    schema = StructType(
        [source.schema[c] for c in keep]
        + [StructField(output, _SPARK_TYPES[kind]) for output, kind in outputs.items()]
        + [
            StructField("model_name", StringType()),
            StructField("model_version", StringType()),
            StructField("model_run_id", StringType()),
        ]
    )
    score = functools.partial(
        _score_batches,
        model_uri=pinned,
        tracking_uri=mlflow.get_tracking_uri(),
        registry_uri=mlflow.get_registry_uri(),
        input_col=input_col,
        input_kind=input_kind,
        keep=keep,
        outputs=outputs,
        batch_size=batch_size,
        device=device,
    )
    rows_in = source.count()
    with atomic_directory(Path(output_path)) as staging:
        try:
            source.select(*keep, input_col).mapInArrow(score, schema).write.parquet(str(staging))
        except Exception as exc:
            reason = _one_line_reason(exc)
            if reason:
                raise BadFeatureRow(f"{input_path}: {reason}") from None
            raise
        rows_out = spark.read.parquet(str(staging)).count()
        if rows_out != rows_in:
            raise RuntimeError(f"scoring {input_path}: {rows_in} rows in but {rows_out} predictions out")
    return {"rows_in": rows_in, "rows_out": rows_out, "model_name": version.name, "model_version": str(version.version)}
