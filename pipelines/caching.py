"""DataFrames kept for the passes that read them more than once, and released when those passes are done."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from pyspark import StorageLevel
from pyspark.sql import DataFrame

# Inputs reused by several passes are kept on disk, not in the heap: an in-memory cache of 10M checked rows ran
# a 1 GiB driver out of heap (tests/reliability/test_load.py); on disk it leaves execution the heap.
ON_DISK = StorageLevel.DISK_ONLY


@contextmanager
def cached(df: DataFrame, level: StorageLevel = ON_DISK) -> Iterator[DataFrame]:
    """`df` persisted at `level` (computed by the first pass that reads it) for the `with` block; released after."""
    df = df.persist(level)
    try:
        yield df
    finally:
        df.unpersist()


@contextmanager
def materialized(df: DataFrame) -> Iterator[tuple[DataFrame, int]]:
    """(`df` computed now and kept, its row count) for the `with` block, for a small result that later queries join:
    once computed, Spark knows its real size and broadcasts it rather than shuffle the other side."""
    with cached(df, StorageLevel.MEMORY_AND_DISK) as rows:
        yield rows, rows.count()
