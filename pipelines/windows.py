"""Sliding windows over time series with Spark window functions, per series and split: none crosses a boundary.

A window ending at step t holds the `length` steps t-L+1..t (inputs) and the `horizon` steps t+1..t+H (target),
all of one series and one split; windows start every `stride` steps from the first step of each (series, split).
A series with fewer than `length + horizon` steps in a split it appears in would give that split no window of it:
that is a DataError naming the series, the split and its length (its steps would otherwise be lost silently).
Windows are made of consecutive rows; with `window.frequency`, a window whose first and last steps are further apart
than `length + horizon - 1` steps of that frequency spans a missing (or quarantined) step and is not made: a warning
counts them and names the series with the most.
"""
from __future__ import annotations

import logging

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DateType

from jobs.config import WindowConf
from pipelines import sql_text as sql
from pipelines.errors import DataError
from pipelines.spark_progress import spark_step

SHOWN_SHORT_SERIES = 5  # how many too-short (series, split) segments the error lists
SHOWN_GAPPY_SERIES = 5  # how many series the warning about windows over a gap names

log = logging.getLogger("dlpipe.windows")


@spark_step("window checks")
def sliding_windows(
    steps: DataFrame, conf: WindowConf, time_col: str, series_col: str | None, target_col: str
) -> DataFrame:
    """One row per complete window: `id` (its last input step's), `split`, `features` and `raw_features` (the steps'
    arrays concatenated time-major, L x n_inputs) and `target` (the next H values of `target_col`)."""
    check_series_fit_windows(steps, conf, series_col)
    series = [sql.column(series_col)] if series_col else []
    order = Window.partitionBy(*series, "split").orderBy(sql.column(time_col))
    past = order.rowsBetween(1 - conf.length, Window.currentRow)
    ahead = order.rowsBetween(1, conf.horizon)
    whole = order.rowsBetween(1 - conf.length, conf.horizon)
    time = _micros(sql.column(time_col), steps.schema[time_col].dataType) if conf.frequency else None
    windows = steps.select(
        "id",
        "split",
        F.flatten(F.collect_list("features").over(past)).alias("features"),
        F.flatten(F.collect_list("raw_features").over(past)).alias("raw_features"),
        F.collect_list(sql.column(target_col).cast("float")).over(ahead).alias("target"),
        (F.row_number().over(order) - conf.length).alias("start"),  # position of the window's first step
        (F.lit(True) if time is None else  # a window with a missing step spans more time than its steps
         F.max(time).over(whole) - F.min(time).over(whole) == (conf.length + conf.horizon - 1) * conf.step_micros)
        .alias("_regular"),
        *series,
    )
    complete = (F.col("start") >= 0) & (F.col("start") % conf.stride == 0) & (F.size("target") == conf.horizon)
    if conf.frequency:
        _warn_of_gaps(windows.where(complete & ~F.col("_regular")), conf, series_col)
    return windows.where(complete & F.col("_regular")).drop("start", "_regular", *([series_col] if series_col else []))


def _micros(time: Column, data_type) -> Column:
    """Microseconds since the epoch of a date (its UTC midnight) or timestamp column."""
    return F.unix_date(time).cast("long") * 86_400_000_000 if isinstance(data_type, DateType) else F.unix_micros(time)


def _warn_of_gaps(gappy: DataFrame, conf: WindowConf, series_col: str | None) -> None:
    """Log how many windows are not made for steps not `frequency` apart, naming the series with the most."""
    per_series = gappy.groupBy((sql.column(series_col) if series_col else F.lit("the series")).alias("series"))
    per_series = per_series.count()
    with_total = per_series.withColumn("total", F.sum("count").over(Window.partitionBy()))  # one Spark job
    worst = with_total.orderBy(F.desc("count"), "series").limit(SHOWN_GAPPY_SERIES).collect()
    if worst:
        log.warning("%d windows are not made: their steps are not source.window.frequency %s apart (a missing or "
                    "quarantined step inside them); most in: %s",
                    worst[0]["total"], conf.frequency, ", ".join(f"{row['series']} ({row['count']})" for row in worst))


def check_series_fit_windows(steps: DataFrame, conf: WindowConf, series_col: str | None) -> None:
    """DataError naming each series (and split) with fewer steps than one window needs (`length + horizon`)."""
    needed = conf.length + conf.horizon
    keys = [sql.column(series_col)] if series_col else []
    short = steps.groupBy(*keys, "split").count().where(F.col("count") < needed)
    shown = short.orderBy(*keys, "split").limit(SHOWN_SHORT_SERIES).collect()
    if shown:
        segments = [
            f"{f'series {row[series_col]!r}' if series_col else 'the series'} has {row['count']} steps in split "
            f"{row['split']!r}" for row in shown
        ]
        hidden = short.count() - len(shown)
        more = f" (and {hidden} more)" if hidden else ""
        raise DataError(
            f"{'; '.join(segments)}{more}: a window needs source.window.length {conf.length} + horizon "
            f"{conf.horizon} = {needed} steps of one series in one split; shorten the window or add rows"
        )
