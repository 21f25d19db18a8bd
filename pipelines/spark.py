"""The one place a SparkSession is built, from the pipeline's `spark:` config, and helpers around one: scoped settings,
placing rows in partitions, the short reason of a Spark-wrapped error."""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import ContextManager, Iterator

from pyspark.errors import PySparkRuntimeError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.config import ConfigError, SparkConf
from jobs.termination import reclaim_sigint
from pipelines.spark_progress import report_progress

# The JVM does not JIT-compile a method over 8000 bytes of bytecode unless told to (below); a much bigger one it
# cannot compile at all, and a big compiled one it optimizes poorly.
JIT_HUGE_METHODS = "-XX:-DontCompileHugeMethods"
HUGE_METHOD_LIMIT = "spark.sql.codegen.hugeMethodLimit"


def spark_session(conf: SparkConf, app_name: str) -> SparkSession:
    """Get or create the SparkSession for a stage; executors use this interpreter unless told otherwise. While its
    jobs run, their stages' progress is logged every `conf.progress_seconds` (`pipelines/spark_progress.py`)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .master(conf.master)
        .config("spark.driver.memory", conf.driver_memory)
        .config("spark.sql.shuffle.partitions", str(conf.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        # a date or time that does not match its column's format is null (quarantined), never a SparkUpgradeException
        # because Java's old parser would have read it
        .config("spark.sql.legacy.timeParserPolicy", "CORRECTED")
        # Kept DataFrames (pipelines/caching.py) live on local disk: encoding them column by column cost more to
        # build (a dictionary of every value of every column, batch after batch) than it saved to read back.
        .config("spark.sql.inMemoryColumnarStorage.compressed", "false")
        .config("spark.driver.extraJavaOptions", JIT_HUGE_METHODS)  # only where this process starts the JVM
        .config("spark.executor.extraJavaOptions", JIT_HUGE_METHODS)
    )
    for key, value in conf.conf.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except PySparkRuntimeError as exc:
        if exc.getErrorClass() != "JAVA_GATEWAY_EXITED":
            raise
        raise ConfigError(f"Spark did not start (spark.master {conf.master}, spark.driver_memory {conf.driver_memory}"
                          f"{', spark.conf ' + str(conf.conf) if conf.conf else ''}): the JVM's own error is above; "
                          f"is Java 17 on the PATH or JAVA_HOME?") from None
    reclaim_sigint()  # Ctrl-C stops the job as SIGTERM does, not through PySpark's own handler
    spark.sparkContext.setLogLevel("ERROR")
    report_progress(spark.sparkContext, conf.progress_seconds)
    return spark


def error_reason(exc: BaseException) -> str:
    """A short reason from an exception whose text may be a whole Spark-wrapped Python traceback (a worker's or a
    barrier task's): the innermost `SomeError: message` in it, else the exception's type and first line."""
    text = str(exc)
    raised = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    if raised:
        kind, message = raised[-1]  # the innermost error a Python worker raised
        return f"{kind.rsplit('.', 1)[-1]}: {message.strip()}"[:1000]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:1000]


@contextmanager
def session_setting(spark: SparkSession, key: str, value: str) -> Iterator[None]:
    """The SQL setting `key` is `value` within the block, and what it was before after it."""
    before = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def small_generated_methods(spark: SparkSession) -> ContextManager[None]:
    """Within the block, a query part whose generated code would be one method over 8000 bytes runs as one smaller
    generated method per operator instead (the setting Spark's configuration guide recommends for HotSpot).

    For the wide-table checks: as one method they took 42 KB of bytecode, which the JVM ran in its interpreter
    (2-3x slower). Not the session default: a scaler's or a writer's big method ran faster compiled whole.
    Set it while a DataFrame is both kept (`persist` plans it, in a copy of the session's settings) and first run.
    """
    return session_setting(spark, HUGE_METHOD_LIMIT, "8000")


def in_partitions(rows: DataFrame, index: str, partitions: int) -> DataFrame:
    """`rows` in `partitions` partitions, a row whose int column `index` is i in partition i (0 <= i < partitions).

    `repartition(partitions, index)` hashes the index itself, so it sends two values to one partition and none to
    another; here each value is replaced by a key that Spark's hash partitioning (Murmur3 of the key, modulo the
    partitions) sends to partition i, found by Spark's own `hash`.
    """
    keys = _partition_keys(rows.sparkSession, partitions)
    key = F.element_at(F.array(*[F.lit(k).cast("int") for k in keys]), (F.col(index) + 1).cast("int"))
    return rows.repartition(partitions, key)


def _partition_keys(spark: SparkSession, partitions: int) -> list[int]:
    """For each partition i, the smallest int key that `repartition(partitions, key)` sends to partition i."""
    keys: dict[int, int] = {}
    candidates = 64 * partitions  # a partition is missed with probability ~ e^-64 per partition
    while len(keys) < partitions:
        hashed = spark.range(candidates).selectExpr("CAST(id AS INT) AS key").selectExpr(
            "key", f"pmod(hash(key), {partitions}) AS partition").collect()
        keys = {}
        for key, partition in hashed:
            keys.setdefault(partition, key)
        candidates *= 4
    return [keys[i] for i in range(partitions)]
