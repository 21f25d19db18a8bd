"""Shared fixtures: one real local Spark session for the whole test run."""
from __future__ import annotations

import pytest

from jobs.config import SparkConf
from pipelines.spark import spark_session


@pytest.fixture(scope="session")
def spark():
    """A real local[2] SparkSession, shared by every test (starting one costs seconds)."""
    session = spark_session(SparkConf(master="local[2]", driver_memory="1g", shuffle_partitions=4), "dlpipe-tests")
    yield session
    session.stop()
