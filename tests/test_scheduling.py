"""Scheduled operation: skip when unchanged, rerun after a change, kill safety, the lock, and exit codes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from jobs.cli import EXIT_DATA, EXIT_LOCKED, EXIT_PROMOTION, EXIT_TRACKING, EXIT_TRAINING
from jobs.config import load_config
from jobs.run import run_stages
from jobs.state import marker_path, pipeline_lock, read_marker
from jobs.termination import EXIT_TERMINATED
from test_etl import write_class_folders

DIGITS = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, list[str]]:
    """A small image folder and overrides pointing the digits config at it and at a fresh run_dir."""
    root = tmp_path_factory.mktemp("scheduling")
    write_class_folders(root / "raw", {"a": 14, "b": 14, "c": 14})
    overrides = [
        f"source.path={root / 'raw'}", f"run_dir={root / 'run'}", "output.files_per_split=2",
        "spark.master=local[2]", "model.channels=[4]", "model.hidden=8", "train.epochs=1",
    ]
    return root, overrides


def dlpipe(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finished(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def test_unchanged_stage_is_skipped_and_a_change_reruns_it(pipeline, spark):
    root, overrides = pipeline
    cfg = load_config(DIGITS, overrides)
    first = run_stages(DIGITS, overrides, only="etl")["etl"]
    again = run_stages(DIGITS, overrides, only="etl")["etl"]
    assert again == first  # skipped: the marker (and its finish time) is untouched

    reseeded = run_stages(DIGITS, [*overrides, "split.seed=7"], only="etl")["etl"]
    assert reseeded["fingerprint"] != first["fingerprint"] and reseeded["finished_at"] > first["finished_at"]

    unrelated = run_stages(DIGITS, [*overrides, "split.seed=7", "score.batch_size=7"], only="etl")["etl"]
    assert unrelated == reseeded  # a section the ETL does not read does not redo it

    write_class_folders(root / "more", {"a": 1})
    (root / "more" / "a" / "000.png").rename(root / "raw" / "a" / "new.png")
    grown = run_stages(DIGITS, [*overrides, "split.seed=7"], only="etl")["etl"]
    assert grown["finished_at"] > reseeded["finished_at"]
    assert grown["summary"]["counts"]["rows_in"] == first["summary"]["counts"]["rows_in"] + 1
    assert read_marker(cfg, "etl") == grown


def test_rerunning_a_stage_clears_the_markers_after_it(pipeline, spark):
    _, overrides = pipeline
    cfg = load_config(DIGITS, overrides)
    marker_path(cfg, "train").write_text(json.dumps({"fingerprint": "stale", "summary": {}}))
    run_stages(DIGITS, overrides, only="etl", force=True)
    assert read_marker(cfg, "etl") is not None
    assert read_marker(cfg, "train") is None


def test_stage_killed_mid_write_is_not_marked_complete_and_is_redone(pipeline, spark):
    root, overrides = pipeline
    cfg = load_config(DIGITS, overrides)
    run_stages(DIGITS, overrides, only="etl", force=True)
    before = read_marker(cfg, "etl")
    process = dlpipe("etl", str(DIGITS), *overrides, "split.seed=11", cwd=root)
    deadline = time.monotonic() + 300
    while not list(cfg.run_dir.glob(".dataset.tmp-*")):  # Spark is writing the new dataset
        assert process.poll() is None and time.monotonic() < deadline, "ETL ended before it started writing"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert read_marker(cfg, "etl") is None  # cleared when the stage started, never written: not complete
    redone = run_stages(DIGITS, overrides, only="etl")["etl"]
    assert redone["fingerprint"] == before["fingerprint"] and redone["finished_at"] > before["finished_at"]
    assert not list(cfg.run_dir.glob(".dataset.tmp-*"))  # the killed writer's staging folder is gone


def _terminated(process: subprocess.Popen, number: int = signal.SIGTERM) -> tuple[int, str, list[psutil.Process]]:
    """Signal `process` as a scheduler would (the process alone, not its group): (exit code, stderr, the processes
    it had started that are still there a few seconds after it exited)."""
    children = psutil.Process(process.pid).children(recursive=True)  # the JVM, or torchrun and its ranks
    process.send_signal(number)
    code, err = finished(process)
    _, alive = psutil.wait_procs(children, timeout=15)
    return code, err, alive


def _last_run(cfg, stage: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`dlpipe.stage` = '{stage}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    return run


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])  # scheduler, Ctrl-C
def test_a_stop_signal_during_the_etl_write_ends_its_run_and_leaves_nothing_behind(pipeline, spark, number):
    root, overrides = pipeline
    cfg = load_config(DIGITS, overrides)
    run_stages(DIGITS, overrides, only="etl", force=True)
    process = dlpipe("etl", str(DIGITS), *overrides, "split.seed=13", cwd=root)
    deadline = time.monotonic() + 300
    while not list(cfg.run_dir.glob(".dataset.tmp-*")):  # Spark is writing the new dataset
        assert process.poll() is None and time.monotonic() < deadline, "ETL ended before it started writing"
        time.sleep(0.02)
    code, err, alive = _terminated(process, number)
    assert code == 128 + number, err  # 143, 130
    assert err.strip().splitlines()[-1] == f"dlpipe: terminated: stopped by {signal.Signals(number).name}"
    assert alive == []  # its Spark JVM went with it
    assert read_marker(cfg, "etl") is None
    assert not list(cfg.run_dir.glob(".dataset.tmp-*")) and not list(cfg.run_dir.glob(".checked.tmp-*"))
    assert _last_run(cfg, "etl").info.status == "FAILED"  # not RUNNING forever
    with pipeline_lock(cfg):  # released
        pass


@pytest.mark.slow
def test_sigterm_during_training_stops_every_rank_and_marks_the_run_killed(pipeline, spark):
    root, overrides = pipeline
    cfg = load_config(DIGITS, overrides)
    run_stages(DIGITS, overrides, only="etl")
    run_id_file = cfg.checkpoint_dir / "mlflow_run_id"
    run_id_file.unlink(missing_ok=True)
    process = dlpipe("train", str(DIGITS), *overrides, "train.epochs=500", "train.world_size=2", cwd=root)
    deadline = time.monotonic() + 300
    while not run_id_file.exists():  # rank 0 has opened the training run: the ranks are training
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it started"
        time.sleep(0.1)
    time.sleep(2)
    code, err, alive = _terminated(process)
    assert code == EXIT_TERMINATED, err
    assert alive == []  # torchrun and both ranks stopped
    assert "Traceback" not in err and "SignalException" not in err  # torchrun stops quietly (jobs/torchrun.py)
    run = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri).get_run(run_id_file.read_text().strip())
    assert run.info.status == "KILLED"
    assert read_marker(cfg, "train") is None


def test_second_run_of_the_same_pipeline_is_refused_by_the_lock(pipeline):
    root, overrides = pipeline
    with pipeline_lock(load_config(DIGITS, overrides)):
        code, err = finished(dlpipe("run", str(DIGITS), *overrides, "--only", "etl", cwd=root))
    assert code == EXIT_LOCKED
    assert err.strip().splitlines()[-1].startswith("dlpipe: locked: pipeline digits-cnn is already running in")


def test_unreachable_tracking_server_fails_fast_with_its_code(pipeline):
    root, overrides = pipeline
    started = time.monotonic()
    code, err = finished(dlpipe("train", str(DIGITS), *overrides, "mlflow.tracking_uri=http://127.0.0.1:9", cwd=root))
    assert code == EXIT_TRACKING
    assert "dlpipe: tracking unavailable: MLflow tracking server http://127.0.0.1:9 is unreachable" in err
    assert time.monotonic() - started < 60  # no training was attempted


def test_promoting_a_version_that_does_not_exist_exits_with_the_promotion_code(pipeline):
    root, overrides = pipeline
    code, err = finished(dlpipe("promote", str(DIGITS), *overrides, "--version", "42", cwd=root))
    assert code == EXIT_PROMOTION
    assert err.strip().splitlines()[-1].startswith("dlpipe: promotion failed: models:/digits-cnn/42: ")


@pytest.mark.slow
def test_a_failing_training_rank_exits_with_the_training_code(pipeline, spark):
    root, overrides = pipeline
    run_stages(DIGITS, overrides, only="etl")
    # Three ranks but the train split was written as two files: refused before any rank starts.
    code, err = finished(dlpipe("train", str(DIGITS), *overrides, "train.world_size=3", cwd=root))
    assert code == EXIT_DATA
    assert err.strip().splitlines()[-1].startswith("dlpipe: data error: ") and \
        err.strip().endswith(": 2 Parquet row group(s) for train.world_size 3 (each rank reads whole row groups): "
                             "write at least 3 files (output.files_per_split) or train on fewer ranks")
    # A manifest that names 2 classes for rows of 3 classes: the ranks start, then fail at their first batch.
    manifest = load_config(DIGITS, overrides).dataset_dir / "manifest.json"
    written = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(written), "classes": ["0", "1"]}))
    try:
        code, err = finished(dlpipe("train", str(DIGITS), *overrides, cwd=root))
    finally:
        manifest.write_text(written)
    assert code == EXIT_TRAINING
    assert "IndexError: Target" in err
    assert err.strip().splitlines()[-1].startswith("dlpipe: training failed: torchrun exited")
