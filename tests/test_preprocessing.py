"""Scaler methods (robust, log1p, minmax ranges), the hash split and the time split, on small in-memory DataFrames."""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from jobs.config import NormalizeConf, SplitConf
from pipelines import scaling
from pipelines.scaling import fit_scaler
from pipelines.dataset import class_balance
from pipelines.errors import DataError
from pipelines.quality import quality_report, reported_balance
from pipelines.split import check_split_sizes, hash_split, split_rows
from pipelines.vocabulary import fit_vocabularies, fit_vocabulary

VALUES = np.array([[1.0, -50.0], [2.0, 0.0], [4.0, 3.0], [8.0, 7.0], [100.0, 1.0], [3.0, 2.0], [5.0, 9.0]])


@pytest.fixture(scope="module")
def train(spark):
    return spark.createDataFrame([(row.tolist(),) for row in VALUES.astype(np.float32)], "raw array<float>")


def lower_quantile(column: np.ndarray, q: float) -> float:
    """percentile_approx's answer on a small column: the smallest value with at least q of the values at or below it."""
    return float(np.percentile(column, q * 100, method="inverted_cdf"))


@pytest.mark.parametrize(
    "conf, offset, scale",
    [
        (NormalizeConf(method="robust", per="feature"),
         [lower_quantile(c, 0.5) for c in VALUES.T],
         [lower_quantile(c, 0.75) - lower_quantile(c, 0.25) for c in VALUES.T]),
        (NormalizeConf(method="log1p", per="feature"),
         (np.sign(VALUES) * np.log1p(np.abs(VALUES))).mean(axis=0),
         (np.sign(VALUES) * np.log1p(np.abs(VALUES))).std(axis=0)),
        (NormalizeConf(method="minmax", per="feature", minmax_range=(-1.0, 1.0)),
         (VALUES.max(axis=0) + VALUES.min(axis=0)) / 2, (VALUES.max(axis=0) - VALUES.min(axis=0)) / 2),
        (NormalizeConf(method="minmax", per="feature"), VALUES.min(axis=0), VALUES.max(axis=0) - VALUES.min(axis=0)),
    ],
    ids=["robust", "log1p", "minmax-11", "minmax-01"],
)
@pytest.mark.parametrize("unrolled", [True, False], ids=["per-element", "exploded"])
@pytest.mark.parametrize("in_place", [True, False], ids=["fit-in-place", "fit-exploded"])
def test_scaler_statistics_and_the_spark_and_numpy_paths_agree(train, conf, offset, scale, unrolled, in_place,
                                                               monkeypatch):
    if not unrolled:  # arrays wider than UNROLLED_WIDTH are scaled by a lambda over the elements
        monkeypatch.setattr(scaling, "UNROLLED_WIDTH", 1)
    # given the elements, each is aggregated in place; given the array column, its arrays are exploded and grouped
    column = [f"raw[{i}]" for i in range(2)] if in_place else "raw"
    scaler = fit_scaler(train, column, conf, group_size=1, names=["a", "b"] if in_place else None)
    np.testing.assert_allclose(scaler.offset, offset, rtol=1e-6)
    np.testing.assert_allclose(scaler.scale, scale, rtol=1e-6)

    spark_scaled = np.array([r["scaled"] for r in scaler.transform(train, "raw", "scaled").collect()])
    np.testing.assert_allclose(spark_scaled, scaler.apply(VALUES), rtol=1e-5, atol=1e-6)
    from_elements = train.select(scaler.column([f"raw[{i}]" for i in range(2)]).alias("scaled"))
    np.testing.assert_array_equal(np.array([r["scaled"] for r in from_elements.collect()]), spark_scaled)
    if conf.method == "minmax":
        low, high = conf.minmax_range
        np.testing.assert_allclose(spark_scaled.min(axis=0), [low, low], atol=1e-6)
        np.testing.assert_allclose(spark_scaled.max(axis=0), [high, high], atol=1e-6)


@pytest.mark.parametrize("method, rtol", [("zscore", 1e-9), ("log1p", 1e-5)])
def test_mean_and_deviation_keep_their_digits_far_from_zero(spark, method, rtol):
    # 1e6 + noise of 0.01: a plain sum of squares (1e12 per row) would lose every digit of a 1e-4 variance
    values = 1e6 + np.random.default_rng(5).normal(0, 0.01, size=3000)
    train = spark.createDataFrame([(float(v),) for v in values], "x double").repartition(4)
    scaler = fit_scaler(train, ["x"], NormalizeConf(method=method, per="feature"), 1, names=["x"])
    expected = np.sign(values) * np.log1p(np.abs(values)) if method == "log1p" else values
    np.testing.assert_allclose(scaler.offset, [expected.mean()], rtol=1e-12)
    np.testing.assert_allclose(scaler.scale, [expected.std()], rtol=rtol)


