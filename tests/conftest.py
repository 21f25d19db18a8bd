"""Shared fixtures: one real local Spark session for the whole test run, and MLflow's process-wide state reset
after every test."""
from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking import fluent
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from jobs.config import SparkConf
from pipelines.spark import spark_session

# Set by mlflow.set_tracking_uri / set_registry_uri / set_experiment for subprocesses to inherit.
MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                    "MLFLOW_RUN_ID")


@pytest.fixture(scope="session")
def spark():
    """A real local[2] SparkSession, shared by every test (starting one costs seconds)."""
    session = spark_session(SparkConf(master="local[2]", driver_memory="1g", shuffle_partitions=4), "dlpipe-tests")
    yield session
    session.stop()


def _mlflow_state() -> tuple:
    return (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id,
            {name: os.environ.get(name) for name in MLFLOW_VARIABLES})


def _restore_mlflow_state(state: tuple) -> None:
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id = state[:3]
    for name, value in state[3].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", autouse=True)
def module_mlflow_state():
    """What a module's fixtures set (they may run a stage for all its tests) ends with the module."""
    state = _mlflow_state()
    yield
    _restore_mlflow_state(state)


@pytest.fixture(autouse=True)
def isolated_mlflow_state(module_mlflow_state):
    """Stages point MLflow at their pipeline's store and experiment process-wide (right for a job). In a test
    process that would send later tests' clients, runs and subprocesses to this test's store: each test ends with
    the settings it started with (and each module with those it started with)."""
    state = _mlflow_state()
    yield
    _restore_mlflow_state(state)
