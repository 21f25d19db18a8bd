"""Sliding windows over time series with Spark window functions, per series and split: none crosses a boundary.

A window ending at step t holds the `length` steps t-L+1..t (inputs) and the `horizon` steps t+1..t+H (target),
all of one series and one split; windows start every `stride` steps from the first step of each (series, split).
A series with fewer than `length + horizon` steps in a split it appears in would give that split no window of it:
that is a DataError naming the series, the split and its length (its steps would otherwise be lost silently).
"""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from jobs.config import WindowConf
from pipelines.errors import DataError

SHOWN_SHORT_SERIES = 5  # how many too-short (series, split) segments the error lists


def sliding_windows(
    steps: DataFrame, conf: WindowConf, time_col: str, series_col: str | None, target_col: str
) -> DataFrame:
    """One row per complete window: `id` (its last input step's), `split`, `features` and `raw_features` (the steps'
    arrays concatenated time-major, L x n_inputs) and `target` (the next H values of `target_col`)."""
    check_series_fit_windows(steps, conf, series_col)
    order = Window.partitionBy(*([series_col] if series_col else []), "split").orderBy(time_col)
    past = order.rowsBetween(1 - conf.length, Window.currentRow)
    ahead = order.rowsBetween(1, conf.horizon)
    windows = steps.select(
        "id",
        "split",
        F.flatten(F.collect_list("features").over(past)).alias("features"),
        F.flatten(F.collect_list("raw_features").over(past)).alias("raw_features"),
        F.collect_list(F.col(target_col).cast("float")).over(ahead).alias("target"),
        (F.row_number().over(order) - conf.length).alias("start"),  # position of the window's first step
    )
    complete = (F.col("start") >= 0) & (F.col("start") % conf.stride == 0) & (F.size("target") == conf.horizon)
    return windows.where(complete).drop("start")


def check_series_fit_windows(steps: DataFrame, conf: WindowConf, series_col: str | None) -> None:
    """DataError naming each series (and split) with fewer steps than one window needs (`length + horizon`)."""
    needed = conf.length + conf.horizon
    keys = [series_col] if series_col else []
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
