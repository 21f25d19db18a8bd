"""Checked rows -> clean rows + quarantine: a row with a `reason` is quarantined, counted and never dropped."""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F


def is_quarantined() -> Column:
    """True for a checked row that goes to the quarantine."""
    return F.col("reason").isNotNull()


def quarantine_rows(checked: DataFrame) -> DataFrame:
    """The rows that could not go into the dataset: `source_file`, `record` (what could be read), `reason`."""
    return checked.where(is_quarantined()).select("source_file", "record", "reason")


def row_counts(is_clean: Column) -> list[Column]:
    """`rows_in`, `rows_clean`, `rows_quarantined` as aggregates; each is counted on its own, so they can disagree."""
    return [
        F.count(F.lit(1)).alias("rows_in"),
        F.count_if(is_clean).alias("rows_clean"),
        F.count_if(is_quarantined()).alias("rows_quarantined"),
    ]
