"""The registered pyfunc and the Spark scorer against a real sqlite MLflow registry and real Spark."""
from __future__ import annotations

import os
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from dl.models import build_model
from dl.serving import ServingModel, load_scoring_model, log_and_register, resolve_model_version
from jobs.config import PipelineConfig
from jobs.score import run_score
from pipelines.scaling import FittedScaler
from pipelines.scoring import BadFeatureRow, feature_matrix, score_parquet

SHAPE = (1, 8, 8)
WIDTH = 64
CLASSES = [str(i) for i in range(10)]
NAME = "digits-cnn"


def _manifest(scaler: FittedScaler) -> dict:
    """The parts of the dataset manifest the serving model reads, shaped as the dataset contract says."""
    return {
        "pipeline": "scoring-test",
        "source": {"kind": "image_folder", "path": "unused", "files": 0, "content_hash": "0" * 64},
        "feature_shape": list(SHAPE),
        "classes": CLASSES,
        "preprocessing": {"image_size": [8, 8], "channels": 1, "scaler": scaler.to_dict()},
    }


def _network(cfg: PipelineConfig, scaler: FittedScaler, seed: int) -> torch.nn.Module:
    """A small CNN whose batch-norm running stats moved off their defaults, so eval mode matters."""
    torch.manual_seed(seed)
    network = build_model(cfg.model, SHAPE, len(CLASSES))
    warmup = np.random.default_rng(seed).integers(0, 17, (256, WIDTH)).astype(np.float32)
    network.train()
    with torch.no_grad():
        for chunk in np.split(warmup, 4):
            network(torch.from_numpy(scaler.apply(chunk)))
    return network.eval()


