"""Schema drift between training and scoring inputs: the columns a job reads, checked against the input's schema.

The check needs only the schema (Spark reads the Parquet footers), so a missing, renamed or retyped column fails
before any job reads a row, naming the column, the type expected and the type found. An input path that does not
exist or holds no Parquet file fails before Spark is asked to read it.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Mapping

from pyspark.sql.types import StructType

from pipelines.errors import DataError

# Spark type names (`simpleString`) a scorer accepts per column of the dataset contract (docs/architecture.md)
KEY_TYPES = ("string", "int", "bigint")
NUMERIC_ARRAY_TYPES = ("array<float>", "array<double>")  # raw features; the dataset writes array<float>
LABEL_TYPES = ("int", "bigint", "string")  # a class index, or a class name
TARGET_TYPES = ("float", "double", *NUMERIC_ARRAY_TYPES)
_GLOB = re.compile(r"[*?[]")  # what makes a path a pattern, for Spark and for Python's glob


def check_parquet_input(path: str | Path, what: str) -> None:
    """DataError naming `what` and `path` unless `path` (or what its `*`, `?`, `[...]` glob matches, as Spark
    expands it) is a file or a folder with a Parquet file below it (names starting with `_` or `.` skipped, as Spark
    skips them). A path with Hadoop's `{a,b}` alternatives is left to Spark."""
    text = str(path)
    if "{" in text:
        return
    pattern = _GLOB.search(text) is not None
    matched = [Path(p) for p in glob.glob(text)] if pattern else [Path(text)]
    if not any(root.exists() for root in matched):
        raise DataError(f"{what} {text} {'matches no file or folder' if pattern else 'does not exist'}")
    if not any(root.is_file() or _holds_parquet(root) for root in matched):
        raise DataError(f"{what} {text} holds no Parquet file")


def pattern_root(path: str | Path) -> Path:
    """The folder a path pattern stays inside: `path` up to the first part holding a glob (`*?[{`)."""
    parts = Path(path).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB.search(part) or "{" in part), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")


def _holds_parquet(root: Path) -> bool:
    visible = lambda p: not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts)  # noqa: E731
    return any(visible(p) for p in root.rglob("*.parquet"))


def check_columns(
    schema: StructType,
    required: Mapping[str, tuple[str, ...]],
    source: str | Path,
    optional: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """DataError unless every `required` column (name -> accepted Spark types) is in `schema` with an accepted
    type; `optional` columns are checked only when present. The message names `source`, the column, the types."""
    found = {field.name: field.dataType.simpleString() for field in schema}
    listing = ", ".join(f"{name}: {kind}" for name, kind in found.items())
    for name, accepted in {**required, **(optional or {})}.items():
        if name not in found:
            if name in required:
                raise DataError(f"{source}: column '{name}' ({' or '.join(accepted)}) is missing; found {listing}")
        elif found[name] not in accepted:
            raise DataError(f"{source}: column '{name}' has type {found[name]}, expected {' or '.join(accepted)}")

