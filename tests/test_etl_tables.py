"""The ETL stage on small CSV / JSON Lines / Parquet tables: declared schema, quarantine reasons, leak-free preprocessing."""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
import zipfile
from datetime import date, datetime
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.config import ConfigError, PipelineConfig, validate_config
from jobs.etl import UNKNOWN_CATEGORY, run_etl
from jobs.tracking import log_config, use_experiment
from pipelines.caching import kept_as_parquet
from pipelines.errors import DataError
from pipelines.file_refusals import file_refusals_named, refusal
from pipelines.scaling import FittedScaler
from pipelines.spark import HUGE_METHOD_LIMIT, small_generated_methods
from pipelines.tables import (DUPLICATE_KEY, UNCLOSED_QUOTE_HINT, UNDECODABLE, ingest_table, malformed_reason,
                              source_files)
from tests.spark_jobs import described_jobs, steps_in_order

COLUMNS = [
    {"name": "id", "type": "int", "nullable": False},
    {"name": "x", "type": "double", "nullable": False, "min": 0, "max": 100},
    {"name": "y", "type": "double"},
    {"name": "color", "type": "string", "nullable": False, "allowed": ["red", "green", "blue"]},
    {"name": "shape", "type": "string"},
    {"name": "label", "type": "string", "nullable": False, "allowed": ["a", "b"]},
]
HEADER = "id,x,y,color,shape,label"
COLORS = ("red", "green", "blue")
# (line, reason): every kind of bad record, each once (the last one has two problems)
BAD_LINES = [
    ("41,1.0,2.0,red", malformed_reason("csv", 6)),
    ('42,5,1,red,"square,a', malformed_reason("csv", 6) + UNCLOSED_QUOTE_HINT),
    ("43,abc,1,red,square,a", "column 'x': not a valid double"),
    ("44,150,1,red,square,a", "column 'x': above the maximum 100"),
    ("45,-1,1,red,square,a", "column 'x': below the minimum 0"),
    ("46,,1,red,square,a", "column 'x': missing required value"),
    ("47,NaN,1,red,square,a", "column 'x': NaN or infinite"),
    ("48,5,Infinity,red,square,a", "column 'y': NaN or infinite"),
    ("49,5,1,purple,square,a", "column 'color': not one of the allowed values [red, green, blue]"),
    ("4.5,5,1,red,square,a", "column 'id': not a valid int"),
    (",5,1,red,square,a", "column 'id': missing required value"),
    ("3,5,1,red,square,a", DUPLICATE_KEY),
    ("50,abc,1,pink,,b", "column 'x': not a valid double; column 'color': not one of the allowed values [red, green, blue]"),
]
CLEAN = 60


def clean_row(i: int) -> dict:
    shape = "hexagon" if i == 59 else ("circle" if i % 4 else "square")  # id 59: a shape seen once
    return {"id": i, "x": float(i % 50) * 1.5, "y": float((i * 7) % 11) if i % 10 else None,
            "color": COLORS[i % 3], "shape": shape, "label": "a" if i % 3 else "b"}


def csv_line(row: dict) -> str:
    return ",".join("" if row[c["name"]] is None else str(row[c["name"]]) for c in COLUMNS)


def table_config(path: Path, run_dir: Path, kind: str = "csv", **overrides) -> PipelineConfig:
    data = {
        "name": "tables-test",
        "run_dir": str(run_dir),
        "source": {"kind": kind, "path": str(path), "columns": COLUMNS, "key": "id", "label": "label",
                   "max_bad_fraction": 0.25},
        "split": {"method": "hash", "seed": 3},
        "normalize": {"method": "zscore", "per": "feature"},
        "spark": {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4},
        "output": {"files_per_split": 1},
        "model": {"kind": "cnn"},
        "train": {"world_size": 1},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data, "test")


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory) -> Path:
    """Two CSV files: 50 clean rows, then 10 clean rows mixed with one line of every bad kind."""
    root = tmp_path_factory.mktemp("csv")
    rows = [csv_line(clean_row(i)) for i in range(CLEAN)]
    (root / "part-0.csv").write_text("\n".join([HEADER, *rows[:50]]) + "\n")
    (root / "part-1.csv").write_text("\n".join([HEADER, *rows[50:], *(line for line, _ in BAD_LINES)]) + "\n")
    (root / "_SUCCESS").write_text("")  # hidden from the listing, like Spark's own markers
    return root


@pytest.fixture(scope="module")
def etl(spark, csv_source, tmp_path_factory) -> tuple[PipelineConfig, dict]:
    """One CSV ETL run shared by the tests that only read its output."""
    cfg = table_config(csv_source, tmp_path_factory.mktemp("run"))
    return cfg, run_etl(cfg)


def read_split(cfg: PipelineConfig, split: str) -> pa.Table:
    return pq.read_table(cfg.dataset_dir / f"split={split}")


