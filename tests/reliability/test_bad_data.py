"""Hostile data through real Spark: decompression bombs, mixed image modes, unseen labels at evaluation, constant
columns under every scaler, a split left empty, schema drift at scoring, and series shorter than a window."""
from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from datetime import date, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.cli import EXIT_DATA, main
from jobs.config import DriftConf, NormalizeConf, PipelineConfig, WindowConf, validate_config
from jobs.etl import run_etl
from jobs.score import check_drift
from pipelines.errors import DataError
from pipelines.evaluation import labels_as_names, predictions_report
from pipelines.images import ImageTooLarge, decode_image
from pipelines.input_schema import LABEL_TYPES, NUMERIC_ARRAY_TYPES, check_columns
from pipelines.scaling import fit_scaler
from pipelines.scoring import score_parquet
from pipelines.windows import sliding_windows
from registry_helpers import network, pipeline_config, register, scaler, tracking

SPARK = {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for this module's ETL runs and registry (creating a store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


# --- huge images and mixed image modes --------------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A real PNG (signature, IHDR, IDAT, IEND with valid CRCs) whose header claims width x height grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def luma(rgb: tuple[int, int, int]) -> int:
    """PIL's RGB -> L conversion (ITU-R 601-2, fixed point, rounded)."""
    r, g, b = rgb
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def solid_images(rgb: tuple[int, int, int], grey: int) -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """File name -> (bytes, the RGB every pixel must decode to): one solid image per mode PIL reads."""
    palette = Image.new("P", (2, 2), 3)
    palette.putpalette([0, 0, 0] * 3 + list(rgb) + [0, 0, 0] * 252)
    grey16 = Image.fromarray(np.full((1, 1), 40_000, dtype=np.uint16))  # 16-bit grey: 40000 / 257 -> 156
    return {
        "grey_1x1.png": (encoded(Image.new("L", (1, 1), grey)), (grey,) * 3),
        "rgb_1x1.png": (encoded(Image.new("RGB", (1, 1), rgb)), rgb),
        "rgba_3x5.png": (encoded(Image.new("RGBA", (3, 5), (*rgb, 40))), rgb),  # alpha dropped, not composited
        "palette_2x2.png": (encoded(palette), rgb),
        "photo_8x8.jpg": (encoded(Image.new("RGB", (8, 8), rgb), "JPEG"), rgb),
        "grey_alpha_4x4.png": (encoded(Image.new("LA", (4, 4), (grey, 100))), (grey,) * 3),
        "bilevel_1x1.png": (encoded(Image.new("1", (1, 1), 1)), (255, 255, 255)),
        "grey16_1x1.png": (encoded(grey16), (156, 156, 156)),
    }


PATTERN = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], dtype=np.uint8)  # 2x2 RGB
COLOURS = {"a": ((200, 30, 90), 77), "b": ((15, 180, 240), 190)}


def test_a_huge_image_header_is_refused_before_decoding_with_its_size_and_the_cap():
    bomb = png_claiming(100_000, 100_000)  # 10^10 pixels in a 74-byte file
    assert len(bomb) < 100
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would raise here: it must not fire at all
        with pytest.raises(ImageTooLarge, match=r"^image too large: 100000x100000 pixels exceeds 67108864$"):
            decode_image(bomb, (8, 8), 1)  # the default cap, 8192 x 8192
        with pytest.raises(ImageTooLarge, match=r"^image too large: 10000x10000 pixels exceeds 67108864$"):
            decode_image(png_claiming(10_000, 10_000), (8, 8), 1)  # between PIL's warning and error sizes
        with pytest.raises(ImageTooLarge, match=r"^image too large: 300x200 pixels exceeds 50000$"):
            decode_image(encoded(Image.new("L", (300, 200), 9)), (8, 8), 1, max_pixels=50_000)
        np.testing.assert_array_equal(decode_image(encoded(Image.new("L", (300, 200), 9)), (2, 2), 1), [9.0] * 4)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's process-wide limit is restored


