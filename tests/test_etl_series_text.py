"""Time series and text sources: windows against a hand-computed example, no look-ahead, train-only vocabulary,
empty texts quarantined, the Seattle pipeline end to end with its baselines, and the quality report."""
from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.config import PipelineConfig, WindowConf, load_config, validate_config
from jobs.etl import run_etl
from jobs.sample import write_seattle_weather
from pipelines.dataset import read_manifest
from pipelines.tables import DUPLICATE_KEY
from pipelines.text import OOV_ID, PAD_ID, empty_text_reason
from pipelines.windows import sliding_windows

SPLITS = ("train", "val", "test")
SPARK = {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 4}
ROOT = Path(__file__).resolve().parents[1]


def read_split(cfg: PipelineConfig, split: str) -> dict:
    return pq.read_table(cfg.dataset_dir / f"split={split}").to_pydict()


def test_windows_match_a_hand_computed_example_and_stay_inside_their_split(spark):
    # two series of 10 days; days 0-5 train, 6-9 val; each step's inputs are [day, 100 * series + day]
    steps = [(f"{s}|{d}", s, d, "train" if d < 6 else "val", [float(d), 100.0 * (s == "b") + d], 1000.0 + d)
             for s in ("a", "b") for d in range(10)]
    df = spark.createDataFrame(steps, "id string, series string, t int, split string, raw array<float>, y double")
    df = df.withColumn("features", df["raw"]).withColumnRenamed("raw", "raw_features").repartition(3)

    windows = sliding_windows(df, WindowConf(length=2, horizon=2, stride=2), "t", "series", "y").collect()
    got = {r["id"]: (r["split"], r["features"], r["target"]) for r in windows}

    # train (days 0-5): windows start at days 0 and 2 (stride 2); one starting at 4 would need days 6-7 (val)
    # val (days 6-9): only the window starting at day 6 has both target days inside val
    assert got == {
        "a|1": ("train", [0, 0, 1, 1], [1002, 1003]), "a|3": ("train", [2, 2, 3, 3], [1004, 1005]),
        "a|7": ("val", [6, 6, 7, 7], [1008, 1009]),
        "b|1": ("train", [0, 100, 1, 101], [1002, 1003]), "b|3": ("train", [2, 102, 3, 103], [1004, 1005]),
        "b|7": ("val", [6, 106, 7, 107], [1008, 1009]),
    }


@pytest.mark.parametrize("kind, frequency", [("date", "1 day"), ("timestamp", "1h")])
def test_windows_over_a_missing_step_are_not_made_when_the_frequency_is_declared(spark, caplog, kind, frequency):
    # series a lacks step 4, series b step 8; each step's input is its number, its target 1000 + number
    unit = timedelta(days=1) if kind == "date" else timedelta(hours=1)
    first = START if kind == "date" else datetime(2021, 1, 1, 6)
    steps = [(f"{s}|{n}", s, first + n * unit, "train", [float(n)], 1000.0 + n)
             for s in ("a", "b") for n in range(10) if (s, n) not in (("a", 4), ("b", 8))]
    df = spark.createDataFrame(steps, f"id string, series string, t {kind}, split string, raw array<float>, y double")
    df = df.withColumn("features", df["raw"]).withColumnRenamed("raw", "raw_features")

    def windows(**declared) -> dict:
        made = sliding_windows(df, WindowConf(length=2, horizon=1, **declared), "t", "series", "y").collect()
        return {r["id"]: (r["features"], r["target"]) for r in made}

    consecutive_rows = windows()  # the rows 2, 3 -> 5 and 3, 5 -> 6 of series a make windows over the gap
    assert consecutive_rows["a|3"] == ([2, 3], [1005]) and consecutive_rows["a|5"] == ([3, 5], [1006])
    assert consecutive_rows["b|7"] == ([6, 7], [1009])
    with caplog.at_level("WARNING", logger="dlpipe.windows"):
        got = windows(frequency=frequency)
    assert got == {key: value for key, value in consecutive_rows.items() if key not in ("a|3", "a|5", "b|7")}
    assert len(got) == 5 + 6
    assert (f"3 windows are not made: their steps are not source.window.frequency {frequency} apart (a missing or "
            f"quarantined step inside them); most in: a (2), b (1)") in caplog.text