def test_hash_split_is_deterministic_and_stable_when_rows_are_added_or_reordered(spark):
    conf = SplitConf(method="hash", seed=11)
    first = spark.createDataFrame([(f"k{i}",) for i in range(2000)], "id string").repartition(3)
    grown = spark.createDataFrame([(f"k{i}",) for i in reversed(range(3000))], "id string").repartition(5)

    before = dict(hash_split(first, "id", conf).collect())
    after = dict(hash_split(grown, "id", conf).collect())

    assert before == dict(hash_split(first, "id", conf).collect())
    assert all(after[key] == split for key, split in before.items())
    sizes = [list(after.values()).count(s) for s in ("train", "val", "test")]
    assert abs(sizes[0] - 2100) < 90 and abs(sizes[1] - 450) < 70 and abs(sizes[2] - 450) < 70
    assert dict(hash_split(first, "id", SplitConf(method="hash", seed=12)).collect()) != before
    assert "Window" not in hash_split(first, "id", conf)._jdf.queryExecution().executedPlan().toString()


def test_time_split_has_no_look_ahead_and_keeps_equal_times_together(spark):
    days = [(f"s{series}-{day}", f"s{series}", datetime(2020, 1, 1) + timedelta(days=day))
            for series in range(3) for day in range(100)]
    rows = spark.createDataFrame(days, "id string, series string, at timestamp").repartition(4)
    conf = SplitConf(method="time", time_column="at")

    split = {r["id"]: r["split"] for r in split_rows(rows, "id", None, conf).collect()}
    by_split = {s: sorted(at for key, _, at in days if split[key] == s) for s in ("train", "val", "test")}

    assert by_split["train"][-1] < by_split["val"][0] and by_split["val"][-1] < by_split["test"][0]
    # the cuts are the first days with >= 70% / 85% of the rows at or before them: day 69 (210 rows), day 84 (255)
    assert [len(v) // 3 for v in by_split.values()] == [69, 15, 16]
    for key, series, at in days:
        assert split[key] == split[f"s0-{(at - datetime(2020, 1, 1)).days}"]


def test_vocabularies_of_several_columns_are_fitted_in_one_pass_like_one_at_a_time(spark):
    rows = [("b", ["x", "y"]), ("a", ["y"]), ("b", ["z", "y", "x"]), ("c", []), (None, ["w"]), ("a", ["x"])]
    train = spark.createDataFrame(rows, "colour string, tokens array<string>")

    together = fit_vocabularies(train, ["colour", "tokens"], ("<pad>",), oov_id=0, max_size=3, min_count=1)

    # most frequent first, ties by token, reserved ids first, capped at max_size ids; nulls are not tokens
    assert together["colour"].tokens == ("<pad>", "a", "b")
    assert together["tokens"].tokens == ("<pad>", "x", "y")  # x and y are seen 3 times each, z and w once
    for column in ("colour", "tokens"):
        assert fit_vocabulary(train, column, ("<pad>",), 0, max_size=3) == together[column]
    assert fit_vocabulary(train, "tokens", ("<pad>",), 0, min_count=2).tokens == ("<pad>", "x", "y")
    assert fit_vocabularies(train, [], ("<pad>",), 0) == {}


def test_split_sizes_must_add_up_and_leave_no_split_empty():
    conf = SplitConf(method="hash", seed=1)
    check_split_sizes({"train": 7, "val": 2, "test": 1}, conf, total=10)
    with pytest.raises(DataError, match=r"split counts .* do not add up to the 11 rows split"):
        check_split_sizes({"train": 7, "val": 2, "test": 1}, conf, total=11)
    with pytest.raises(DataError, match=r"^split 'val', 'test' are empty: 3 clean rows with ratios 0.7/0.15/0.15 "
                                        r"\(train 3, val 0, test 0\); add rows or change split ratios$"):
        check_split_sizes({"train": 3}, conf)


@pytest.mark.parametrize("classes", [["a", "b", "c"], []])
def test_the_quality_reports_balance_is_the_class_balance_counted_directly(spark, classes):
    """Class 'c' has no rows and 'test' none at all: both are left out as `class_balance` leaves them out."""
    rows = spark.createDataFrame([("train", 0)] * 5 + [("train", 1)] * 3 + [("val", 1)] * 2, "split string, label int")
    rows = rows if classes else rows.drop("label")
    balance = reported_balance(quality_report(rows, [], classes), classes)
    assert balance == class_balance(rows, classes)
    assert balance == ({"train": {"a": 5, "b": 3}, "val": {"b": 2}, "test": {}} if classes
                       else {"train": {"": 8}, "val": {"": 2}, "test": {}})


def test_the_quality_report_counts_nulls_per_split_except_where_the_checks_rule_them_out(spark):
    rows = spark.createDataFrame(
        [("train", 1.0, None), ("train", 3.0, "a"), ("train", 5.0, "b"), ("val", 2.0, None)],
        "split string, x double, note string")
    report = quality_report(rows, ["x", "note"], [], never_null={"x"})
    assert report["rows"] == {"all": 4, "train": 3, "val": 1}
    assert report["columns"]["note"] == {"all": {"null_rate": 0.5}, "train": {"null_rate": 1 / 3},
                                         "val": {"null_rate": 1.0}}
    assert report["columns"]["x"] == {"all": {"null_rate": 0.0, "min": 1.0, "max": 5.0, "mean": 2.75},
                                      "train": {"null_rate": 0.0, "min": 1.0, "max": 5.0, "mean": 3.0},
                                      "val": {"null_rate": 0.0, "min": 2.0, "max": 2.0, "mean": 2.0}}