def test_every_bad_record_kind_is_quarantined_with_its_reason_and_counts_reconcile(etl, csv_source):
    cfg, manifest = etl
    quarantine = pq.read_table(cfg.quarantine_dir).to_pylist()
    expected = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1

    assert manifest["counts"]["rows_in"] == CLEAN + len(BAD_LINES) == 73
    assert manifest["counts"]["rows_clean"] == CLEAN
    assert manifest["counts"]["rows_quarantined"] == len(quarantine) == len(BAD_LINES)
    assert manifest["quarantine_reasons"] == dict(sorted(expected.items()))
    assert all(row["source_file"].endswith("part-1.csv") for row in quarantine)
    by_reason = {row["reason"]: row["record"] for row in quarantine}
    assert by_reason[malformed_reason("csv", 6)] == "41,1.0,2.0,red"
    assert by_reason[malformed_reason("csv", 6) + UNCLOSED_QUOTE_HINT] == '42,5,1,red,"square,a'
    # the CSV reader parses the numbers of a line it can read: the record shows them as parsed
    assert json.loads(by_reason["column 'x': above the maximum 100"]) == {
        "id": "44", "x": "150.0", "y": "1.0", "color": "red", "shape": "square", "label": "a",
    }
    # a value it cannot parse shows as written, with the rest of its line
    assert json.loads(by_reason["column 'x': not a valid double"]) == {
        "id": "43", "x": "abc", "y": "1", "color": "red", "shape": "square", "label": "a",
    }
    assert json.loads(by_reason[DUPLICATE_KEY])["id"] == "3"
    assert not list(cfg.run_dir.glob(".checked*")), "the checked rows' scratch folder outlived the run"


def test_names_values_and_bounds_are_used_as_written_whatever_characters_they_hold(spark, tmp_path):
    """The checks, the scaler and the quality report are Spark SQL text: a name or value holding a quote, a backtick,
    a backslash, a dot or a space, and a negative bound (`x - -1.5`, not a `--` comment), are taken as written."""
    odd, tag, label = "we`ird 'name'.x", 'ta.g"\\', "the label.name"
    columns = [{"name": "id", "type": "int", "nullable": False},
               {"name": odd, "type": "double", "nullable": False, "min": -1.5, "max": 2.5},
               {"name": tag, "type": "string", "allowed": ["it's", "a\\b", "--x"]},
               {"name": label, "type": "string", "nullable": False}]
    good = [(i, -1.5 + i * 0.125, ["it's", "a\\b", "--x", ""][i % 4], "ab"[i % 2]) for i in range(24)]
    bad = [(90, -1.6, "it's", "a"), (91, 2.6, "a\\b", "b"), (92, 0.0, "it", "a")]
    path = tmp_path / "odd.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c["name"] for c in columns])
        writer.writerows(good + bad)
    cfg = table_config(path, tmp_path / "run", source={"columns": columns, "label": label, "max_bad_fraction": 0.5})
    manifest = run_etl(cfg)

    reasons = {json.loads(row["record"])["id"]: row["reason"] for row in pq.read_table(cfg.quarantine_dir).to_pylist()}
    assert reasons == {"90": f"column '{odd}': below the minimum -1.5", "91": f"column '{odd}': above the maximum 2.5",
                       "92": f"column '{tag}': not one of the allowed values [it's, a\\b, --x]"}
    assert manifest["counts"]["rows_clean"] == len(good)
    train = [row for row in good if str(row[0]) in set(read_split(cfg, "train").column("id").to_pylist())]
    values = np.array([row[1] for row in train])
    scaler = FittedScaler.from_dict(manifest["preprocessing"]["scaler"])
    np.testing.assert_allclose(scaler.offset, [values.mean()], rtol=1e-9)
    np.testing.assert_allclose(scaler.scale, [values.std()], rtol=1e-9)
    quality = json.loads((cfg.dataset_dir / "quality.json").read_text())["columns"]
    assert quality[odd]["all"]["min"] == -1.5 and quality[tag]["all"]["null_rate"] == pytest.approx(6 / 24)
    assert manifest["classes"] == ["a", "b"]
    tokens = manifest["preprocessing"]["categorical"][tag]["tokens"]
    assert sorted(tokens[1:]) == ["--x", "a\\b", "it's"]  # after the reserved unknown-category token
    written = read_split(cfg, "train").select(["id", f"{tag}_index"]).to_pylist()
    assert {row[f"{tag}_index"] for row in written if int(row["id"]) % 4 == 1} == {tokens.index("a\\b")}