SERIES_COLUMNS = [
    {"name": "station", "type": "string", "nullable": False},
    {"name": "day", "type": "date", "nullable": False},
    {"name": "level", "type": "double", "nullable": False},
    {"name": "flow", "type": "double"},
]
START = date(2021, 1, 1)


def series_config(path: Path, run_dir: Path, **window) -> PipelineConfig:
    return validate_config({
        "name": "series-test",
        "run_dir": str(run_dir),
        "source": {"kind": "timeseries", "path": str(path), "columns": SERIES_COLUMNS, "time_column": "day",
                   "series_key": "station", "target": "level", "baseline_lags": 2, "max_bad_fraction": 0.1,
                   "window": {"length": 3, "horizon": 2, "stride": 1, **window}},
        "split": {"method": "time", "time_column": "day"},
        "normalize": {"method": "zscore", "per": "feature"},
        "spark": SPARK,
        "output": {"files_per_split": 1},
        "model": {"kind": "mlp", "task": "regression", "outputs": 2},
        "train": {"world_size": 1},
    }, "test")


@pytest.fixture(scope="module")
def series(spark, tmp_path_factory) -> tuple[PipelineConfig, dict]:
    """Two stations x 40 days (level = day index, flow = station offset + day), plus three bad lines."""
    root = tmp_path_factory.mktemp("series")
    lines = ["station,day,level,flow"]
    for station, offset in (("north", 0), ("south", 500)):
        lines += [f"{station},{START + timedelta(days=d)},{d},{offset + d}" for d in range(40)]
    lines += [f"north,{START + timedelta(days=3)},99,99", "south,not-a-day,1,1", f"south,{START},NaN,1"]
    (root / "levels.csv").write_text("\n".join(lines) + "\n")
    cfg = series_config(root, tmp_path_factory.mktemp("run"))
    return cfg, run_etl(cfg)


def test_series_windows_never_look_ahead_nor_cross_a_split(series):
    cfg, manifest = series
    assert manifest["counts"]["rows_in"] == 83 and manifest["counts"]["rows_quarantined"] == 3
    assert manifest["quarantine_reasons"] == {
        DUPLICATE_KEY: 1, "column 'day': not a valid date": 1, "column 'level': NaN or infinite": 1,
    }
    assert manifest["feature_shape"] == [3, 2] and manifest["preprocessing"]["inputs"] == ["level", "flow"]
    days = {}
    for split in SPLITS:
        table = read_split(cfg, split)
        inputs = [np.array(raw).reshape(3, 2)[:, 0] for raw in table["raw_features"]]
        days[split] = set()
        for key, past, future in zip(table["id"], inputs, table["target"]):
            station, _, last = key.partition("|")
            assert (date.fromisoformat(last) - START).days == past[-1]
            assert list(past) + list(future) == list(range(int(past[0]), int(past[0]) + 5))  # consecutive days
            days[split] |= set(past) | set(future)
    # the time cuts are the first days with >= 70% / 85% of the 80 clean rows at or before them (days 27, 33):
    # train days 0-26 < val 27-32 < test 33-39, and every window's inputs and targets lie in its own split
    assert max(days["train"]) == 26 and min(days["val"]) == 27 and max(days["val"]) == 32 and min(days["test"]) == 33
    counts = {split: manifest["counts"][split] for split in SPLITS}
    assert counts == {"train": 2 * (27 - 4), "val": 2 * (6 - 4), "test": 2 * (7 - 4)}  # L + H = 5 steps a window


