"""The data-quality report (`quality.json`): null rates, numeric ranges and label balance, in one aggregation pass."""
from __future__ import annotations

from typing import Collection

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import NumericType

from pipelines import sql_text as sql
from pipelines.spark_progress import spark_step
from pipelines.split import SPLITS

QUALITY_NAME = "quality.json"


def _aggregates(columns: list[str], numeric: set[str], never_null: set[str], classes: list[str]) -> dict[str, str]:
    """The per-split aggregates by name, as SQL text."""
    aggregates = {"rows": "count(1)"}
    for i, name in enumerate(columns):
        if name not in never_null:
            aggregates[f"nulls{i}"] = f"count_if({sql.name(name)} IS NULL)"
        if name in numeric:
            value = f"CAST({sql.name(name)} AS DOUBLE)"
            aggregates |= {f"min{i}": f"min({value})", f"max{i}": f"max({value})", f"sum{i}": f"sum({value})"}
    return aggregates | {f"class{k}": f"count_if({sql.name('label')} = {k})" for k in range(len(classes))}


def _column_stats(per_split: dict, i: int, numeric: bool, counted_nulls: bool) -> dict:
    """One column's statistics over the given per-split aggregate rows."""
    rows = sum(r["rows"] for r in per_split.values())
    nulls = sum(r[f"nulls{i}"] for r in per_split.values()) if counted_nulls else 0
    stats = {"null_rate": nulls / rows if rows else None}
    if numeric:
        present = [r for r in per_split.values() if r[f"min{i}"] is not None]
        values = rows - nulls
        stats |= {
            "min": min((r[f"min{i}"] for r in present), default=None),
            "max": max((r[f"max{i}"] for r in present), default=None),
            "mean": sum(r[f"sum{i}"] for r in present) / values if values else None,
        }
    return stats


@spark_step("quality report")
def quality_report(rows: DataFrame, columns: list[str], classes: list[str], never_null: Collection[str] = ()) -> dict:
    """Per column (overall and per split) null rate, and min/max/mean of numbers; rows and label balance per split.

    `rows` are the clean, split rows (with `split`, and the int `label` when `classes` is not empty). Nulls are not
    counted in the `never_null` columns (the checks let a row through only with a value there): their rate is 0.
    """
    numeric = {f.name for f in rows.schema if f.name in columns and isinstance(f.dataType, NumericType)}
    never_null = set(never_null)
    aggregates = _aggregates(columns, numeric, never_null, classes)
    # one struct of every aggregate, built in one py4j call however many columns there are
    found = rows.groupBy("split").agg(F.expr(sql.struct(aggregates)).alias("found")).collect()  # one row per split
    per_split = {row["split"]: row["found"] for row in found}
    scopes = {"all": per_split, **{split: {split: per_split[split]} for split in SPLITS if split in per_split}}
    return {
        "rows": {scope: sum(r["rows"] for r in rows_of.values()) for scope, rows_of in scopes.items()},
        "columns": {
            name: {scope: _column_stats(rows_of, i, name in numeric, name not in never_null)
                   for scope, rows_of in scopes.items()}
            for i, name in enumerate(columns)
        },
        "label_balance": {
            split: {name: row[f"class{k}"] for k, name in enumerate(classes)} for split, row in sorted(per_split.items())
        } if classes else {},
    }


def reported_balance(report: dict, classes: list[str]) -> dict[str, dict[str, int]]:
    """Per split, class name -> rows, from a report (as `dataset.class_balance` counts them: classes without rows
    left out, unlabelled rows under '')."""
    if classes:
        return {split: {name: rows for name, rows in report["label_balance"].get(split, {}).items() if rows}
                for split in SPLITS}
    return {split: {"": report["rows"][split]} if split in report["rows"] else {} for split in SPLITS}