def test_a_wide_tables_columns_are_logged_whole_in_config_yaml_not_cut_short_in_a_param(tmp_path):
    columns = [{"name": "id", "type": "int", "nullable": False},
               *[{"name": f"feature_{i:03d}", "type": "double", "nullable": False} for i in range(300)]]
    cfg = table_config(tmp_path / "raw.csv", tmp_path / "run", source={"columns": columns, "label": None})
    use_experiment(cfg)
    with mlflow.start_run() as run:
        log_config(cfg, ("source", "split"))
    logged = mlflow.get_run(run.info.run_id)
    size = len(str(cfg.as_params()["source.columns"]))
    assert size > 6000 and logged.data.params["source.columns"] == f"({size} characters: see config.yaml)"
    assert logged.data.params["source.key"] == "id" and "train.world_size" not in logged.data.params
    saved = yaml.safe_load(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    assert [c["name"] for c in saved["source"]["columns"]] == [c["name"] for c in columns]


def test_the_etl_logs_each_pass_with_its_counts_and_names_each_spark_job_by_its_step(spark, csv_source, tmp_path,
                                                                                     caplog):
    """Progress for a long job: a line as each pass over the data ends, the counts in it; in the Spark UI (and the
    progress lines) every job the ETL runs is described by its step."""
    caplog.set_level(logging.INFO, logger="dlpipe")
    cfg = table_config(csv_source, tmp_path / "run")
    before = max(described_jobs(spark), default=-1)
    counts = run_etl(cfg)["counts"]
    assert steps_in_order(described_jobs(spark), after=before) == [
        "read and check input", "repeated keys", "quarantine", "class names", "quality report", "fit scaler",
        "fit vocabularies", "drift reference", "write dataset"]
    lines = [record.getMessage() for record in caplog.records if record.name == "dlpipe.etl"]
    assert lines[:3] == ["started", f"read and checked 2 input file(s) of {csv_source}",
                         "1 key(s) repeat on clean rows (id)"]  # id 3 (DUPLICATE_KEY in BAD_LINES)
    assert lines[3].startswith(f"rows in {counts['rows_in']}: {counts['rows_clean']} clean, "
                               f"{counts['rows_quarantined']} quarantined (most: ")
    assert lines[4:6] == [f"split train/val/test = {counts['train']}/{counts['val']}/{counts['test']}",
                          f"preprocessing fitted on the train split; writing the dataset to {cfg.dataset_dir}"]
    assert lines[6].startswith("done in ") and len(lines) == 7


def test_manifest_describes_the_table_dataset(etl, csv_source):
    cfg, manifest = etl
    assert manifest["source"]["kind"] == "csv" and manifest["source"]["files"] == 2
    assert len(manifest["source"]["content_hash"]) == 64
    assert manifest["feature_shape"] == [2]
    assert manifest["classes"] == ["a", "b"]
    assert manifest["columns"] == {
        "id": "string", "label": "int", "features": "array<float>", "raw_features": "array<float>",
        "color_index": "int", "shape_index": "int",
    }
    assert manifest["preprocessing"]["numeric_columns"] == ["x", "y"]
    splits = {s: manifest["counts"][s] for s in ("train", "val", "test")}
    assert sum(splits.values()) == CLEAN and all(splits.values())
    assert {s: sum(b.values()) for s, b in manifest["class_balance"].items()} == splits


def test_features_are_the_numeric_columns_scaled_with_train_only_statistics(etl):
    cfg, manifest = etl
    scaler = FittedScaler.from_dict(manifest["preprocessing"]["scaler"])
    tables = {s: read_split(cfg, s).to_pydict() for s in ("train", "val", "test")}
    rows = {str(i): clean_row(i) for i in range(CLEAN)}
    as_array = lambda rs: np.array([[r["x"], np.nan if r["y"] is None else r["y"]] for r in rs])  # noqa: E731
    train, every = as_array(rows[k] for k in tables["train"]["id"]), as_array(rows.values())

    # a null y stays null in raw_features, the statistics skip it, and its scaled feature is 0
    np.testing.assert_allclose(scaler.offset, np.nanmean(train, axis=0), rtol=1e-9)
    np.testing.assert_allclose(scaler.scale, np.nanstd(train, axis=0), rtol=1e-9)
    assert not np.allclose(scaler.offset, np.nanmean(every, axis=0))  # val/test would shift it
    for table in tables.values():
        for key, raw, features in zip(table["id"], table["raw_features"], table["features"]):
            assert raw[0] == pytest.approx(rows[key]["x"])
            assert features[0] == pytest.approx((rows[key]["x"] - scaler.offset[0]) / scaler.scale[0], rel=1e-5)
            assert (raw[1] is None) == (rows[key]["y"] is None)
            assert features[1] == (0.0 if raw[1] is None else pytest.approx((raw[1] - scaler.offset[1]) / scaler.scale[1]))


def test_categorical_vocabulary_is_fitted_on_train_only(etl):
    cfg, manifest = etl
    vocab = manifest["preprocessing"]["categorical"]["shape"]
    tables = {s: read_split(cfg, s).to_pydict() for s in ("train", "val", "test")}
    train_shapes = [clean_row(int(k))["shape"] for k in tables["train"]["id"]]
    counts = {s: train_shapes.count(s) for s in set(train_shapes)}

    assert vocab["tokens"] == [UNKNOWN_CATEGORY, *sorted(counts, key=lambda s: (-counts[s], s))]
    assert vocab["oov_id"] == 0
    hexagon_split = next(s for s, t in tables.items() if "59" in t["id"])
    assert ("hexagon" in vocab["tokens"]) == (hexagon_split == "train")
    for table in tables.values():
        for key, index in zip(table["id"], table["shape_index"]):
            shape = clean_row(int(key))["shape"]
            assert index == (vocab["tokens"].index(shape) if shape in vocab["tokens"] else 0)


def test_json_lines_malformed_wrong_type_and_missing_fields(spark, tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(clean_row(i)) for i in range(5)] + [
        "{not json",
        json.dumps({**clean_row(5), "x": {"nested": 1}}),
        json.dumps({k: v for k, v in clean_row(6).items() if k != "color"}),
        json.dumps({**clean_row(7), "label": "c"}),
        json.dumps(clean_row(8)) + json.dumps(clean_row(9)),  # two records whose newline was lost
        json.dumps(clean_row(10)) + " trailing",
        json.dumps(clean_row(11)) + "]",
    ]
    path.write_text("\n".join(lines) + "\n")
    cfg = table_config(path, tmp_path / "run", kind="json")
    checked = ingest_table(spark, cfg.source, source_files(path)).select("id", "reason", "record").collect()

    reasons = sorted((r["reason"] or "") for r in checked)
    assert reasons == sorted([""] * 5 + [malformed_reason("json", 6)] * 4 + [
        "column 'x': not a valid double",
        "column 'color': missing required value",
        "column 'label': not one of the allowed values [a, b]",
    ])
    malformed = {r["record"] for r in checked if r["reason"] == malformed_reason("json", 6)}
    assert malformed == {"{not json", *lines[-3:]}  # each line whole, so the lost record can be recovered
    records = {r["reason"]: r["record"] for r in checked if r["reason"] and r["record"] not in malformed}
    assert records == {  # the line as written (not its values re-serialized as text: `"x":"{\"nested\":1}"`)
        "column 'x': not a valid double": lines[6],
        "column 'color': missing required value": lines[7],
        "column 'label': not one of the allowed values [a, b]": lines[8],
    }


def _csv_text(rows: list[dict], *extra_lines: str) -> str:
    """The header and `rows` as Python's csv module writes them (RFC 4180: quotes doubled), then `extra_lines`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c["name"] for c in COLUMNS])
    writer.writerows([["" if row[c["name"]] is None else row[c["name"]] for c in COLUMNS] for row in rows])
    return out.getvalue() + "".join(f"{line}\n" for line in extra_lines)


def _ingested(spark, path: Path, **source) -> dict[str, tuple]:
    cfg = table_config(path, path.parent / "run", source=source)
    rows = ingest_table(spark, cfg.source, source_files(path)).select("id", "shape", "reason", "record").collect()
    return {row["record"] or row["id"]: (row["shape"], row["reason"]) for row in rows}


def test_quotes_inside_quoted_values_are_read_as_rfc_4180_or_as_spark_writes_them(spark, tmp_path):
    rows = [clean_row(i) for i in range(3)]
    rows[1]["shape"] = 'a "tall", square'
    path = tmp_path / "rows.csv"
    path.write_text(_csv_text(rows))
    assert _ingested(spark, path)["1"] == ('a "tall", square', None)  # the doubled quotes of pandas and Python
    path.write_text(_csv_text(rows).replace('"a ""tall"", square"', r'"a \"tall\", square"'))
    assert _ingested(spark, path, escape="\\")["1"] == ('a "tall", square', None)  # Spark's writer's escapes


def test_text_is_decoded_with_the_declared_encoding_and_undecodable_bytes_are_quarantined(spark, tmp_path):
    rows = [clean_row(i) for i in range(3)]
    rows[1]["shape"] = "carré"
    path = tmp_path / "rows.csv"
    path.write_bytes(_csv_text(rows).encode("latin-1"))
    assert _ingested(spark, path, encoding="ISO-8859-1")["1"] == ("carré", None)
    as_utf8 = list(_ingested(spark, path).values())  # the byte 0xE9 alone is not UTF-8: read as U+FFFD
    assert sorted(as_utf8, key=str) == [("carr\ufffd", f"column 'shape': {UNDECODABLE}"), ("circle", None),
                                        ("square", None)]
    with pytest.raises(ValueError, match="unknown encoding 'latin-9000'"):
        table_config(path, tmp_path / "run", source={"encoding": "latin-9000"})
    with pytest.raises(ConfigError, match="source.encoding 'latin_1' is not a charset name Java knows"):
        _ingested(spark, path, encoding="latin_1")  # Python knows that name, the JVM that decodes does not


def test_utf16_text_is_read_when_declared_and_named_when_not(spark, tmp_path):
    """Excel's "Unicode text" is UTF-16: read as UTF-8 it failed on a header of NUL bytes; declared UTF-16 without
    multiline, every line was quarantined (Spark splits lines at the byte \\n)."""
    rows = [clean_row(i) for i in range(3)]
    rows[1]["shape"] = "carré"
    path = tmp_path / "rows.csv"
    path.write_text(_csv_text(rows), encoding="utf-16")
    assert _ingested(spark, path, encoding="UTF-16", multiline=True)["1"] == ("carré", None)
    with pytest.raises(DataError, match=re.escape(f"CSV file {path}: UTF-16 text (it starts with a UTF-16 byte-order "
                                                  "mark), read as UTF-8; set source.encoding: UTF-16 and "
                                                  "source.multiline: true")):
        _ingested(spark, path)
    with pytest.raises(ValueError, match=r"source.encoding UTF-16 needs source.multiline: true"):
        table_config(path, tmp_path / "run", source={"encoding": "UTF-16"})


def test_values_spanning_lines_are_read_whole_when_declared_multiline_and_quarantined_with_a_hint_if_not(
        spark, tmp_path):
    rows = [clean_row(i) for i in range(4)]
    rows[1]["shape"] = 'tall\nsquare, "quoted"'
    path = tmp_path / "rows.csv"
    path.write_text(_csv_text(rows, '9,5,1,red,"two\nlines",a,extra'))  # 7 columns, over two lines

    whole = _ingested(spark, path, multiline=True)
    assert whole == {"0": ("square", None), "1": ('tall\nsquare, "quoted"', None), "2": ("circle", None),
                     "3": ("circle", None),
                     '9,5,1,red,"two\nlines",a,extra': ("two\nlines", malformed_reason("csv", 6))}
    by_line = _ingested(spark, path)  # every line a record: the unclosed quotes get the hint
    hinted = malformed_reason("csv", 6) + UNCLOSED_QUOTE_HINT
    assert {record: reason for record, (_, reason) in by_line.items() if reason} == {
        '1,1.5,7.0,green,"tall': hinted, 'square, ""quoted""",a': hinted, '9,5,1,red,"two': hinted,
        'lines",a,extra': hinted,
    }
    assert len(by_line) == 7


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_dates_and_times_are_read_with_their_declared_format_and_others_quarantined(spark, tmp_path, kind):
    columns = [{"name": "id", "type": "int", "nullable": False},
               {"name": "day", "type": "date", "nullable": False, "format": "M/d/yyyy"},
               {"name": "at", "type": "timestamp", "format": "dd.MM.yyyy HH:mm"}]
    rows = [("1", "1/2/2021", "31.01.2021 13:45"), ("2", "12/31/2020", ""),
            ("3", "2021-01-02", "31.01.2021 13:45"), ("4", "13/45/2021", "31.01.2021 13:45"),
            ("5", "1/2/21", "31.01.2021 13:45"), ("6", "1/2/2021", "2021-01-31T13:45:00")]
    path = tmp_path / f"rows.{kind}"
    if kind == "csv":
        path.write_text("id,day,at\n" + "".join(f"{','.join(row)}\n" for row in rows))
    else:
        path.write_text("".join(json.dumps(dict(zip(("id", "day", "at"), (v or None for v in row)))) + "\n"
                                for row in rows))
    cfg = validate_config({"name": "dates", "run_dir": str(tmp_path / "run"), "model": {"kind": "mlp"},
                           "source": {"kind": kind, "path": str(path), "key": "id", "columns": columns}}, "test")
    got = {row["id"]: (row["day"], row["at"], row["reason"])
           for row in ingest_table(spark, cfg.source, source_files(path)).collect()}
    at, bad_day = datetime(2021, 1, 31, 13, 45), "column 'day': not a valid date (format M/d/yyyy)"
    assert got == {
        "1": (date(2021, 1, 2), at, None),
        "2": (date(2020, 12, 31), None, None),
        "3": (None, at, bad_day),  # ISO, not the declared format
        "4": (None, at, bad_day),
        "5": (None, at, bad_day),  # Java's old parser would read it (and Spark would then fail the job)
        "6": (date(2021, 1, 2), None, "column 'at': not a valid timestamp (format dd.MM.yyyy HH:mm)"),
    }
    with pytest.raises(ValueError, match="column 'id': a format is for date and timestamp columns, not int"):
        validate_config({**cfg.model_dump(mode="json"), "source": {
            **cfg.source.model_dump(mode="json"), "columns": [{**columns[0], "format": "x"}, *columns[1:]]}}, "test")