def test_series_scaler_uses_the_train_time_span_only(series):
    cfg, manifest = series
    scaler = manifest["preprocessing"]["scaler"]
    train_days = np.arange(27)
    np.testing.assert_allclose(scaler["offset"], [train_days.mean(), 250 + train_days.mean()], rtol=1e-6)
    np.testing.assert_allclose(scaler["scale"][0], train_days.std(), rtol=1e-6)
    assert manifest["baselines"]["persistence_mae"] == pytest.approx(1.5)  # level rises by 1 a day: errors 1 and 2
    assert manifest["baselines"]["ridge_mae"] < 0.01


def test_series_whose_column_names_hold_dots_make_the_same_windows(series, tmp_path):
    """A name is taken as written (`d.ay` is no field `ay` of a struct `d`): time, series key and target too."""
    cfg, _ = series
    dotted = {"station": "st.ation", "day": "d.ay", "level": "le.vel", "flow": "fl`ow"}
    csv_text = (cfg.source.path / "levels.csv").read_text().split("\n", 1)[1]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "levels.csv").write_text(",".join(dotted.values()) + "\n" + csv_text)
    data = series_config(tmp_path / "raw", tmp_path / "run").model_dump(mode="json", exclude_unset=True)
    data["source"] |= {"columns": [{**c, "name": dotted[c["name"]]} for c in SERIES_COLUMNS], "time_column": "d.ay",
                       "series_key": "st.ation", "target": "le.vel"}
    data["split"]["time_column"] = "d.ay"
    renamed = validate_config(data, "test")
    manifest = run_etl(renamed)
    assert manifest["preprocessing"]["inputs"] == ["le.vel", "fl`ow"]
    for split in SPLITS:
        assert read_split(renamed, split) == read_split(cfg, split)


def test_seattle_weather_end_to_end_with_baselines(spark, tmp_path):
    assert write_seattle_weather(tmp_path / "raw") == 1461
    cfg = load_config(ROOT / "conf" / "seattle_weather_rnn.yaml", [
        f"source.path={tmp_path / 'raw'}", f"run_dir={tmp_path / 'run'}", "spark.master=local[2]",
        "spark.shuffle_partitions=4", "output.row_group_bytes=16384",
    ])
    run_etl(cfg)
    manifest = read_manifest(cfg.dataset_dir)

    assert manifest["counts"]["rows_clean"] == 1461 and manifest["counts"]["rows_quarantined"] == 0
    assert sum(manifest["counts"][s] for s in SPLITS) == 1461 - 3 * 14  # each split loses its first L steps
    baselines = manifest["baselines"]
    assert baselines["windows"] == manifest["counts"]["test"]
    assert 2.1 < baselines["persistence_mae"] < 2.3 and 2.0 < baselines["ridge_mae"] < baselines["persistence_mae"]
    test = read_split(cfg, "test")
    assert all(len(f) == 14 * 4 and len(t) == 1 for f, t in zip(test["features"], test["target"]))
    row_groups = sum(pq.ParquetFile(p).num_row_groups for p in (cfg.dataset_dir / "split=train").glob("*.parquet"))
    assert row_groups > cfg.output.files_per_split  # 16 KiB row groups: several per file
    quality = json.loads((cfg.dataset_dir / "quality.json").read_text())
    assert quality["rows"]["all"] == 1461 and sum(quality["rows"][s] for s in SPLITS) == 1461
    assert quality["columns"]["temp_max"]["all"] == {"null_rate": 0.0, "min": -1.6, "max": 35.6,
                                                     "mean": pytest.approx(16.439, abs=1e-3)}


TEXT_COLUMNS = [
    {"name": "id", "type": "int", "nullable": False},
    {"name": "text", "type": "string"},
    {"name": "topic", "type": "string", "nullable": False, "allowed": ["ham", "spam"]},
]
EMPTY_TEXTS = ['""', '"   "', '"!!! ..."']