def test_every_image_mode_decodes_to_grey_with_pil_luma():
    rgb, grey = COLOURS["a"]
    for name, (data, colour) in solid_images(rgb, grey).items():
        expected = colour[0] if len(set(colour)) == 1 else luma(colour)
        tolerance = 3 if name.endswith(".jpg") else 0  # JPEG is lossy even for a solid colour
        np.testing.assert_allclose(decode_image(data, (3, 2), 1), [expected] * 6, atol=tolerance, err_msg=name)


@pytest.fixture(scope="module")
def mixed_etl(spark, store, tmp_path_factory) -> tuple[PipelineConfig, dict, dict]:
    """Two classes, each one solid image per mode plus a 2x2 RGB pattern; a bomb and a too-large image besides."""
    root = tmp_path_factory.mktemp("mixed")
    expected: dict[str, np.ndarray] = {}
    for label, (rgb, grey) in COLOURS.items():
        (root / label).mkdir()
        for name, (data, colour) in solid_images(rgb, grey).items():
            (root / label / name).write_bytes(data)
            expected[f"{label}/{name}"] = np.repeat(np.array(colour, np.float32), 4)  # C,H,W: 3 planes of 2x2
        (root / label / "pattern_2x2.png").write_bytes(encoded(Image.fromarray(PATTERN)))
        expected[f"{label}/pattern_2x2.png"] = PATTERN.transpose(2, 0, 1).reshape(-1).astype(np.float32)
    (root / "a" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "b" / "big_300x200.png").write_bytes(encoded(Image.new("L", (300, 200), 5)))
    cfg = validate_config({
        "name": "mixed-images", "run_dir": str(tmp_path_factory.mktemp("run")), "spark": SPARK,
        "source": {"kind": "image_folder", "path": str(root), "image_size": [2, 2], "channels": 3,
                   "max_image_pixels": 50_000, "max_bad_fraction": 0.2},
        "output": {"files_per_split": 1}, "model": {"kind": "cnn"}, "train": {"world_size": 1},
        "mlflow": {"tracking_uri": store},
    }, "test")
    return cfg, run_etl(cfg), expected


def test_a_mixed_folder_decodes_every_mode_to_image_size_and_channels(mixed_etl):
    cfg, manifest, expected = mixed_etl
    # 9 per class, ranked per class at 70% / 85%: 6 / 2 / 1
    assert manifest["counts"] == {"rows_in": 20, "rows_clean": 18, "rows_quarantined": 2, "train": 12, "val": 4,
                                  "test": 2}
    assert manifest["feature_shape"] == [3, 2, 2]
    written = {}
    for split in ("train", "val", "test"):
        table = pq.read_table(cfg.dataset_dir / f"split={split}").to_pydict()
        written.update(zip(table["id"], table["raw_features"]))
        assert all(np.isfinite(row).all() and len(row) == 12 for row in table["features"])
    assert set(written) == set(expected)
    for key, pixels in written.items():
        tolerance = 3 if key.endswith(".jpg") else 0
        np.testing.assert_allclose(pixels, expected[key], atol=tolerance, err_msg=key)


def test_huge_images_are_quarantined_with_the_configured_cap_and_counts_reconcile(mixed_etl):
    cfg, manifest, _ = mixed_etl
    quarantine = {row["source_file"].rsplit("/", 2)[-2] + "/" + row["source_file"].rsplit("/", 1)[-1]: row["reason"]
                  for row in pq.read_table(cfg.quarantine_dir).to_pylist()}
    assert quarantine == {
        "a/bomb.png": "image too large: 100000x100000 pixels exceeds 50000",
        "b/big_300x200.png": "image too large: 300x200 pixels exceeds 50000",
    }
    assert manifest["quarantine_reasons"] == {reason: 1 for reason in quarantine.values()}
    counts = manifest["counts"]
    assert counts["rows_in"] == counts["rows_clean"] + counts["rows_quarantined"]


# --- labels at evaluation time never seen in training -----------------------------------------------------------

KNOWN = [("cat", 0)] * 4 + [("cat", 1)] + [("dog", 1)] * 3  # confusion [[4, 1], [0, 3]]
KNOWN_METRICS = {"accuracy": 7 / 8, "precision_macro": (1 + 3 / 4) / 2, "recall_macro": (4 / 5 + 1) / 2,
                 "f1_macro": (8 / 9 + 6 / 7) / 2}


