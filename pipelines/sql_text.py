"""Spark SQL text for expressions that grow with the number of columns.

Built as `Column` objects, every operation is a py4j call to the JVM (0.1-0.6 ms each): a 300-column table's
checks took 75,000 of them. Written as SQL text, such an expression is one call, parsed in the JVM into the same
plan (BENCHMARKS.md, wide tables). Declared columns are named as written here too (`name`, `column`).
"""
from __future__ import annotations

import math

from pyspark.sql import Column
from pyspark.sql import functions as F


def name(*parts: str) -> str:
    """A column, or a field of a struct column, as a quoted identifier: name("a", "b") is `a`.`b`."""
    return ".".join("`" + part.replace("`", "``") + "`" for part in parts)


def column(*parts: str) -> Column:
    """The column named as written (a dot, backtick or quote is part of the name, never a struct field path)."""
    return F.col(name(*parts))


def literal(value: str | float | int | bool | None) -> str:
    """A Python value as a SQL literal of the type `F.lit` gives it (a float is a double, NaN and infinities too)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and not math.isfinite(value):
        return f"CAST('{value!r}' AS DOUBLE)"
    if isinstance(value, (int, float)):  # a negative number in parentheses: `x - -1` is no `--` comment by accident
        number = f"{value!r}D" if isinstance(value, float) else str(value)
        return f"({number})" if number.startswith("-") else number
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no SQL literal for {value!r} ({type(value).__name__})")


def case(*branches: tuple[str, str], otherwise: str | None = None) -> str:
    """CASE WHEN condition THEN value ... [ELSE otherwise] END, the first condition that holds giving the value."""
    whens = " ".join(f"WHEN {condition} THEN {value}" for condition, value in branches)
    return f"CASE {whens}{f' ELSE {otherwise}' if otherwise is not None else ''} END"


def call(function: str, *arguments: str) -> str:
    """function(argument, ...)."""
    return f"{function}({', '.join(arguments)})"


def struct(values: dict[str, str]) -> str:
    """A struct of the named values (SQL text of each)."""
    return call("named_struct", *[part for key, value in values.items() for part in (literal(key), value)])


def json_object(values: dict[str, str]) -> str:
    """A JSON object text of the named values, as `F.to_json(F.struct(...))` writes it."""
    return call("to_json", struct(values))
