"""Feature scaling, Spark-ML style: `fit_scaler(train_df)` learns statistics, `FittedScaler` applies them.

The fitted state is plain data (it goes into manifest.json and travels with the model), and the same
object applies it to a Spark column at ETL time and to a NumPy batch at scoring time.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.config import NormalizeConf
from pipelines import sql_text as sql
from pipelines.spark_progress import spark_step

UNROLLED_WIDTH = 1024  # arrays up to this wide are scaled element by element (see FittedScaler.column)
SHIFT_ROWS = 1000  # the rows a shift for the sums of squares is taken from (_shifts)
ROBUST_ACCURACY = 100_000  # percentile_approx accuracy: relative rank error at most 1/ROBUST_ACCURACY
SPREAD_NAMES = {"zscore": "standard deviation", "log1p": "standard deviation", "minmax": "range", "robust": "IQR"}

log = logging.getLogger("dlpipe.scaling")


@dataclass(frozen=True)
class FittedScaler:
    """`(x - offset[g]) / scale[g]` where g is the statistic group of each array element.

    With method `log1p`, x is first replaced by sign(x) * log1p(|x|) (defined for every real x).
    A missing element (null, or NaN in NumPy) scales to 0: the train mean / median for zscore / robust.
    A group with zero spread on the train split (a constant column; an IQR of 0) has scale 1, not 0: its train
    value maps to 0 and any other value stays finite. `zero_spread` names those groups.
    """

    method: str
    per: str
    group_size: int  # consecutive array elements sharing one statistic (H*W per channel, 1 per feature)
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    zero_spread: tuple[str, ...] = ()  # the groups scaled by 1 because their train spread was 0

    def to_dict(self) -> dict:
        return {**asdict(self), "offset": list(self.offset), "scale": list(self.scale),
                "zero_spread": list(self.zero_spread)}

    @classmethod
    def from_dict(cls, data: dict) -> "FittedScaler":
        return cls(data["method"], data["per"], int(data["group_size"]), tuple(data["offset"]), tuple(data["scale"]),
                   tuple(data.get("zero_spread", ())))  # informational; absent from manifests written before it

    def column(self, values: str | Sequence[str]) -> Column:
        """The scaled array<float> as a Spark column expression (runs in the JVM, no Python UDF).

        `values` is an array (SQL text: a column name quoted by `sql_text.name`), or the SQL text of its elements (a
        table's numeric columns: then no array is built per row only to be taken apart again: 16-22 s against 19-24 s
        to write 10M rows, BENCHMARKS.md). Arrays of up to UNROLLED_WIDTH elements are scaled element by element, in
        code Spark generates and the JVM compiles; a longer one (a large image) goes through a higher-order function,
        which Spark interprets. The expression is built as SQL text: one py4j call, however wide.
        """
        width = len(self.offset) * self.group_size
        if width <= UNROLLED_WIDTH:
            elements = [f"({values})[{i}]" for i in range(width)] if isinstance(values, str) else values
            return F.expr(sql.call("array", *[
                self._scaled(element, sql.literal(self.offset[i // self.group_size]),
                             sql.literal(self.scale[i // self.group_size])) for i, element in enumerate(elements)]))
        array = values if isinstance(values, str) else sql.call("array", *values)
        group = f"CAST(floor(i / {self.group_size}) AS INT)"
        offset = f"{sql.call('array', *map(sql.literal, self.offset))}[{group}]"
        scale = f"{sql.call('array', *map(sql.literal, self.scale))}[{group}]"
        return F.expr(f"transform({array}, (x, i) -> {self._scaled('x', offset, scale)})")

    def _scaled(self, x: str, offset: str, scale: str) -> str:
        """One element scaled by its group's `offset` and `scale` (a missing element scales to 0), as float (SQL)."""
        if self.method == "log1p":
            x = signed_log1p(x)
        return f"CAST(coalesce(({x} - {offset}) / {scale}, 0.0D) AS FLOAT)"

    def transform(self, df: DataFrame, input_col: str, output_col: str) -> DataFrame:
        """Add `output_col` = scaled `input_col` to a Spark DataFrame."""
        return df.withColumn(output_col, self.column(sql.name(input_col)))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Scale a [N, D] NumPy batch exactly as `transform` does (float64 arithmetic, float32 result).

        A row of several steps (a time-series window: L x n_inputs, time-major) repeats the groups at every step.
        """
        values = np.asarray(values, dtype=np.float64)
        if self.method == "log1p":
            values = np.sign(values) * np.log1p(np.abs(values))
        groups = values.reshape(values.shape[0], -1, len(self.offset), self.group_size)
        offset = np.asarray(self.offset)[None, None, :, None]
        scale = np.asarray(self.scale)[None, None, :, None]
        return np.nan_to_num((groups - offset) / scale, nan=0.0).reshape(values.shape).astype(np.float32)


def signed_log1p(x: str) -> str:
    """sign(x) * log1p(|x|) (SQL text): log-compresses both tails, 0 stays 0."""
    return f"(signum({x}) * log1p(abs({x})))"


def _statistics(value: str, conf: NormalizeConf, shift: float | None = None) -> tuple[str, str]:
    """(offset, spread) aggregates of one group's values (SQL text); the scaled value is (x - offset) / spread.

    With a `shift` (any one of the group's values: see `_shifts`), mean and standard deviation are plain sums of
    (value - shift) and its square, which the JVM runs 2-3x faster in a wide aggregation than `stddev_pop`'s
    running update (BENCHMARKS.md); the shift keeps the difference of squares exact enough (Chan, Golub and
    LeVeque's shifted-data algorithm), and a constant group still gets a spread of exactly 0.
    """
    if conf.method == "robust":
        quartiles = f"percentile_approx({value}, array(0.25D, 0.5D, 0.75D), {ROBUST_ACCURACY})"
        return f"{quartiles}[1]", f"{quartiles}[2] - {quartiles}[0]"
    if conf.method == "minmax":
        low, high = conf.minmax_range
        spread = f"((max({value}) - min({value})) / {sql.literal(float(high - low))})"
        return f"min({value}) - {sql.literal(float(low))} * {spread}", spread
    if conf.method == "log1p":
        value = signed_log1p(value)
    if shift is None:
        return f"mean({value})", f"stddev_pop({value})"
    deviation = f"(CAST({value} AS DOUBLE) - {sql.literal(shift)})"
    mean_deviation = f"(sum({deviation}) / count({deviation}))"
    variance = f"sum({deviation} * {deviation}) / count({deviation}) - {mean_deviation} * {mean_deviation}"
    return f"{sql.literal(shift)} + {mean_deviation}", f"sqrt(greatest({variance}, 0.0D))"


def _shifts(train: DataFrame, elements: list[str], conf: NormalizeConf) -> list[float | None]:
    """Per element, a value of it from the first SHIFT_ROWS train rows (0 where all are null) to shift its sums
    by; None for methods that need no shift. A small job: each task reads its first rows only."""
    if conf.method not in ("zscore", "log1p"):
        return [None] * len(elements)
    values = [signed_log1p(e) if conf.method == "log1p" else e for e in elements]
    row = train.limit(SHIFT_ROWS).selectExpr(*[f"first({v}, true) AS k{i}" for i, v in enumerate(values)]).first()
    return [float(row[f"k{i}"]) if row[f"k{i}"] is not None else 0.0 for i in range(len(elements))]


@spark_step("fit scaler")
def fit_scaler(
    train: DataFrame, column: str | Sequence[str], conf: NormalizeConf, group_size: int,
    names: Sequence[str] | None = None,
) -> FittedScaler:
    """Fit scaling statistics on `train` only (callers pass the train split, never val/test).

    `column` is the SQL text of the elements (e.g. `tables.raw_feature_values`): each is one statistic group,
    aggregated where it stands in one pass, with no array built (an array aggregated element by element took 2x
    as long). Or `column` names an array column: its arrays are exploded and grouped by `group_size` consecutive
    elements (an image's channels). `names` names the statistic groups (the table's numeric columns) in warnings
    and `zero_spread`; without them group g is `<column>[g]` (channel g, or element g with `per: feature`).
    """
    group_size = 1 if conf.per == "feature" else group_size
    label = column if isinstance(column, str) else "raw features"
    if isinstance(column, str):
        rows = _statistics_by_group(train, column, conf, group_size)
    else:
        rows = _statistics_in_place(train, list(column), conf)
    if not rows:  # one row per statistic group: tiny
        raise ValueError(f"cannot fit a scaler on {label!r}: the train split is empty")
    names = list(names) if names is not None else [f"{label}[{g}]" for g in range(len(rows))]
    if len(names) != len(rows):
        raise ValueError(f"{len(names)} names for the {len(rows)} statistic groups of {label!r}")
    # A zero spread (a constant group; Spark's aggregates give exactly 0 for equal values) would divide by zero:
    # scale by 1 instead, so the train value maps to 0 and val/test values stay finite (no NaN/Inf).
    spread_ok = [spread is not None and spread > 0 for _, spread in rows]
    zero_spread = tuple(name for name, ok in zip(names, spread_ok) if not ok)
    if zero_spread:
        log.warning(
            "normalize.method %s: %s zero on the train split for %s: scaled by 1 instead (manifest: "
            "scaler.zero_spread)",
            conf.method, SPREAD_NAMES[conf.method], ", ".join(repr(name) for name in zero_spread),
        )
    scale = tuple(float(spread) if ok else 1.0 for (_, spread), ok in zip(rows, spread_ok))
    offset = tuple(float(offset) for offset, _ in rows)
    return FittedScaler(conf.method, conf.per, group_size, offset, scale, zero_spread)


def _statistics_in_place(
    train: DataFrame, elements: list[str], conf: NormalizeConf
) -> list[tuple[float | None, float | None]]:
    """(offset, spread) of each element, one statistic group each, all aggregated in one pass; empty when `train`
    has no rows."""
    statistics = [_statistics(element, conf, shift) for element, shift in zip(elements, _shifts(train, elements, conf))]
    aggregates = [f"{a} AS {name}{i}" for i, pair in enumerate(statistics) for name, a in zip("os", pair)]
    found = train.selectExpr("count(1) AS rows", *aggregates).first()  # aggregates only: one row for all of train
    return [(found[f"o{i}"], found[f"s{i}"]) for i in range(len(elements))] if found["rows"] else []


def _statistics_by_group(
    train: DataFrame, column: str, conf: NormalizeConf, group_size: int
) -> list[tuple[float | None, float | None]]:
    """(offset, spread) of each statistic group of `group_size` consecutive elements of the array `column`, in group
    order: the arrays are exploded into (position, value) rows and grouped (an image's channels)."""
    exploded = train.select(F.posexplode(column).alias("pos", "value"))
    by_group = exploded.groupBy(F.floor(F.col("pos") / group_size).cast("int").alias("group"))
    offset, spread = _statistics("value", conf)
    found = by_group.agg(F.expr(offset).alias("offset"), F.expr(spread).alias("spread")).collect()
    return [(row["offset"], row["spread"]) for row in sorted(found, key=lambda r: r["group"])]