def test_parquet_source_is_checked_against_the_declared_types(spark, tmp_path):
    rows = [clean_row(i) for i in range(4)] + [{**clean_row(4), "x": float("inf")}, {**clean_row(5), "id": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    cfg = table_config(tmp_path / "rows.parquet", tmp_path / "run", kind="parquet")
    checked = ingest_table(spark, cfg.source, source_files(cfg.source.path)).select("reason").collect()

    assert sorted((r["reason"] or "") for r in checked) == sorted(
        [""] * 4 + ["column 'x': NaN or infinite", "column 'id': missing required value"]
    )


def test_parquet_files_storing_a_column_in_two_types_fail_naming_a_file(spark, tmp_path):
    (tmp_path / "in").mkdir()
    rows = [clean_row(i) for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "in" / "part-0.parquet")  # x: double
    pq.write_table(pa.Table.from_pylist([{**row, "x": str(row["x"])} for row in rows[6:]]),
                   tmp_path / "in" / "part-1.parquet")  # x: string
    cfg = table_config(tmp_path / "in", tmp_path / "run", kind="parquet")
    with pytest.raises(DataError) as raised:  # whichever file Spark took the schema from, the other one is named
        run_etl(cfg)
    named = re.fullmatch(r"Parquet file (.*): column 'x' is stored as (\w+), where the schema Spark took from another "
                         r"file of the source has (\w+): every file must store a column in one type", str(raised.value))
    assert named is not None, raised.value
    assert named.groups() in {(str((tmp_path / "in" / "part-1.parquet").resolve()), "BINARY", "double"),
                              (str((tmp_path / "in" / "part-0.parquet").resolve()), "DOUBLE", "string")}
    assert not cfg.dataset_dir.exists()


def test_a_parquet_file_lacking_a_declared_column_fails_naming_it(spark, tmp_path):
    """Spark reads a column one file lacks as null: in a nullable column (y) every row of that file would pass."""
    (tmp_path / "in").mkdir()
    rows = [clean_row(i) for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "in" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "y"} for row in rows[6:]]),
                   tmp_path / "in" / "part-1.parquet")
    cfg = table_config(tmp_path / "in", tmp_path / "run", kind="parquet")
    with pytest.raises(DataError, match=re.escape(
            f"Parquet file {tmp_path / 'in' / 'part-1.parquet'} lacks the declared column(s) y (source.columns)")):
        run_etl(cfg)
    assert not cfg.dataset_dir.exists()


