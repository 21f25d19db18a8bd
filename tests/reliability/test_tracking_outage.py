"""MLflow server lost mid-run: a real `mlflow server` (sqlite store) is stopped after epoch 1 of a real 2-rank torchrun
training. Restarted on the same port and store a few seconds later, the run ends complete (every epoch's metrics,
the model registered); never restarted, training fails after `mlflow.outage_budget_s` with the tracking error."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import pytest

from dl.checkpoint import load_checkpoint
from jobs.tracking import MetricsBuffer, TrackingUnavailable, outage_reported
from jobs.train import rank_environment
from ports import free_port
from test_mlflow_server import mlflow_server
from test_training import _synthetic_run

ROOT = Path(__file__).resolve().parents[2]
PAUSED_TRAIN = Path(__file__).with_name("paused_train.py")
EPOCHS = 4
OUTAGE_S = 5
TIMEOUT_S = 300


@contextmanager
def paused_training(tmp_path: Path, url: str, budget_s: float) -> Iterator[subprocess.Popen]:
    """2 torchrun ranks of tests/reliability/paused_train.py against `url`; yields once epoch 1 is logged (the
    ranks then wait for `tmp_path/resume`). The whole process group is killed if the block fails."""
    config = _synthetic_run(tmp_path, [[60]] * 4, epochs=EPOCHS, seed=1)
    env = {**rank_environment(2), "PYTHONPATH": str(ROOT), "DLPIPE_PAUSED_MARKER": str(tmp_path / "paused"),
           "DLPIPE_RESUME_MARKER": str(tmp_path / "resume")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PAUSED_TRAIN),
               str(config), f"mlflow.tracking_uri={url}", f"mlflow.outage_budget_s={budget_s}"]
    with open(tmp_path / "training.log", "wb") as log:
        training = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (tmp_path / "paused").exists():
            assert training.poll() is None, f"training ended before epoch 1 was logged:\n{training_log(tmp_path)}"
            assert time.monotonic() < deadline, f"epoch 1 not logged in {TIMEOUT_S}s:\n{training_log(tmp_path)}"
            time.sleep(0.2)
        yield training
    except BaseException:
        os.killpg(training.pid, signal.SIGKILL)
        training.wait()
        raise


def training_log(tmp_path: Path) -> str:
    """The ranks' output for a failure message: from the first rank's crash report (faulthandler's stacks) if one
    crashed, else its end."""
    logged = (tmp_path / "training.log").read_text(errors="replace")
    crash = logged.find("Fatal Python error")
    return logged[crash:crash + 6000] if crash >= 0 else logged[-6000:]


def go_on_without_server(tmp_path: Path) -> None:
    """The server has stopped: let training continue (epochs 2.. are logged while it is down)."""
    (tmp_path / "resume").touch()


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_reach_the_run_when_it_returns(tmp_path):
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    with mlflow_server(store, port) as url, paused_training(tmp_path, url, budget_s=300) as training:
        pass  # leaving the block stops the server (SIGTERM, waited for) with training paused after epoch 1
    go_on_without_server(tmp_path)
    time.sleep(OUTAGE_S)
    with mlflow_server(store, port) as url:  # the same port and sqlite store
        assert training.wait(timeout=TIMEOUT_S) == 0, training_log(tmp_path)
        client = mlflow.MlflowClient(url)
        result = json.loads((tmp_path / "run" / "train_result.json").read_text())
        run = client.get_run(result["run_id"])
        version = client.get_model_version(result["model_name"], str(result["model_version"]))
        points = {key: sorted((m.step, m.value) for m in client.get_metric_history(result["run_id"], key))
                  for key in run.data.metrics}

    logged = training_log(tmp_path)
    assert re.search(r"MLflow tracking server http://127\.0\.0\.1:\d+ unreachable .* metrics of steps \[2\] buffered",
                     logged), logged
    assert "reachable again after" in logged
    assert run.info.status == "FINISHED"
    assert version.run_id == result["run_id"] and version.status == "READY"
    history = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["history"]
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    for key in history[0].keys() - {"epoch", "steps"}:  # every epoch's row, exactly as training produced it
        assert points[key] == [(row["epoch"], float(row[key])) for row in history], key
    assert run.data.metrics["test_accuracy"] == result["test_metrics"]["accuracy"]


@pytest.mark.slow
def test_an_outage_longer_than_the_budget_fails_with_the_tracking_error(tmp_path):
    budget_s = 4
    with mlflow_server(tmp_path) as url, paused_training(tmp_path, url, budget_s) as training:
        pass  # the server is gone for good
    with pytest.raises(TrackingUnavailable) as failure, outage_reported(tmp_path / "run"):  # what `dlpipe train` wraps
        go_on_without_server(tmp_path)
        code = training.wait(timeout=TIMEOUT_S)

    assert code != 0
    message = str(failure.value)
    shown = re.fullmatch(
        rf"MLflow tracking server {re.escape(url)} unreachable for (\d+)s, longer than mlflow.outage_budget_s=4; "
        r"metrics of steps \[2, 3, 4\] were not logged to run \w+: .*Connection refused.*", message)
    assert shown and int(shown[1]) >= budget_s, message
    logged = training_log(tmp_path)
    assert f"tracking unavailable: {message}" in logged  # rank 0's one-line reason
    assert "exitcode  : 5" in logged  # jobs.train's tracking code, as torchrun reports it
    assert not (tmp_path / "run" / "train_result.json").exists()


def test_an_unreachable_server_buffers_without_waiting_backs_off_and_fails_after_the_budget(caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: each attempt is refused at once
    metrics = MetricsBuffer(uri, "0" * 32, budget_s=1.0, first_retry_s=0.2, max_retry_s=0.4)
    with caplog.at_level(logging.WARNING, logger="dlpipe.tracking"):
        metrics.log({"train_loss": 0.5}, 1)  # refused: buffered, training goes on
        metrics.log({"train_loss": 0.4}, 2)  # no retry due yet: buffered without an attempt
        with pytest.raises(TrackingUnavailable, match=re.escape(
                f"longer than mlflow.outage_budget_s=1; metrics of steps [1, 2] were not logged to run {'0' * 32}")):
            metrics.drain()
    waits = re.findall(r"metrics of steps (\[[\d, ]+\]) buffered, next try in ([\d.]+)s", caplog.text)
    # Backoff: 0.2 s, doubled to 0.4 s, then capped at 0.4 s and at what is left of the 1 s budget.
    assert waits[:2] == [("[1]", "0.2"), ("[1, 2]", "0.4")] and all(float(wait) <= 0.4 for _, wait in waits[2:])
    assert len(metrics.pending) == 2
