"""A real `mlflow server` (sqlite backend, proxied local artifacts) on 127.0.0.1, used over http://:
register -> promote (with its Spark smoke test) -> score `models:/NAME@champion` with Spark."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest

from dl.serving import load_scoring_model
from jobs.promote import run_promote
from pipelines.scoring import score_parquet
from ports import free_port
from registry_helpers import expected, network, pipeline_config, raw_rows, register, scaler, tracking, write_dataset

NAME = "server-cnn"
STARTUP_TIMEOUT_S = 90


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[str]:
    """Run `mlflow server` (on `port`, or a free one) until the block ends; yield its http URL. Its log is printed
    if the block fails; the store under `root` outlives it, so a second server on the same port continues it."""
    port, log_path = port or free_port(), root / "mlflow-server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner needed
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        # Its own session: the server forks uvicorn workers, and the whole group is stopped at the end.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {server.returncode}" if server.poll() is not None else "not healthy in time"
                raise RuntimeError(f"mlflow server {state}; its log:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.5)
        try:
            yield url
        except BaseException:
            print(f"--- mlflow server log ({log_path}) ---\n{log_path.read_text(errors='replace')}")
            raise
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it has not gone within 15 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


@pytest.mark.slow
def test_register_promote_and_score_through_a_real_mlflow_server(spark, tmp_path, monkeypatch):
    started = time.monotonic()
    temp = tmp_path / "temp"  # over http, mlflow downloads to a fresh temp folder it never removes
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with mlflow_server(tmp_path) as url, tracking(url):
        cfg = pipeline_config(tmp_path, "server-test", NAME, mlflow={"tracking_uri": url, "registered_model": NAME},
                              promote={"smoke_rows": 8})
        raw = raw_rows(30, seed=11)
        ids = write_dataset(cfg.dataset_dir / "split=test", raw, files=2)
        experiment = mlflow.create_experiment("server-test")  # artifacts go through the server's proxy
        assert mlflow.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")
        fitted = scaler()
        net = network(cfg, fitted, seed=3)
        version = register(cfg, net, fitted, experiment, {"test_accuracy": 0.93})

        decision = run_promote(cfg)
        assert (decision["decision"], decision["candidate_version"], decision["smoke_test"]) == (
            "promoted", "1", "passed"
        )
        tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
        assert (tags["promotion.decision"], tags["promotion.candidate_value"]) == ("promoted", "0.93")

        output = tmp_path / "predictions"
        result = score_parquet(spark, f"models:/{NAME}@champion", cfg.dataset_dir / "split=test", output)
        assert result == {"rows_in": 30, "rows_out": 30, "model_name": NAME, "model_version": "1"}
        predictions = pd.read_parquet(output).set_index("id").loc[ids]
        assert set(predictions["model_name"]) == {NAME} and set(predictions["model_version"]) == {"1"}
        assert set(predictions["model_run_id"]) == {version.run_id}
        np.testing.assert_array_equal(predictions["prediction"].to_numpy(), expected(net, fitted, raw)[0])
        load_scoring_model(f"models:/{NAME}@champion")  # what each Spark worker does, in its own process
        assert list(temp.iterdir()) == [], "a scheduled job would leave these behind on every run"
    print(f"mlflow server flow took {time.monotonic() - started:.1f}s")