def test_unseen_labels_are_counted_by_name_and_left_out_of_the_metrics(spark, caplog):
    rows = KNOWN + [("7x", 0), ("7x", 1), ("7x", 0)]
    predictions = spark.createDataFrame(rows, "label string, prediction int")
    with caplog.at_level(logging.WARNING, logger="dlpipe.evaluation"):
        report = predictions_report(predictions, "classification", ["cat", "dog"])
    assert report == pytest.approx({**KNOWN_METRICS, "rows_unseen_label": 3})
    assert "unseen labels: {'7x': 3} (3 rows)" in caplog.text

    indexed = [(["cat", "dog"].index(label), prediction) for label, prediction in KNOWN] + [(7, 0), (7, 1), (None, 1)]
    predictions = spark.createDataFrame(indexed, "label int, prediction int")  # class indices, as the dataset has
    with caplog.at_level(logging.WARNING, logger="dlpipe.evaluation"):
        report = predictions_report(predictions, "classification", ["cat", "dog"])
    assert report == pytest.approx({**KNOWN_METRICS, "rows_unseen_label": 3})
    assert "unseen labels: {7: 2, None: 1} (3 rows)" in caplog.text

    # Indexes into another dataset's classes (the gate's current test split, against an older model's classes).
    dataset_classes = ["eel", "dog", "cat"]
    indexed = [(dataset_classes.index(label), prediction) for label, prediction in KNOWN] + [(0, 1), (5, 0)]
    named = labels_as_names(spark.createDataFrame(indexed, "label int, prediction int"), dataset_classes)
    with caplog.at_level(logging.WARNING, logger="dlpipe.evaluation"):
        report = predictions_report(named, "classification", ["cat", "dog"])
    assert report == pytest.approx({**KNOWN_METRICS, "rows_unseen_label": 2})
    assert "unseen labels: {None: 1, 'eel': 1} (2 rows)" in caplog.text

    only_unseen = spark.createDataFrame([("7x", 0)], "label string, prediction int")
    with pytest.raises(DataError, match=r"no predictions row has a label among .*unseen labels: \{'7x': 1\}"):
        predictions_report(only_unseen, "classification", ["cat", "dog"])


# --- constant columns under every scaler --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zscore", "minmax", "robust", "log1p"])
def test_a_zero_spread_column_is_scaled_by_one_named_and_stays_finite(spark, caplog, method):
    # flat: constant; x: 0..19; mostly: 0 in 18 of 20 rows (IQR 0, yet std and range > 0)
    train = spark.createDataFrame([([5.0, float(i), float(i == 3) + 2 * float(i == 4)],) for i in range(20)],
                                  "raw array<float>")
    with caplog.at_level(logging.WARNING, logger="dlpipe.scaling"):
        elements = [f"raw[{i}]" for i in range(3)]  # as a table's numeric columns are fitted
        scaler = fit_scaler(train, elements, NormalizeConf(method=method, per="feature"), 1, ["flat", "x", "mostly"])
    zero = ("flat", "mostly") if method == "robust" else ("flat",)
    assert scaler.zero_spread == zero
    scales = dict(zip(("flat", "x", "mostly"), scaler.scale))
    assert {name: scales[name] for name in zero} == dict.fromkeys(zero, 1.0)
    assert all(scale > 0 and np.isfinite(scale) for scale in scaler.scale)
    assert "'flat'" in caplog.text and f"normalize.method {method}" in caplog.text
    assert scaler.to_dict()["zero_spread"] == list(zero)

    other = [[5.0, 3.0, 0.0], [7.5, 30.0, 9.0], [-1e6, -5.0, 1.0], [3e30, 1.0, 0.0]]  # val/test: not the constant
    frame = spark.createDataFrame([(row,) for row in other], "raw array<float>")
    from_spark = np.array([row["scaled"] for row in scaler.transform(frame, "raw", "scaled").collect()])
    from_numpy = scaler.apply(np.array(other))
    assert np.isfinite(from_spark).all() and np.isfinite(from_numpy).all()
    np.testing.assert_allclose(from_spark, from_numpy, rtol=1e-6)
    flat = np.array([row[0] for row in other])
    if method == "log1p":
        expected_flat = np.sign(flat) * np.log1p(np.abs(flat)) - np.log1p(5.0)
    else:
        expected_flat = flat - 5.0  # offset = the constant (min for minmax, median for robust), scale 1
    np.testing.assert_allclose(from_numpy[:, 0], expected_flat.astype(np.float32), rtol=1e-6)


