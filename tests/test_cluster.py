"""Cluster execution: the same pipeline on a real Spark standalone cluster (spark-submit + TorchDistributor) and on
local[*] gives the same dataset and, within a stated tolerance, the same model quality.

The cluster is one master and two 1-core workers on 127.0.0.1 (tests/spark_cluster.py). Against it: the ETL
through the built spark-submit command, training through TorchDistributor with 2 processes on the executors
(gloo, CPU), then `dlpipe run` submitted (which skips the unchanged ETL and training, then promotes and scores).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from jobs.config import ConfigError, load_config
from jobs.distributor import (
    DistributorSettingsError,
    cluster_training,
    plan_distributed_training,
    rank_overrides,
    require_task_slots,
    task_slots,
    train_on_cluster,
    train_once_more_if_no_rank_started,
)
from jobs.submit import SubmitError, build_submit_command
from spark_cluster import spark_env, standalone_cluster
from test_etl import write_class_folders

DIGITS = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"
CLASSES = {"dark": 40, "mid": 40, "light": 40}  # 120 PNGs: train/val/test = 84/18/18
MODEL = [
    "output.files_per_split=2", "model.channels=[4]", "model.hidden=8", "model.batch_norm=false",
    "train.world_size=2", "train.epochs=3", "train.batch_size=8", "train.optimizer.lr=0.02",
    "spark.driver_memory=1g", "spark.shuffle_partitions=4", "promote.smoke_rows=8",
]
# Executors of 1 core (one training process each) and 768 MiB inside the 1 GiB workers.
EXECUTORS = {"spark.executor.cores": "1", "spark.executor.memory": "768m"}
# Training is seeded and both runs use 2 gloo ranks over the same row groups (measured here: the same test loss to
# the last bit), but float reductions may run with other thread counts elsewhere. Stated tolerance: test loss within
# 0.1% relative, test accuracy within 2 of the 18 test rows, and the two models agree on at least 16 of 18 rows.
LOSS_TOLERANCE = 1e-3
ACCURACY_TOLERANCE = 2 / 18
MIN_AGREEMENT = 16 / 18


def overrides(raw: Path, run_dir: Path) -> list[str]:
    return [f"source.path={raw}", f"run_dir={run_dir}", *MODEL]


def run(command: list[str], cwd: Path, label: str, timeout: int = 300) -> str:
    """Run a command in its own process group; return its output (stdout + stderr). On failure or timeout (the
    whole group is killed) fail the test with the output's tail."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=cwd, env=spark_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... timed out after {timeout}s:\n{output[-8000:]}")
    assert process.returncode == 0, f"{' '.join(command[:6])} ... exited {process.returncode}:\n{output[-8000:]}"
    print(f"{time.monotonic() - started:6.1f}s  {label}")
    return output


def split_ids(run_dir: Path) -> dict[str, set[str]]:
    """split -> the row ids (relative image paths) the ETL put in it."""
    return {
        split: set(pq.read_table(run_dir / "dataset" / f"split={split}", columns=["id"]).column("id").to_pylist())
        for split in ("train", "val", "test")
    }


def predictions(run_dir: Path) -> dict[str, tuple[int, int]]:
    table = pq.read_table(run_dir / "predictions", columns=["id", "label", "prediction"]).to_pydict()
    return {row_id: (label, pred) for row_id, label, pred in zip(table["id"], table["label"], table["prediction"])}


