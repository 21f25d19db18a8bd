"""DataFrames kept for the passes that read them more than once, and released when those passes are done."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from pyspark import StorageLevel
from pyspark.sql import DataFrame

from pipelines.atomic import scratch_directory

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


@contextmanager
def kept_as_parquet(df: DataFrame, scratch: Path, dictionary: Sequence[str] = ()) -> Iterator[DataFrame]:
    """`df` computed now into Parquet in a scratch folder next to `scratch`, and read back from it for the `with`
    block; the folder is removed after.

    For a wide input that many passes read: each pass reads only the columns it uses (a cache block is read whole).
    Only the `dictionary` columns (few distinct values) are dictionary-encoded; trying it on every column of
    numbers was the costliest part of writing them (BENCHMARKS.md, ETL floors).
    """
    spark = df.sparkSession
    with scratch_directory(scratch) as folder:
        writer = df.write.option("parquet.enable.dictionary", "false")
        for column in dictionary:
            writer = writer.option(f"parquet.enable.dictionary#{column}", "true")
        writer.parquet(str(folder))
        yield spark.read.schema(df.schema).parquet(str(folder))  # no inference: an empty one reads too