def table_source(path: Path, columns: list[dict], **extra) -> dict:
    return {"kind": "csv", "path": str(path), "columns": columns, "key": "id", **extra}


def test_the_manifest_records_a_constant_column_and_its_features_are_zero(spark, store, tmp_path):
    lines = ["id,flat,x,label"] + [f"{i},2.5,{i * 1.5},{'a' if i % 2 else 'b'}" for i in range(40)]
    (tmp_path / "table.csv").write_text("\n".join(lines) + "\n")
    columns = [{"name": "id", "type": "int"}, {"name": "flat"}, {"name": "x"}, {"name": "label", "type": "string"}]
    cfg = validate_config({
        "name": "constant-column", "run_dir": str(tmp_path / "run"), "spark": SPARK,
        "source": table_source(tmp_path / "table.csv", columns, label="label"),
        "output": {"files_per_split": 1}, "model": {"kind": "mlp"}, "train": {"world_size": 1},
        "mlflow": {"tracking_uri": store},
    }, "test")
    manifest = run_etl(cfg)
    scaler = manifest["preprocessing"]["scaler"]
    assert scaler["zero_spread"] == ["flat"] and scaler["scale"][0] == 1.0 and scaler["offset"][0] == 2.5
    features = np.concatenate([
        np.array(pq.read_table(cfg.dataset_dir / f"split={split}").column("features").to_pylist())
        for split in ("train", "val", "test")
    ])
    assert features.shape == (40, 2) and np.isfinite(features).all()
    np.testing.assert_array_equal(features[:, 0], 0.0)


# --- a split left empty by a tiny input --------------------------------------------------------------------------

def test_a_tiny_input_leaving_a_split_empty_fails_naming_the_split_before_writing(
    spark, store, tmp_path, monkeypatch, capsys
):
    (tmp_path / "tiny.csv").write_text("id,x\n1,0.5\n2,1.5\n3,2.5\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "run_dir": str(tmp_path / "run"), "spark": SPARK,
        "source": table_source(tmp_path / "tiny.csv", [{"name": "id", "type": "int"}, {"name": "x"}]),
        "model": {"kind": "mlp"}, "train": {"world_size": 1}, "mlflow": {"tracking_uri": store},
    }))
    monkeypatch.setattr("jobs.cli.configure_logging", lambda *args, **kwargs: None)  # keep pytest's log capture

    assert main(["etl", str(config)]) == EXIT_DATA
    # ranked, unstratified: cuts at round(3 * 0.7) = 2 and round(3 * 0.85) = 3 rows
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dlpipe: data error: split 'test' is empty: 3 clean rows with ratios 0.7/0.15/0.15 "
        "(train 2, val 1, test 0); add rows or change split ratios"
    )
    assert not (tmp_path / "run" / "dataset").exists()


# --- schema drift between training and scoring ------------------------------------------------------------------

def write_input(path: Path, **columns: pa.Array) -> Path:
    path.mkdir()
    pq.write_table(pa.table(columns), path / "part-0.parquet")
    return path