def assert_close(actual, expected, rel: float) -> None:
    """Nested JSON values equal, floats to a relative tolerance."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_close(actual[key], expected[key], rel)
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, rel)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=rel)
    else:
        assert actual == expected


def probabilities(run_dir: Path) -> dict[str, list[float]]:
    table = pq.read_table(run_dir / "predictions", columns=["id", "probability"]).to_pydict()
    return dict(zip(table["id"], table["probability"]))


def executors_per_worker(master_state: dict, app_name: str) -> list[int]:
    """How many executors of the (one) application named `app_name` each worker ran, from their status JSON."""
    [app_id] = [a["id"] for a in master_state["completedapps"] + master_state["activeapps"] if a["name"] == app_name]
    counts = []
    for worker in master_state["workers"]:
        with urllib.request.urlopen(f"{worker['webuiaddress']}/json/", timeout=5) as response:
            state = json.loads(response.read())
        executors = state.get("executors", []) + state.get("finishedexecutors", [])
        counts.append(sum(1 for e in executors if e.get("appid") == app_id))
    return counts


@pytest.mark.cluster
@pytest.mark.slow
def test_pipeline_on_a_standalone_cluster_matches_the_local_run(tmp_path, monkeypatch):
    temp = tmp_path / "temp"  # every process's temp folder: the cluster's daemons, executors and Python workers
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    raw = tmp_path / "raw"
    write_class_folders(raw, CLASSES)
    local_dir, cluster_dir = tmp_path / "local", tmp_path / "cluster"

    # The reference: the same config on local[*], training under torchrun.
    run([sys.executable, "-m", "jobs.cli", "run", str(DIGITS), *overrides(raw, local_dir)], tmp_path, "local run", 600)

    cluster_overrides = overrides(raw, cluster_dir)
    with standalone_cluster(tmp_path / "spark-cluster", workers=2, cores=1, memory="1g") as cluster:
        try:
            def submit(stage: str) -> str:
                command = build_submit_command(
                    stage, DIGITS, cluster_overrides, cluster.master_url, extra_conf=EXECUTORS,
                    dist_dir=tmp_path / "dist",
                )
                assert command[command.index("--master") + 1] == cluster.master_url
                return run(command, tmp_path, f"cluster {stage}")

            submit("etl")
            trained = submit("train")
            ran = submit("run")  # etl and train unchanged: skipped; then promote and score on the cluster
            # The training application had one executor on each worker: the 2 processes ran one per executor.
            assert executors_per_worker(cluster.state(), "dlpipe-train-digits-cnn") == [1, 1]
        except BaseException:
            print(cluster.logs())
            raise

    assert "Started distributed training with 2 executor processes" in trained
    # torchrun on each executor logged into the run folder (PET_LOG_DIR), which the driver removed after training;
    # it used to leave a torchelastic_* folder per launch in the executors' temp folder.
    assert not (cluster_dir / ".torchelastic").exists()
    assert not list(temp.glob("torchelastic_*")), sorted(p.name for p in temp.iterdir())
    assert "etl: up to date" in ran and "train: up to date" in ran

    local_manifest = json.loads((local_dir / "dataset" / "manifest.json").read_text())
    cluster_manifest = json.loads((cluster_dir / "dataset" / "manifest.json").read_text())
    assert cluster_manifest["counts"] == local_manifest["counts"]
    assert cluster_manifest["counts"]["rows_in"] == sum(CLASSES.values())
    assert cluster_manifest["source"]["content_hash"] == local_manifest["source"]["content_hash"]
    assert cluster_manifest["class_balance"] == local_manifest["class_balance"]
    assert split_ids(cluster_dir) == split_ids(local_dir)
    # Spark may sum the train statistics in another order on the cluster: equal to float rounding.
    assert_close(cluster_manifest["preprocessing"], local_manifest["preprocessing"], rel=1e-9)

    local_result = json.loads((local_dir / "train_result.json").read_text())
    cluster_result = json.loads((cluster_dir / "train_result.json").read_text())
    local_acc, cluster_acc = local_result["test_metrics"]["accuracy"], cluster_result["test_metrics"]["accuracy"]
    assert abs(cluster_acc - local_acc) <= ACCURACY_TOLERANCE + 1e-9, (local_result, cluster_result)
    local_loss, cluster_loss = local_result["test_metrics"]["loss"], cluster_result["test_metrics"]["loss"]
    assert cluster_loss == pytest.approx(local_loss, rel=LOSS_TOLERANCE), (local_result, cluster_result)

    local_scored, cluster_scored = predictions(local_dir), predictions(cluster_dir)
    assert cluster_scored.keys() == local_scored.keys() == split_ids(local_dir)["test"]
    agreement = sum(cluster_scored[i][1] == local_scored[i][1] for i in local_scored) / len(local_scored)
    assert agreement >= MIN_AGREEMENT, agreement
    scored_acc = sum(label == pred for label, pred in cluster_scored.values()) / len(cluster_scored)
    assert scored_acc == pytest.approx(cluster_acc, abs=1e-9)  # the Spark scorer reproduces training's test metric
    local_probability, cluster_probability = probabilities(local_dir), probabilities(cluster_dir)
    largest = max(abs(a - b) for i in local_probability for a, b in zip(local_probability[i], cluster_probability[i]))
    print(f"test accuracy: local {local_acc:.4f}, cluster {cluster_acc:.4f}; predictions agree on {agreement:.2%}; "
          f"largest probability difference {largest:.2e}")


# ---- Fast checks (no cluster): the command dlpipe submit builds, the shipped zip, TorchDistributor's settings ----


def conf_of(command: list[str]) -> dict[str, str]:
    return dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--conf")


def test_submit_command_ships_the_project_and_config_and_pins_the_master(tmp_path):
    command = build_submit_command(
        "etl", DIGITS, ["train.epochs=2"], "spark://10.0.0.5:7077", extra_conf={"spark.executor.memory": "4g"},
        dist_dir=tmp_path / "dist",
    )
    assert Path(command[0]).name == "spark-submit"
    assert command[command.index("--master") + 1] == "spark://10.0.0.5:7077"
    assert command[command.index("--deploy-mode") + 1] == "client"
    zipped = Path(command[command.index("--py-files") + 1])
    names = set(zipfile.ZipFile(zipped).namelist())
    assert {"jobs/cli.py", "jobs/submit.py", "jobs/distributor.py", "dl/trainer.py", "pipelines/spark.py"} <= names
    assert not any("__pycache__" in name for name in names)
    assert command[command.index("--files") + 1] == str(DIGITS)
    conf = conf_of(command)
    assert conf["spark.executor.memory"] == "4g"
    assert conf["spark.pyspark.python"] == conf["spark.pyspark.driver.python"] == sys.executable
    assert conf["spark.executorEnv.PYTHONPATH"] == zipped.name
    driver = command.index(str(tmp_path / "dist" / "dlpipe_driver.py"))
    # The driver runs `dlpipe etl`; the submitted master wins over the YAML's spark.master (the last override).
    assert command[driver + 1:] == ["etl", str(DIGITS), "train.epochs=2", "spark.master=spark://10.0.0.5:7077"]


def test_shipped_zip_alone_provides_the_project(tmp_path):
    command = build_submit_command("score", DIGITS, [], "local[2]", dist_dir=tmp_path / "dist")
    zipped = command[command.index("--py-files") + 1]
    where = subprocess.run(
        [sys.executable, "-c", "import jobs.submit, dl.trainer, pipelines.scoring; print(jobs.submit.__file__)"],
        env={"PYTHONPATH": zipped, "PATH": "/usr/bin:/bin"}, cwd=tmp_path, capture_output=True, text=True,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(Path(zipped) / "jobs" / "submit.py")  # imported from the zip, not the checkout


def test_training_submits_disable_retries_and_dynamic_allocation(tmp_path):
    conf = conf_of(build_submit_command("train", DIGITS, [], "spark://h:7077", dist_dir=tmp_path))
    assert conf["spark.task.maxFailures"] == "1" and conf["spark.stage.maxConsecutiveAttempts"] == "1"
    assert conf["spark.dynamicAllocation.enabled"] == "false"
    assert conf["spark.executorEnv.PET_LOG_DIR"] == str(load_config(DIGITS, []).run_dir.resolve() / ".torchelastic")
    assert "spark.executorEnv.PET_LOG_DIR" not in conf_of(build_submit_command("score", DIGITS, [], "spark://h:7077",
                                                                               dist_dir=tmp_path))


def test_yarn_cluster_mode_reads_the_shipped_config_and_a_packed_environment(tmp_path):
    command = build_submit_command(
        "score", DIGITS, [], "yarn", deploy_mode="cluster", extra_conf={"spark.yarn.queue": "batch"},
        dist_dir=tmp_path, archive=tmp_path / "dlpipe-env.tar.gz",
    )
    assert command[command.index("--archives") + 1] == f"{tmp_path / 'dlpipe-env.tar.gz'}#environment"
    conf = conf_of(command)
    assert conf["spark.pyspark.python"] == conf["spark.pyspark.driver.python"] == "./environment/bin/python"
    assert conf["spark.yarn.queue"] == "batch"
    assert command[-3:] == ["score", DIGITS.name, "spark.master=yarn"]  # the driver's working dir holds the YAML


@pytest.mark.parametrize(
    ("stage", "master", "mode", "conf", "message"),
    [
        ("sample", "spark://h:7077", "client", {}, "dlpipe submit runs one of etl, train, promote, score, run"),
        ("etl", "mesos://h:5050", "client", {}, "expected spark://HOST:PORT, yarn"),
        ("etl", "spark://h:7077", "cluster", {}, "cluster deploy mode on YARN and Kubernetes only"),
        ("etl", "k8s://https://api:443", "client", {}, "set spark.kubernetes.container.image"),
        ("etl", "k8s://https://api:443", "cluster", {"spark.kubernetes.container.image": "dlpipe:1"},
         "set spark.kubernetes.file.upload.path"),
    ],
)
def test_impossible_submissions_are_refused_before_anything_runs(tmp_path, stage, master, mode, conf, message):
    with pytest.raises(SubmitError, match=re.escape(message)):
        build_submit_command(stage, DIGITS, [], master, mode, conf, dist_dir=tmp_path)
    assert not (tmp_path / "dlpipe.zip").exists()


def test_kubernetes_cluster_mode_with_its_settings_is_accepted(tmp_path):
    k8s = {"spark.kubernetes.container.image": "dlpipe:1", "spark.kubernetes.file.upload.path": "s3a://b/up"}
    command = build_submit_command("etl", DIGITS, [], "k8s://https://api:443", "cluster", k8s, dist_dir=tmp_path)
    assert conf_of(command)["spark.kubernetes.container.image"] == "dlpipe:1"


def test_a_bad_config_fails_the_submit_with_the_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.epocs'"):
        build_submit_command("etl", DIGITS, ["train.epocs=2"], "spark://h:7077", dist_dir=tmp_path)


CPU_CLUSTER = {"spark.master": "spark://h:7077", "spark.executor.cores": "1"}
GPU_CLUSTER = {**CPU_CLUSTER, "spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1"}


def test_distributor_plan_uses_gpus_exactly_when_executors_have_them():
    assert plan_distributed_training(CPU_CLUSTER, 2, local_mode=False).use_gpu is False
    assert plan_distributed_training(GPU_CLUSTER, 2, local_mode=False).use_gpu is True
    assert plan_distributed_training(GPU_CLUSTER, 2, local_mode=False, use_gpu=False).use_gpu is False


@pytest.mark.parametrize(
    ("conf", "kwargs", "message"),
    [
        ({**CPU_CLUSTER, "spark.dynamicAllocation.enabled": "true"}, {}, "spark.dynamicAllocation.enabled is true"),
        ({**GPU_CLUSTER, "spark.task.resource.gpu.amount": "2"}, {}, "set spark.task.resource.gpu.amount=1 (got 2)"),
        ({**CPU_CLUSTER, "spark.executor.resource.gpu.amount": "2"}, {}, "spark.task.resource.gpu.amount=1 (got unset)"),
        (CPU_CLUSTER, {"use_gpu": True}, "use_gpu is set but spark.executor.resource.gpu.amount is not"),
        (CPU_CLUSTER, {"backend": "nccl"}, "train.backend is nccl but the training processes get no GPU"),
        (CPU_CLUSTER, {"local_mode": None}, "local_mode must be True or False explicitly"),
        (CPU_CLUSTER, {"num_processes": 0}, "at least 1 process"),
    ],
)
def test_distributor_settings_that_cannot_work_are_refused(conf, kwargs, message):
    kwargs = {"num_processes": 2, "local_mode": False, **kwargs}
    with pytest.raises(DistributorSettingsError, match=re.escape(message)):
        plan_distributed_training(conf, kwargs.pop("num_processes"), **kwargs)


def test_too_few_task_slots_are_refused_with_what_the_cluster_offers():
    jvm_context = SimpleNamespace(
        maxNumConcurrentTasks=lambda profile: 1,
        resourceProfileManager=lambda: SimpleNamespace(defaultResourceProfile=lambda: None),
    )
    spark = SimpleNamespace(sparkContext=SimpleNamespace(
        _jsc=SimpleNamespace(sc=lambda: jvm_context),
        getConf=lambda: SimpleNamespace(get=lambda key, default=None: CPU_CLUSTER.get(key, default)),
    ))
    assert task_slots(spark) == 1
    with pytest.raises(DistributorSettingsError, match=r"needs 2 task slots .* spark://h:7077 offers 1"):
        require_task_slots(spark, 2, timeout_s=0)


def test_cluster_training_swaps_the_train_runner_for_the_block_only():
    from jobs import run as stages

    before = stages.RUNNERS["train"]
    with cluster_training():
        assert stages.RUNNERS["train"] is train_on_cluster
    assert stages.RUNNERS["train"] is before


def test_ranks_get_an_absolute_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DIGITS)  # run_dir: runs/digits-cnn, relative to where the driver runs
    assert rank_overrides(cfg, ["train.epochs=2"]) == ["train.epochs=2", f"run_dir={tmp_path / 'runs' / 'digits-cnn'}"]


def test_training_that_failed_before_any_rank_started_is_started_once_more(tmp_path, caplog):
    """TorchDistributor lets the rendezvous port it picked go before torchrun binds it; when another process takes it
    (EADDRINUSE, seen once in this suite's cluster test) no rank starts, and torchrun's shared log folder holds no
    `attempt_*` folder: dlpipe trains once more. A failure after the ranks started, a second failure, or no shared
    log folder (a session `dlpipe submit` did not configure) is reported as it is: exit 1, no retry."""
    logs, calls = tmp_path / ".torchelastic", []

    def port_taken_once():
        calls.append("try")
        logs.mkdir(exist_ok=True)
        if len(calls) == 1:
            raise RuntimeError("TorchDistributor failed during training.View stdout logs for detailed error message.")

    def a_rank_fails():
        calls.append("try")
        (logs / "0_x1y2" / "attempt_0" / "0").mkdir(parents=True)
        raise RuntimeError("rank 0 failed")

    def no_executor_can_train():
        calls.append("try")
        raise RuntimeError("no executor")

    with caplog.at_level(logging.WARNING, logger="dlpipe.distributor"):
        assert train_once_more_if_no_rank_started(port_taken_once, logs) == 0 and len(calls) == 2
    assert "failed before any rank started (RuntimeError: TorchDistributor failed during training" in caplog.text
    assert not logs.exists()  # removed after each try
    for train, shared, tries in [(a_rank_fails, logs, 1), (no_executor_can_train, logs, 2),
                                 (no_executor_can_train, None, 1)]:
        calls.clear()
        assert train_once_more_if_no_rank_started(train, shared) == 1 and len(calls) == tries, train.__name__
    assert train_once_more_if_no_rank_started(lambda: 3, None) == 3
