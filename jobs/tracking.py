"""MLflow tracking that survives its server: fail fast when the store is unreachable at start; once training runs,
buffer its metrics through an outage and retry with backoff, failing clearly only after `mlflow.outage_budget_s`.
"""
from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from jobs.config import PipelineConfig, mask_secrets

log = logging.getLogger("dlpipe.tracking")
OUTAGE_FILE = "tracking_outage.txt"  # in run_dir: a rank's TrackingUnavailable, for the launcher's exit code


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking/registry store is unreachable or unusable."""


def require_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Check an http(s) server's /health, or that a sqlite store's folder can be created; raise if not."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {reason}")
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(f"MLflow sqlite store {uri}: cannot create {folder}: {exc}") from None


def use_experiment(cfg: PipelineConfig) -> str:
    """Point MLflow at the pipeline's store and experiment (created with its artifact location if missing)."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        mlflow.create_experiment(cfg.experiment_name, artifact_location=cfg.artifact_location)
    return mlflow.set_experiment(cfg.experiment_name).experiment_id


def log_config(cfg: PipelineConfig, sections: Collection[str] | None = None) -> None:
    """On the active run: the config (its `sections`, or all of it) as params, and the whole of it as `config.yaml`.

    A value longer than MLflow keeps in a param (a wide table's `source.columns`) would be cut short with a
    warning; its param says where the value is instead.
    """
    params = {key: value for key, value in cfg.as_params().items() if sections is None or key.split(".")[0] in sections}
    mlflow.log_params({key: value if len(str(value)) <= MAX_PARAM_VAL_LENGTH
                       else f"({len(str(value))} characters: see config.yaml)" for key, value in params.items()})
    mlflow.log_text(cfg.to_yaml(), "config.yaml")


@contextmanager
def single_attempt(timeout_s: int = 10) -> Iterator[None]:
    """MLflow HTTP calls inside the block try once (no built-in retries, `timeout_s` each): the caller backs off."""
    names = (MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, MLFLOW_HTTP_REQUEST_TIMEOUT.name)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({names[0]: "0", names[1]: str(timeout_s)})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MetricsBuffer:
    """Per-epoch metrics of one run at `uri`, sent in order; kept and retried with backoff while it is unreachable.

    `log` never waits for the server: an epoch's metrics that cannot be sent stay buffered (with their original
    timestamps) and go out with a later call once a retry is due. `drain` waits, backing off, until all are sent.
    An outage longer than `budget_s` raises TrackingUnavailable (the run is ended locally, without the server).
    """

    def __init__(self, uri: str, run_id: str, budget_s: float, first_retry_s: float = 1.0, max_retry_s: float = 10.0):
        self.uri, self.run_id, self.budget_s = mask_secrets(uri), run_id, budget_s
        self.first_retry_s, self.max_retry_s = first_retry_s, max_retry_s
        self.client = mlflow.MlflowClient(uri)
        self.pending: list[Metric] = []
        self.down_since: float | None = None
        self.retry_s = first_retry_s
        self.next_try = 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffer one step's metrics and send everything buffered if the server is (or may again be) reachable."""
        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        if time.monotonic() >= self.next_try:
            self._send()

    def drain(self) -> None:
        """Block until every buffered metric is in the run, retrying with backoff; raise after the budget."""
        while self.pending:
            time.sleep(max(0.0, self.next_try - time.monotonic()))
            self._send()

    def _send(self) -> None:
        try:
            with single_attempt():
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                    del self.pending[:1000]
        except MlflowException as exc:
            if exc.get_http_status_code() < 500:
                raise  # the server answered and refused the metrics: not an outage
            self._unreachable(exc)
            return
        if self.down_since is not None:
            log.info("MLflow tracking server reachable again after %.0fs; buffered metrics sent",
                     time.monotonic() - self.down_since)
        self.down_since, self.retry_s, self.next_try = None, self.first_retry_s, 0.0

    def _unreachable(self, exc: MlflowException) -> None:
        now = time.monotonic()
        self.down_since = self.down_since if self.down_since is not None else now
        steps = sorted({metric.step for metric in self.pending})
        if now - self.down_since >= self.budget_s:
            self._end_run_locally()
            raise TrackingUnavailable(
                f"MLflow tracking server {self.uri} unreachable for {now - self.down_since:.0f}s, longer than "
                f"mlflow.outage_budget_s={self.budget_s:g}; metrics of steps {steps} were not logged to run "
                f"{self.run_id}: {str(exc).splitlines()[0]}"
            ) from None
        wait = min(self.retry_s, self.down_since + self.budget_s - now)
        log.warning("MLflow tracking server %s unreachable (%.0fs so far); %d metrics of steps %s buffered, "
                    "next try in %.1fs", self.uri, now - self.down_since, len(self.pending), steps, wait)
        self.next_try, self.retry_s = now + wait, min(2 * self.retry_s, self.max_retry_s)

    def _end_run_locally(self) -> None:
        """Leave the active run (if it is ours) with one attempt to mark it FAILED, so no later call waits on it."""
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            return
        with single_attempt(timeout_s=2):
            try:
                mlflow.end_run("FAILED")  # pops the run first: leaving `with start_run()` then calls nothing
            except MlflowException:
                pass


def record_outage(run_dir: Path, exc: TrackingUnavailable) -> None:
    """Leave a rank's TrackingUnavailable where the launcher finds it (`outage_reported`)."""
    (run_dir / OUTAGE_FILE).write_text(str(exc))


@contextmanager
def outage_reported(run_dir: Path) -> Iterator[None]:
    """Around a training launch: raise the TrackingUnavailable a rank recorded, so the job exits with the tracking
    code (torchrun itself exits 1 whatever its ranks returned)."""
    recorded = run_dir / OUTAGE_FILE
    recorded.unlink(missing_ok=True)
    yield
    if recorded.is_file():
        raise TrackingUnavailable(recorded.read_text())
