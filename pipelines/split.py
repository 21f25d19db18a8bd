"""Deterministic, seeded, stratified train/val/test split by a hash of each row's key."""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from jobs.config import SplitConf

SPLITS = ("train", "val", "test")


def _boundary(rows: Column, fraction: float) -> Column:
    """How many of `rows` fall before a cut at `fraction`, rounded half up (at most half a row off)."""
    return F.floor(rows * F.lit(fraction) + F.lit(0.5))


def assign_split(df: DataFrame, key_col: str, label_col: str, conf: SplitConf) -> DataFrame:
    """Add `split` (train/val/test): rows ordered by a seeded hash of the key, cut at the configured fractions.

    With `stratify` each label is cut on its own, so every class gets its proportions to within one row.
    The order depends only on (seed, key), never on input order or partitioning; keys must be unique.
    """
    group = [F.col(label_col)] if conf.stratify else []
    ordered = Window.partitionBy(*group).orderBy(F.xxhash64(F.lit(conf.seed), F.col(key_col)), F.col(key_col))
    position = F.row_number().over(ordered) - 1
    rows = F.count(F.lit(1)).over(Window.partitionBy(*group))
    split = (
        F.when(position < _boundary(rows, conf.train), "train")
        .when(position < _boundary(rows, conf.train + conf.val), "val")
        .otherwise("test")
    )
    return df.withColumn("split", split)