def _expected(network: torch.nn.Module, scaler: FittedScaler, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        probability = torch.softmax(network(torch.from_numpy(scaler.apply(raw))), dim=1).numpy()
    return probability.argmax(axis=1), probability


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two registered versions of a small CNN in a sqlite-backed registry; version 1 is `champion`."""
    root = tmp_path_factory.mktemp("scoring")
    cfg = PipelineConfig.model_validate(
        {
            "name": "scoring-test",
            "run_dir": str(root / "run"),
            "source": {"kind": "image_folder", "path": str(root / "images")},
            "model": {"kind": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.25},
            "spark": {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4},  # as conftest's
            "mlflow": {"registered_model": NAME},
            "score": {"batch_size": 64},
        }
    )
    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    experiment = mlflow.create_experiment("scoring-test", artifact_location=cfg.artifact_location)
    scaler = FittedScaler("zscore", "channel", WIDTH, (6.5,), (5.25,))
    networks, versions = [], []
    for seed in (1, 2):
        networks.append(_network(cfg, scaler, seed))
        with mlflow.start_run(experiment_id=experiment):
            versions.append(log_and_register(networks[-1], cfg, _manifest(scaler)))
    MlflowClient().set_registered_model_alias(NAME, "champion", str(versions[0].version))
    yield SimpleNamespace(cfg=cfg, scaler=scaler, networks=networks, versions=versions, root=root)
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])
    if previous[2] is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def _raw(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (rows, WIDTH)).astype(np.float32)


def _write_dataset(path, raw: np.ndarray, files: int, ids: list[str] | None = None, rows_list=None) -> list[str]:
    """Parquet in `files` files with the dataset contract's columns; `rows_list` overrides raw_features."""
    ids = ids or [f"{i % 10}/{i:04d}.png" for i in range(len(raw))]
    values = rows_list if rows_list is not None else [row for row in raw]
    path.mkdir(parents=True)
    for part, index in enumerate(np.array_split(np.arange(len(ids)), files)):
        table = pa.table(
            {
                "id": pa.array([ids[i] for i in index], pa.string()),
                "label": pa.array((index % 10).astype(np.int32)),
                "raw_features": pa.array([values[i] for i in index], pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, path / f"part-{part:05d}.parquet", row_group_size=40)
    return ids


def test_registered_versions_and_uri_forms(registry):
    first, second = registry.versions
    assert (first.name, str(first.version), str(second.version)) == (NAME, "1", "2")
    assert first.run_id and first.run_id != second.run_id
    assert first.tags.get("dataset_content_hash") == "0" * 64
    assert str(resolve_model_version(f"models:/{NAME}/latest").version) == "2"
    assert str(resolve_model_version(f"models:/{NAME}/1").version) == "1"
    model, name, version, run_id = load_scoring_model(f"models:/{NAME}@champion")
    assert isinstance(model, ServingModel)
    assert (name, version, run_id) == (NAME, "1", first.run_id)
    with pytest.raises(ValueError, match="expected models:/NAME"):
        resolve_model_version("runs:/abc/model")


def test_pyfunc_matches_torch_on_scaled_raw_features(registry):
    raw = _raw(50, seed=3)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    out = model.predict(pd.DataFrame({"features": list(raw)}))
    expected_class, expected_probability = _expected(registry.networks[0], registry.scaler, raw)
    assert out["prediction"].dtype == np.int64
    np.testing.assert_array_equal(out["prediction"].to_numpy(), expected_class)
    np.testing.assert_allclose(np.stack(out["probability"]), expected_probability, rtol=1e-5, atol=1e-6)
    # Python lists of floats (as JSON gives them) are accepted too, and version 2 is a different model.
    as_lists = mlflow.pyfunc.load_model(f"models:/{NAME}/2").predict(pd.DataFrame({"features": raw.tolist()}))
    np.testing.assert_array_equal(as_lists["prediction"].to_numpy(), _expected(registry.networks[1], registry.scaler, raw)[0])


def test_pyfunc_names_a_wrong_length_row(registry):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1").unwrap_python_model()
    rows = pd.Series([np.zeros(WIDTH), np.zeros(WIDTH - 1)], index=["a", "b"])
    with pytest.raises(ValueError, match="row 'b'.*63 values, expected 64"):
        model.predict(None, pd.DataFrame({"features": rows}))


def test_feature_matrix_reads_a_sliced_list_array_without_copying_rows():
    raw = _raw(12)
    column = pa.array(list(raw), pa.list_(pa.float32())).slice(3, 5)
    ids = pa.array([str(i) for i in range(12)]).slice(3, 5)
    np.testing.assert_array_equal(feature_matrix(column, ids, WIDTH, "raw_features"), raw[3:8])


def test_score_parquet_one_prediction_per_row_equal_to_torch(registry, spark, tmp_path):
    raw = _raw(300, seed=5)
    ids = _write_dataset(tmp_path / "input", raw, files=3)
    output = tmp_path / "predictions"
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "70")  # several Arrow batches per file
    try:
        result = score_parquet(spark, f"models:/{NAME}@champion", tmp_path / "input", output, batch_size=32)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert result == {"rows_in": 300, "rows_out": 300, "model_name": NAME, "model_version": "1"}
    predictions = pd.read_parquet(output).set_index("id").loc[ids]
    assert list(predictions.columns) == [
        "label", "prediction", "probability", "model_name", "model_version", "model_run_id"
    ]
    assert predictions.index.is_unique and len(predictions) == 300
    expected_class, expected_probability = _expected(registry.networks[0], registry.scaler, raw)
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected_class)
    np.testing.assert_allclose(np.stack(predictions["probability"]), expected_probability, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predictions["label"].to_numpy(), np.arange(300) % 10)
    assert set(predictions["model_name"]) == {NAME} and set(predictions["model_version"]) == {"1"}
    assert set(predictions["model_run_id"]) == {registry.versions[0].run_id}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".predictions")]  # no staging left behind


@pytest.mark.parametrize(
    "bad_row, reason", [(np.zeros(WIDTH - 1, np.float32), "has 63 values, expected 64"), (None, "is null")]
)
def test_score_parquet_names_a_bad_feature_row(registry, spark, tmp_path, bad_row, reason):
    raw = _raw(30)
    rows = [row for row in raw]
    rows[17] = bad_row
    ids = [f"row-{i}" for i in range(30)]
    _write_dataset(tmp_path / "input", raw, files=2, ids=ids, rows_list=rows)
    with pytest.raises(BadFeatureRow, match=f"row id='row-17': 'raw_features' {reason}"):
        score_parquet(spark, f"models:/{NAME}/1", tmp_path / "input", tmp_path / "predictions")
    assert not list(tmp_path.glob("*predictions*"))  # nothing half-written is visible


def test_run_score_defaults_to_the_latest_version(registry, spark):
    cfg = registry.cfg
    raw = _raw(40, seed=7)
    _write_dataset(cfg.score_input, raw, files=2)
    result = run_score(cfg)
    assert (result["rows_out"], result["model_version"], result["model_uri"]) == (40, "2", f"models:/{NAME}/latest")
    predictions = pd.read_parquet(cfg.score_output).sort_values("id")
    ids = [f"{i % 10}/{i:04d}.png" for i in range(40)]
    expected = pd.Series(_expected(registry.networks[1], registry.scaler, raw)[0], index=ids).sort_index()
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected.to_numpy())
