"""The registered pyfunc and the Spark scorer against a real sqlite MLflow registry and real Spark."""
from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from mlflow import MlflowClient

from dl.registry import ModelNotFound, resolve_model_version
from dl.serving import ServingModel, load_scoring_model
from jobs.config import ConfigError
from jobs.score import run_score
from pipelines.errors import DataError
from pipelines.input_schema import check_parquet_input
from pipelines.scoring import BadFeatureRow, feature_matrix, score_parquet
from registry_helpers import CLASSES, WIDTH, network, pipeline_config, register, scaler, tracking
from registry_helpers import expected as _expected, raw_rows as _raw, write_dataset as _write_dataset

NAME = "digits-cnn"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two registered versions of a small CNN in a sqlite-backed registry; version 1 is `champion`."""
    root = tmp_path_factory.mktemp("scoring")
    cfg = pipeline_config(root, "scoring-test", NAME)
    with tracking(cfg.tracking_uri):
        experiment = mlflow.create_experiment("scoring-test", artifact_location=cfg.artifact_location)
        fitted = scaler()
        networks = [network(cfg, fitted, seed) for seed in (1, 2)]
        versions = [register(cfg, net, fitted, experiment) for net in networks]
        MlflowClient().set_registered_model_alias(NAME, "champion", str(versions[0].version))
        yield SimpleNamespace(cfg=cfg, scaler=fitted, networks=networks, versions=versions, root=root)


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


@pytest.mark.parametrize("uri, message", [
    (f"models:/{NAME}@nope", f"model '{NAME}' has no alias 'nope'; its aliases: champion -> 1"),
    (f"models:/{NAME}/9", f"model '{NAME}' has no version 9; its versions: 1, 2"),
    ("models:/other@champion", "the registry has no model named 'other'"),
    ("models:/unversioned/latest", "model 'unversioned' has no versions"),
    ("models:/unversioned@champion",
     "model 'unversioned' has no alias 'champion' (`dlpipe promote` sets it); its aliases: none"),
], ids=["alias", "version", "model", "latest-of-none", "champion-of-none"])
def test_a_model_version_or_alias_the_registry_lacks_is_named_with_what_it_has(registry, uri, message):
    client = MlflowClient()
    if not client.search_registered_models("name = 'unversioned'"):
        client.create_registered_model("unversioned")
    with pytest.raises(ModelNotFound) as raised:
        resolve_model_version(uri)
    assert str(raised.value) == f"{uri}: {message}"


@pytest.mark.parametrize("made", ["nothing", "an empty folder", "a folder of markers"])
def test_run_score_names_an_input_without_parquet_before_it_starts(registry, tmp_path, made):
    cfg, missing = registry.cfg, tmp_path / "input"
    if made != "nothing":
        (missing / "split=test").mkdir(parents=True)
    if made == "a folder of markers":  # what Spark leaves and skips: no data file among them
        for name in ("_SUCCESS", ".part-0.parquet.crc", "_temporary/part-0.parquet"):
            (missing / name).parent.mkdir(exist_ok=True)
            (missing / name).write_bytes(b"")
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(DataError) as raised:
        run_score(cfg, input_path=missing, output_path=tmp_path / "predictions")
    what = "does not exist" if made == "nothing" else "holds no Parquet file"
    assert str(raised.value) == f"scoring input {missing} {what}"
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before  # no MLflow run was started
    assert not list(tmp_path.glob("*predictions*"))


@pytest.mark.parametrize("input_path, output, what", [
    ("data/split=test", "data/split=test", "replace the scoring input"),
    ("data/split=*", "data", "replace the scoring input"),
    ("data/split=test", "data/split=test/predictions", "be written inside the scoring input"),
    ("data/split=test", "run/dataset/predictions", "be written inside the dataset"),
    ("data/split=test", "run/quarantine", "replace the quarantine"),
    ("data/split=test", "images", "replace source.path"),
    ("data/split=test", "run", "replace the run folder"),
])
def test_a_scoring_output_over_an_input_or_the_pipelines_own_folders_is_refused(registry, input_path, output, what):
    cfg, root = registry.cfg, registry.root  # run_dir root/run, source.path root/images
    data = root / "data" / "split=test"
    if not data.exists():
        _write_dataset(data, _raw(4), files=1)
    before = sorted(p.name for p in data.iterdir())
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ConfigError) as raised:
        run_score(cfg, input_path=root / input_path, output_path=root / output)
    assert str(raised.value).startswith(f"scoring output {(root / output).resolve()} would {what} ")
    assert str(raised.value).endswith("; choose another --output (or score.output)")
    assert sorted(p.name for p in data.iterdir()) == before
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before  # refused before any run started


def test_a_scoring_input_may_be_a_glob_as_spark_reads_it(tmp_path):
    _write_dataset(tmp_path / "dataset" / "split=test", _raw(4), files=1)
    (tmp_path / "dataset" / "split=val").mkdir()
    check_parquet_input(tmp_path / "dataset" / "split=*", "scoring input")  # one of the folders it matches has rows
    check_parquet_input(tmp_path / "dataset" / "split={test,val}", "scoring input")  # left to Spark
    with pytest.raises(DataError, match=r"^scoring input .*/split=v\* holds no Parquet file$"):
        check_parquet_input(tmp_path / "dataset" / "split=v*", "scoring input")
    with pytest.raises(DataError, match=r"^scoring input .*/split=x\* matches no file or folder$"):
        check_parquet_input(tmp_path / "dataset" / "split=x*", "scoring input")


@pytest.mark.parametrize("broken", ["part-0.parquet", "part-9.parquet"])  # read for the schema / by a task only
def test_run_score_names_an_input_file_that_is_not_parquet(registry, spark, tmp_path, broken):
    _write_dataset(tmp_path / "input", _raw(20), files=2)
    (tmp_path / "input" / broken).write_bytes(b"not parquet at all, " * 8)
    with pytest.raises(DataError, match=rf"^Parquet file {tmp_path / 'input' / broken}: not a Parquet file \(Expected "
                                        r"magic number at tail, but found \[.*\]\)$"):
        run_score(registry.cfg, input_path=tmp_path / "input", output_path=tmp_path / "predictions")
    assert not (tmp_path / "predictions").exists()


def test_pyfunc_matches_torch_on_scaled_raw_features(registry):
    raw = _raw(50, seed=3)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    out = model.predict(pd.DataFrame({"features": list(raw)}))
    expected_class, expected_probability = _expected(registry.networks[0], registry.scaler, raw)
    assert out["prediction"].dtype == np.int64
    np.testing.assert_array_equal(out["prediction"].to_numpy(), expected_class)
    assert out["predicted_class"].tolist() == [CLASSES[i] for i in expected_class]
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
        "label", "predicted_class", "prediction", "probability", "model_name", "model_version", "model_run_id"
    ]
    assert predictions.index.is_unique and len(predictions) == 300
    expected_class, expected_probability = _expected(registry.networks[0], registry.scaler, raw)
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected_class)
    assert predictions["predicted_class"].tolist() == [CLASSES[i] for i in expected_class]
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


def test_run_score_defaults_to_the_champion(registry, spark):
    cfg = registry.cfg
    raw = _raw(40, seed=7)
    _write_dataset(cfg.score_input, raw, files=2)
    result = run_score(cfg)
    assert (result["rows_out"], result["model_version"], result["model_uri"]) == (40, "1", f"models:/{NAME}@champion")
    predictions = pd.read_parquet(cfg.score_output).sort_values("id")
    ids = [f"{i % 10}/{i:04d}.png" for i in range(40)]
    expected = pd.Series(_expected(registry.networks[0], registry.scaler, raw)[0], index=ids).sort_index()
    np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected.to_numpy())