def _gzip_csv(rows: range) -> bytes:
    return gzip.compress(("\n".join([HEADER, *(csv_line(clean_row(i)) for i in rows)]) + "\n").encode())


def _zipped_csv(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("rows.csv", "\n".join([HEADER, *(csv_line(clean_row(i)) for i in range(3))]) + "\n")


@pytest.mark.parametrize("name, write, kind", [
    ("rows.zip", _zipped_csv, "a zip archive (an Excel .xlsx workbook is one too)"),
    ("rows.csv", lambda path: pq.write_table(pa.Table.from_pylist([clean_row(0)]), path),
     "a Parquet file (source.kind parquet reads Parquet)"),
    ("rows.csv", lambda path: path.write_bytes(_gzip_csv(range(3))), "gzip-compressed without the .gz name Spark "
     "decompresses by"),
])
@pytest.mark.parametrize("file_format", ["csv", "json"])
def test_a_file_that_is_not_text_in_a_text_source_fails_naming_it_and_what_it_is(spark, tmp_path, name, write, kind,
                                                                                file_format):
    """Spark would read it as lines of binary noise, and complain about the header (CSV) or quarantine every line."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("\n".join([HEADER, csv_line(clean_row(9))]) + "\n")
    write(tmp_path / "in" / name)
    cfg = table_config(tmp_path / "in", tmp_path / "run", kind=file_format)
    what = "CSV" if file_format == "csv" else "JSON Lines"
    with pytest.raises(DataError, match=re.escape(
            f"{what} file {tmp_path / 'in' / name}: {kind}, not text; a {what} source reads text files, plain or "
            f"compressed as .gz or .bz2")):
        ingest_table(spark, cfg.source, source_files(cfg.source.path))


def test_a_gzip_csv_cut_short_fails_naming_it(spark, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-0.csv.gz").write_bytes(_gzip_csv(range(30)))
    whole = _gzip_csv(range(30, 60))
    (tmp_path / "in" / "part-1.csv.gz").write_bytes(whole[: len(whole) // 2])  # an upload that stopped halfway
    cfg = table_config(tmp_path / "in", tmp_path / "run")
    with pytest.raises(DataError) as raised:  # Spark's own error says only "Unexpected end of input stream"
        run_etl(cfg)
    assert str(raised.value) == (f"compressed file(s) {(tmp_path / 'in' / 'part-1.csv.gz').resolve()}: cut short or "
                                 f"damaged, not readable to the end (Unexpected end of input stream)")
    assert not cfg.dataset_dir.exists()


def test_a_cut_short_stream_spark_does_not_name_is_reported_without_a_guess(tmp_path):
    whole = tmp_path / "part-0.csv.gz"
    whole.write_bytes(_gzip_csv(range(5)))
    assert refusal("java.io.EOFException: Unexpected end of input stream", [whole]) == (
        "a compressed input file is cut short (Unexpected end of input stream); Spark does not say which, and no .gz "
        "or .bz2 file of the source is: check its other compressed files")
    assert refusal("java.lang.OutOfMemoryError: Java heap space", [whole]) is None  # not a file's fault: re-raised
    damaged = tmp_path / "part-1.csv.gz"
    flipped = bytearray(_gzip_csv(range(5)))
    flipped[-6] ^= 0xFF  # the CRC-32 in the trailer
    damaged.write_bytes(bytes(flipped))
    assert refusal("java.io.EOFException: Unexpected end of input stream", [whole, damaged]) == (
        f"compressed file(s) {damaged}: cut short or damaged, not readable to the end (Unexpected end of input stream)")


def test_an_error_without_text_is_re_raised_as_it_is():
    class JavaErrorOfAStoppedJvm(Exception):
        def __str__(self):  # a Py4JJavaError asks the JVM for its text
            raise ConnectionError("the JVM is gone")

    with pytest.raises(JavaErrorOfAStoppedJvm):
        with file_refusals_named():
            raise JavaErrorOfAStoppedJvm()


def test_duplicates_fail_the_job_when_declared(spark, tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("\n".join([HEADER, *(csv_line(clean_row(i)) for i in (0, 1, 2, 1))]) + "\n")
    cfg = table_config(path, tmp_path / "run", source={"duplicates": "fail"})
    with pytest.raises(DataError) as raised:
        run_etl(cfg)
    repeat = json.dumps({k: str(v) for k, v in clean_row(1).items() if v is not None}, separators=(",", ":"))
    assert str(raised.value) == (
        f"1 row repeats an earlier row's key 'id' and source.duplicates is 'fail': e.g. {repeat} in "
        f"{path.resolve().as_uri()}; every repeat is in the quarantine at {cfg.quarantine_dir}")


@pytest.mark.parametrize("header, problem", [
    ("id,x,z,color,shape,label", "expected the column 'y' where it has 'z'"),
    ("id,x,y,color,label", "it has 5 columns, the declared schema 6"),
    ("id;x;y;color;shape;label", "it has 1 column, the declared schema 6: is its delimiter source.delimiter?"),
], ids=["renamed", "one-missing", "another-delimiter"])
def test_a_csv_header_unlike_the_declared_columns_fails_naming_the_file(spark, tmp_path, header, problem):
    good, bad = tmp_path / "in" / "part-0.csv", tmp_path / "in" / "part-1.csv"
    good.parent.mkdir()
    good.write_text("\n".join([HEADER, *(csv_line(clean_row(i)) for i in range(6))]) + "\n")
    bad.write_text("\n".join([header, *(csv_line(clean_row(i)) for i in range(6, 12))]) + "\n")
    cfg = table_config(good.parent, tmp_path / "run")
    with pytest.raises(DataError) as raised:  # not read by position into the wrong columns, nor a JVM stack trace
        run_etl(cfg)
    assert str(raised.value) == (f"CSV file {bad.resolve()}: the header does not name the declared columns "
                                 f"(source.columns, in any order): {problem}")
    assert not cfg.dataset_dir.exists()


def test_csv_files_naming_the_declared_columns_in_other_orders_are_read_by_name(spark, etl, tmp_path):
    """The shared run's 60 clean rows, in three files: one in the declared order, two naming the columns in other
    orders (one gzipped, its header in upper case: Spark compares names ignoring case), with bad lines the reader
    parses, flags, or cannot split: the same dataset, and reasons and records as for lines in the declared order."""
    orders = [[c["name"] for c in COLUMNS], ["label", "shape", "color", "y", "x", "id"],
              ["x", "id", "label", "color", "y", "shape"]]
    written = lambda row, order: ",".join("" if row[name] is None else str(row[name]) for name in order)  # noqa: E731
    bad = [({"id": 43, "x": "abc", "y": 1, "color": "red", "shape": "square", "label": "a"},
            "column 'x': not a valid double"),
           ({"id": 44, "x": 150, "y": 1, "color": "red", "shape": "square", "label": "a"},
            "column 'x': above the maximum 100")]
    root = tmp_path / "in"
    root.mkdir()
    (root / "part-0.csv").write_text("\n".join([HEADER, *(csv_line(clean_row(i)) for i in range(20))]) + "\n")
    (root / "part-1.csv").write_text("\n".join(
        [",".join(orders[1]), *(written(clean_row(i), orders[1]) for i in range(20, 40)), "a,square,red"]) + "\n")
    with gzip.open(root / "part-2.csv.gz", "wt") as gz:
        gz.write("\n".join([",".join(orders[2]).upper(), *(written(row, orders[2]) for row in [
            *(clean_row(i) for i in range(40, CLEAN)), *(row for row, _ in bad)])]) + "\n")
    cfg = table_config(root, tmp_path / "run")

    manifest = run_etl(cfg)

    assert manifest["counts"]["rows_in"] == CLEAN + 3 and manifest["counts"]["rows_clean"] == CLEAN
    quarantine = {row["reason"]: row for row in pq.read_table(cfg.quarantine_dir).to_pylist()}
    assert sorted(quarantine) == sorted([malformed_reason("csv", 6), *(reason for _, reason in bad)])
    assert quarantine[malformed_reason("csv", 6)]["record"] == "a,square,red"
    assert quarantine[malformed_reason("csv", 6)]["source_file"].endswith("part-1.csv")
    assert json.loads(quarantine["column 'x': not a valid double"]["record"]) == {
        "id": "43", "x": "abc", "y": "1", "color": "red", "shape": "square", "label": "a"}
    assert json.loads(quarantine["column 'x': above the maximum 100"]["record"]) == {
        "id": "44", "x": "150.0", "y": "1.0", "color": "red", "shape": "square", "label": "a"}
    expected_cfg, expected = etl  # the same clean rows, every file in the declared order (sums in another order)
    scaler, expected_scaler = manifest["preprocessing"].pop("scaler"), expected["preprocessing"]["scaler"]
    assert manifest["preprocessing"] == {k: v for k, v in expected["preprocessing"].items() if k != "scaler"}
    assert scaler.keys() == expected_scaler.keys() and all(
        scaler[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, list) else v) for k, v in expected_scaler.items())
    for split in ("train", "val", "test"):
        got, want = (read_split(c, split).sort_by("id") for c in (cfg, expected_cfg))
        assert got.drop(["features"]) == want.drop(["features"])
        assert np.allclose(np.array(got["features"].to_pylist()), np.array(want["features"].to_pylist()), rtol=1e-6)


def test_too_many_bad_rows_fail_with_the_fraction(spark, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([HEADER, *(csv_line(clean_row(i)) for i in range(6)), "7,x,1,red,,a", "8,,1,red,,a"]) + "\n")
    cfg = table_config(path, tmp_path / "run", source={"max_bad_fraction": 0.2})
    with pytest.raises(DataError, match=r"quarantined fraction 0\.2500 \(2 of 8 rows\) exceeds source\.max_bad_"
                                        r"fraction 0\.2 \(most common reasons: 1 row \"column 'x': missing required "
                                        r"value\", 1 row \"column 'x': not a valid double\"\); see the quarantine"):
        run_etl(cfg)
    assert pq.read_table(cfg.quarantine_dir).num_rows == 2


def test_an_input_without_a_clean_row_fails_naming_the_most_common_reasons(spark, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([HEADER, "7,x,1,red,,a", "8,y,1,red,,a", "9,,1,red,,a", "10,1,1,pink,,a"]) + "\n")
    cfg = table_config(path, tmp_path / "run", source={"max_bad_fraction": 1.0})
    with pytest.raises(DataError, match=r"^no clean rows among 4 input records \(most common reasons: 2 rows "
                                        r"\"column 'x': not a valid double\", 1 row \"column 'color': not one of the "
                                        r"allowed values \[red, green, blue\]\", 1 row \"column 'x': missing required "
                                        r"value\"\); see the quarantine at "):
        run_etl(cfg)


def test_small_generated_methods_hold_only_inside_their_block(spark):
    before = spark.conf.get(HUGE_METHOD_LIMIT)
    with pytest.raises(RuntimeError, match="inside"):
        with small_generated_methods(spark):
            assert spark.conf.get(HUGE_METHOD_LIMIT) == "8000"
            raise RuntimeError("inside")
    assert spark.conf.get(HUGE_METHOD_LIMIT) == before


def _encodings(folder: Path) -> dict[str, set[str]]:
    """Column -> the Parquet encodings its chunks use, over every file in `folder`."""
    found: dict[str, set[str]] = {}
    for path in folder.glob("*.parquet"):
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            for i in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(i)
                found.setdefault(chunk.path_in_schema, set()).update(chunk.encodings)
    return found


def test_kept_rows_read_back_whole_dictionary_encoded_only_where_asked_and_go_after_the_block(spark, tmp_path):
    rows = [(i, ["red", "blue"][i % 2], float(i) / 3 if i % 7 else None, [i, -i]) for i in range(200)]
    df = spark.createDataFrame(rows, "id long, colour string, x double, pair array<int>").repartition(3)
    stale = tmp_path / ".kept.tmp-deadbeef"  # left by a killed run
    stale.mkdir()
    with pytest.raises(RuntimeError, match="a pass failed"):
        with kept_as_parquet(df, tmp_path / "kept", dictionary=["colour"]) as kept:
            (folder,) = tmp_path.glob(".kept.tmp-*")
            assert folder != stale
            assert sorted(kept.collect()) == sorted(df.collect())
            assert kept.schema == df.schema
            encodings = _encodings(folder)
            assert "PLAIN_DICTIONARY" in encodings["colour"] or "RLE_DICTIONARY" in encodings["colour"]
            assert not {e for name in ("id", "x") for e in encodings[name] if "DICTIONARY" in e}
            raise RuntimeError("a pass failed")
    assert not list(tmp_path.iterdir())
    with kept_as_parquet(df.limit(0), tmp_path / "kept") as empty:
        assert empty.count() == 0 and empty.schema == df.schema
