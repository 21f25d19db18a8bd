"""The one place a SparkSession is built, from the pipeline's `spark:` config."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from jobs.config import SparkConf


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
    )
    for key, value in conf.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
