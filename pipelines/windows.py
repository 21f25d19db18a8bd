"""Sliding windows over time series with Spark window functions, per series and split: none crosses a boundary.

A window ending at step t holds the `length` steps t-L+1..t (inputs) and the `horizon` steps t+1..t+H (target),
all of one series and one split; windows start every `stride` steps from the first step of each (series, split).
"""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from jobs.config import WindowConf


def sliding_windows(
    steps: DataFrame, conf: WindowConf, time_col: str, series_col: str | None, target_col: str
) -> DataFrame:
    """One row per complete window: `id` (its last input step's), `split`, `features` and `raw_features` (the steps'
    arrays concatenated time-major, L x n_inputs) and `target` (the next H values of `target_col`)."""
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
