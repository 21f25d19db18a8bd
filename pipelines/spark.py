"""The one place a SparkSession is built, from the pipeline's `spark:` config."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from jobs.config import SparkConf

# The JVM does not JIT-compile a method over 8000 bytes of bytecode; the code Spark generates to check a wide
# table's rows (every column's checks in one method) is bigger, and ran interpreted, at about half the speed.
JIT_HUGE_METHODS = "-XX:-DontCompileHugeMethods"


def spark_session(conf: SparkConf, app_name: str) -> SparkSession:
    """Get or create the SparkSession for a stage; executors use this interpreter unless told otherwise."""
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
        .config("spark.driver.extraJavaOptions", JIT_HUGE_METHODS)  # only where this process starts the JVM
        .config("spark.executor.extraJavaOptions", JIT_HUGE_METHODS)
    )
    for key, value in conf.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