def test_a_missing_renamed_or_retyped_scoring_column_is_named_with_both_types(spark, tmp_path):
    ids = pa.array(["r1", "r2"])
    features = pa.array([[1.0] * 4, [2.0] * 4], pa.list_(pa.float32()))
    required = {"id": ("string",), "raw_features": NUMERIC_ARRAY_TYPES}
    cases = {
        "renamed": ({"id": ids, "pixels": features},
                    "column 'raw_features' (array<float> or array<double>) is missing; "
                    "found id: string, pixels: array<float>"),
        "retyped": ({"id": ids, "raw_features": pa.array(["[1, 1, 1, 1]", "[2, 2, 2, 2]"])},
                    "column 'raw_features' has type string, expected array<float> or array<double>"),
        "label": ({"id": ids, "raw_features": features, "label": pa.array([0.5, 1.5])},
                  "column 'label' has type double, expected int or bigint or string"),
    }
    for name, (columns, message) in cases.items():
        path = write_input(tmp_path / name, **columns)
        with pytest.raises(DataError) as error:
            check_columns(spark.read.parquet(str(path)).schema, required, path, optional={"label": LABEL_TYPES})
        assert str(error.value) == f"{path}: {message}"
    good = write_input(tmp_path / "good", id=ids, raw_features=features, label=pa.array([0, 1], pa.int32()))
    check_columns(spark.read.parquet(str(good)).schema, required, good, optional={"label": LABEL_TYPES})


def test_scoring_fails_on_a_renamed_column_before_any_job_reads_a_row(spark, store, tmp_path):
    cfg = pipeline_config(tmp_path, "drift-schema", "drift-schema-cnn",
                          mlflow={"registered_model": "drift-schema-cnn", "tracking_uri": store})
    pixels = pa.array([[1.0] * 64], pa.list_(pa.float32()))
    renamed = write_input(tmp_path / "renamed", id=pa.array(["r1"]), pixels=pixels)
    with tracking(cfg.tracking_uri):
        experiment = mlflow.create_experiment("drift-schema", artifact_location=cfg.artifact_location)
        fitted = scaler()
        version = register(cfg, network(cfg, fitted, seed=1), fitted, experiment)
        tracker = spark.sparkContext.statusTracker()
        spark.sparkContext.setJobGroup("schema-read", "reading the schema only")
        spark.read.parquet(str(renamed))
        spark.sparkContext.setJobGroup("schema-check", "scoring a renamed input")
        try:
            with pytest.raises(DataError, match=r"column 'raw_features' \(array<float> or array<double>\) is missing; "
                                                r"found id: string, pixels: array<float>"):
                score_parquet(spark, f"models:/drift-schema-cnn/{version.version}", renamed, tmp_path / "predictions")
        finally:
            spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
            spark.sparkContext.setLocalProperty("spark.job.description", None)
        # `dlpipe score` checks drift first: its read of the input is checked the same way
        with mlflow.start_run(experiment_id=experiment) as training:
            mlflow.log_dict({"reference_distribution": {"column": "raw_features"}}, "manifest.json")
        with pytest.raises(DataError, match=r"column 'raw_features' \(array<float> or array<double>\) is missing"):
            check_drift(spark, DriftConf(), training.info.run_id, renamed)
    # the failing call ran the jobs reading the schema alone does (Parquet footers), no job that reads rows
    assert len(tracker.getJobIdsForGroup("schema-check")) == len(tracker.getJobIdsForGroup("schema-read"))
    assert not (tmp_path / "predictions").exists()


# --- a series shorter than a window -------------------------------------------------------------------------------

def test_a_series_shorter_than_a_window_in_a_split_fails_naming_it_and_its_length(spark):
    # north: 12 days in train, 6 in test; south: 12 in train, 3 in test (a window needs 4 + 1 = 5 steps)
    start = date(2024, 1, 1)
    steps = [(f"{station}|{day}", station, start + timedelta(days=day), "train" if day < 12 else "test",
              [float(day)], float(day)) for station, days in (("north", 18), ("south", 15)) for day in range(days)]
    df = spark.createDataFrame(steps, "id string, station string, day date, split string, raw array<float>, y double")
    df = df.withColumn("features", df["raw"]).withColumnRenamed("raw", "raw_features")

    with pytest.raises(DataError) as error:
        sliding_windows(df, WindowConf(length=4, horizon=1), "day", "station", "y")
    assert str(error.value) == (
        "series 'south' has 3 steps in split 'test': a window needs source.window.length 4 + horizon 1 = 5 steps "
        "of one series in one split; shorten the window or add rows"
    )
    windows = sliding_windows(df, WindowConf(length=2, horizon=1), "day", "station", "y")  # 2 + 1 fits everywhere
    assert windows.count() == (12 - 2) + (6 - 2) + (12 - 2) + (3 - 2)  # n - (L + H) + 1 per series and split
