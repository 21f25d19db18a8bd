"""A Spark worker killed during the standalone-cluster ETL: Spark re-runs the lost tasks on the other worker and the
job completes with the same counts, splits and quarantine as a local run (nothing lost, nothing counted twice)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.etl import run_etl
from jobs.submit import build_submit_command
from ports import free_port
from spark_cluster import spark_env, standalone_cluster
from test_cluster import EXECUTORS, split_ids
from test_etl_tables import BAD_LINES, HEADER, clean_row, csv_line, table_config

FILES, ROWS_PER_FILE = 4, 5_000  # 20,013 records in 256 KiB input splits: several tasks per stage
TIMEOUT_S = 600


def write_csv_source(root: Path) -> int:
    """FILES CSV files of clean rows, the last one with every kind of bad line too; returns the number of records."""
    root.mkdir()
    for number in range(FILES):
        rows = [csv_line(clean_row(i)) for i in range(number * ROWS_PER_FILE, (number + 1) * ROWS_PER_FILE)]
        bad = [line for line, _ in BAD_LINES] if number == FILES - 1 else []
        (root / f"part-{number}.csv").write_text("\n".join([HEADER, *rows, *bad]) + "\n")
    return FILES * ROWS_PER_FILE + len(BAD_LINES)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def busy_worker(cluster_root: Path, driver_ui: str, etl: subprocess.Popen, log: Path) -> int:
    """Wait until an executor runs tasks of the ETL (per the driver's REST API); return the index of its worker."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert etl.poll() is None, f"the ETL ended before a worker could be killed:\n{log.read_text()[-6000:]}"
        try:
            [app] = get_json(f"{driver_ui}/api/v1/applications")
            executors = get_json(f"{driver_ui}/api/v1/applications/{app['id']}/executors")
        except (OSError, ValueError):
            executors = []  # the driver's UI is not up yet
        for executor in executors:
            if executor["id"] != "driver" and executor["activeTasks"] > 0:
                # A worker runs an executor in <work dir>/<app id>/<executor id>: that says which worker it is.
                return next(i for i in range(2) if (cluster_root / f"worker-{i}" / app["id"] / executor["id"]).is_dir())
        time.sleep(0.2)
    raise TimeoutError(f"no executor ran a task of the ETL within {TIMEOUT_S}s")


@pytest.mark.cluster
@pytest.mark.slow
def test_a_worker_killed_during_cluster_etl_loses_no_row(spark, tmp_path):
    records = write_csv_source(tmp_path / "raw")
    config = tmp_path / "tables.yaml"
    config.write_text(table_config(tmp_path / "raw", tmp_path / "local").to_yaml())
    started = time.monotonic()
    local = run_etl(load_config(config))  # the reference: local[2]
    print(f"local ETL {time.monotonic() - started:.1f}s")

    ui_port, log = free_port(), tmp_path / "cluster-etl.log"
    extra_conf = {**EXECUTORS, "spark.sql.files.maxPartitionBytes": "256k", "spark.ui.port": str(ui_port)}
    with standalone_cluster(tmp_path / "spark-cluster", workers=2, cores=1, memory="1g") as cluster:
        command = build_submit_command("etl", config, [f"run_dir={tmp_path / 'cluster'}"], cluster.master_url,
                                       extra_conf=extra_conf, dist_dir=tmp_path / "dist")
        started = time.monotonic()
        with open(log, "wb") as out:
            etl = subprocess.Popen(command, cwd=tmp_path, env=spark_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            victim = busy_worker(cluster.root, f"http://127.0.0.1:{ui_port}", etl, log)
            cluster.kill_worker(victim)  # mid-task: its executor's running tasks and shuffle files are lost
            assert etl.poll() is None, "the ETL had finished before the worker was killed"
            code = etl.wait(timeout=TIMEOUT_S)
            print(f"cluster ETL {time.monotonic() - started:.1f}s, worker-{victim} killed")
        except BaseException:
            os.killpg(etl.pid, signal.SIGKILL)
            print(cluster.logs())
            raise
        alive = [w["state"] for w in cluster.state()["workers"]]
    output = log.read_text(errors="replace")
    assert code == 0, output[-8000:]
    assert "Lost executor" in output  # the driver saw the executor go (and re-ran its tasks elsewhere)
    assert sorted(alive) == ["ALIVE", "DEAD"]

    manifest = json.loads((tmp_path / "cluster" / "dataset" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts == local["counts"]
    assert counts["rows_in"] == records == counts["rows_clean"] + counts["rows_quarantined"]
    assert counts["rows_clean"] == counts["train"] + counts["val"] + counts["test"]
    assert manifest["quarantine_reasons"] == local["quarantine_reasons"]
    assert manifest["class_balance"] == local["class_balance"]
    assert split_ids(tmp_path / "cluster") == split_ids(tmp_path / "local")