@pytest.fixture(scope="module")
def texts(spark, tmp_path_factory) -> tuple[PipelineConfig, dict]:
    """60 texts, each with a word of its own (`onlyN`), plus three empty ones."""
    root = tmp_path_factory.mktemp("text")
    lines = ["id,text,topic"]
    lines += [f'{i},"Buy pills now, only{i}! Today",spam' if i % 2 else f"{i},See you only{i},ham" for i in range(60)]
    lines += [f"{60 + i},{text},ham" for i, text in enumerate(EMPTY_TEXTS)]
    (root / "texts.csv").write_text("\n".join(lines) + "\n")
    cfg = validate_config({
        "name": "text-test",
        "run_dir": str(tmp_path_factory.mktemp("run")),
        "source": {"kind": "text", "path": str(root), "columns": TEXT_COLUMNS, "key": "id", "text_column": "text",
                   "label": "topic", "max_length": 5, "max_bad_fraction": 0.1},
        "spark": SPARK,
        "output": {"files_per_split": 1},
        "model": {"kind": "mlp"},
        "train": {"world_size": 1},
    }, "test")
    return cfg, run_etl(cfg)


def test_empty_texts_are_quarantined_with_the_reason_and_counts_reconcile(texts):
    cfg, manifest = texts
    quarantine = pq.read_table(cfg.quarantine_dir).to_pylist()
    counts = manifest["counts"]
    assert (counts["rows_in"], counts["rows_clean"], counts["rows_quarantined"]) == (63, 60, 3)
    assert sum(counts[split] for split in SPLITS) == 60 and len(quarantine) == 3
    assert manifest["quarantine_reasons"] == {empty_text_reason("text"): 3}
    assert sorted(json.loads(row["record"])["id"] for row in quarantine) == ["60", "61", "62"]


def test_vocabulary_excludes_tokens_seen_only_in_val_or_test(texts):
    cfg, manifest = texts
    vocab = manifest["preprocessing"]["vocabulary"]
    tables = {split: read_split(cfg, split) for split in SPLITS}
    train_ids = {int(key) for key in tables["train"]["id"]}
    assert vocab["tokens"][:2] == ["<pad>", "<oov>"] and vocab["oov_id"] == OOV_ID
    assert {t for t in vocab["tokens"] if t.startswith("only")} == {f"only{i}" for i in train_ids}
    for split, table in tables.items():
        for key, tokens, length, text in zip(table["id"], table["features"], table["length"], table["text"]):
            words = text.lower().replace(",", " ").replace("!", " ").split()
            # ham: 3 words + 2 PAD; spam: 6 words cut to 5
            assert length == min(len(words), 5) and tokens[length:] == [PAD_ID] * (5 - length)
            assert tokens[:length] == [vocab["tokens"].index(w) if w in vocab["tokens"] else OOV_ID
                                       for w in words[:5]]
            own_word = next(t for w, t in zip(words, tokens) if w == f"only{key}")
            assert (own_word == OOV_ID) == (split != "train")
    quality = json.loads((cfg.dataset_dir / "quality.json").read_text())
    assert quality["label_balance"] == manifest["class_balance"]
    assert quality["columns"]["text"]["all"]["null_rate"] == 0.0


def test_a_text_column_whose_name_holds_a_dot_is_read_as_written(texts, tmp_path):
    cfg, manifest = texts
    dotted = {"id": "id", "text": "the.text", "topic": "to.pic"}
    csv_text = (cfg.source.path / "texts.csv").read_text().split("\n", 1)[1]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "texts.csv").write_text(",".join(dotted.values()) + "\n" + csv_text)
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["run_dir"] = str(tmp_path / "run")
    columns = [{**c, "name": dotted[c["name"]]} for c in TEXT_COLUMNS]
    data["source"] |= {"path": str(tmp_path / "raw"), "columns": columns, "text_column": "the.text", "label": "to.pic"}
    renamed = validate_config(data, "test")
    got = run_etl(renamed)
    assert got["preprocessing"]["vocabulary"] == manifest["preprocessing"]["vocabulary"]
    assert got["quarantine_reasons"] == {empty_text_reason("the.text"): 3}
    for split in SPLITS:
        assert read_split(renamed, split)["features"] == read_split(cfg, split)["features"]
