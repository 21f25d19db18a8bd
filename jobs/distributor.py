"""Training on Spark executors: the same `jobs.train.main` torchrun runs, launched by TorchDistributor.

`run_distributed` checks the cluster first (barrier mode needs a fixed set of executors, enough task slots
for every process, and exactly one GPU per task when executors have GPUs), then runs `train_rank` in N
processes, one per barrier task (`local_mode=False`), each under its own torchrun that joins the others.
Like `jobs.train.launch` it returns an exit code: non-zero when a rank failed.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from jobs.config import ConfigError, PipelineConfig, load_config

log = logging.getLogger("dlpipe.distributor")

TORCHRUN_LOG_ENV = "PET_LOG_DIR"  # torchrun's --log-dir, read from the environment
TORCHRUN_LOGS = ".torchelastic"  # in the run folder: torchrun's log folders on the executors, removed after training


class DistributorSettingsError(ConfigError):
    """The Spark application cannot run the training as asked (the message says which setting to change)."""


@dataclass(frozen=True)
class DistributorPlan:
    """What TorchDistributor is started with, after the checks."""

    num_processes: int
    local_mode: bool
    use_gpu: bool


def _gpus(conf: Mapping[str, str], key: str) -> float:
    try:
        return float(conf.get(key, "0"))
    except ValueError:
        raise DistributorSettingsError(f"{key}={conf[key]!r} is not a number") from None


def plan_distributed_training(
    conf: Mapping[str, str], num_processes: int, *, local_mode: bool, use_gpu: bool | None = None, backend: str = "auto"
) -> DistributorPlan:
    """Check the Spark conf for a TorchDistributor run of `num_processes`; `use_gpu=None`: GPUs iff executors have them."""
    if not isinstance(local_mode, bool):
        raise DistributorSettingsError(f"local_mode must be True or False explicitly, got {local_mode!r}")
    if num_processes < 1:
        raise DistributorSettingsError(f"TorchDistributor needs at least 1 process, got {num_processes}")
    if not local_mode and conf.get("spark.dynamicAllocation.enabled", "false").strip().lower() == "true":
        raise DistributorSettingsError(
            "spark.dynamicAllocation.enabled is true: barrier-mode training needs a fixed set of executors "
            "(submit with --conf spark.dynamicAllocation.enabled=false)"
        )
    gpu_key = "spark.driver.resource.gpu.amount" if local_mode else "spark.executor.resource.gpu.amount"
    has_gpus = _gpus(conf, gpu_key) > 0
    use_gpu = has_gpus if use_gpu is None else use_gpu
    if use_gpu and not has_gpus:
        raise DistributorSettingsError(f"use_gpu is set but {gpu_key} is not: the {'driver' if local_mode else 'executors'} "
                                       "have no GPUs to give the training processes")
    if use_gpu and not local_mode and _gpus(conf, "spark.task.resource.gpu.amount") != 1:
        raise DistributorSettingsError(
            "each training process is one Spark task and takes one GPU: set spark.task.resource.gpu.amount=1 "
            f"(got {conf.get('spark.task.resource.gpu.amount', 'unset')})"
        )
    if backend == "nccl" and not use_gpu:
        raise DistributorSettingsError("train.backend is nccl but the training processes get no GPU (use gloo or auto)")
    return DistributorPlan(num_processes, local_mode, use_gpu)


def task_slots(spark) -> int:
    """How many tasks the application can run at once right now (registered executors' cores / spark.task.cpus)."""
    sc = spark.sparkContext._jsc.sc()
    try:  # what barrier scheduling itself checks against
        return int(sc.maxNumConcurrentTasks(sc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # noqa: BLE001 - a JVM without that method: fall back to the cores Spark reports
        return int(spark.sparkContext.defaultParallelism)


def require_task_slots(spark, needed: int, timeout_s: float = 120.0) -> int:
    """Wait (executors register after the session starts) until `needed` tasks fit at once; raise if they never do."""
    deadline = time.monotonic() + timeout_s
    slots = task_slots(spark)
    while slots < needed and time.monotonic() < deadline:
        time.sleep(1.0)
        slots = task_slots(spark)
    if slots < needed:
        conf = spark.sparkContext.getConf()
        raise DistributorSettingsError(
            f"TorchDistributor needs {needed} task slots at once (one per training process) but "
            f"{conf.get('spark.master')} offers {slots} after {timeout_s:.0f}s (executor cores / spark.task.cpus="
            f"{conf.get('spark.task.cpus', '1')}): add executors or cores, or lower train.world_size"
        )
    return slots


def train_rank(config_path: str, overrides: Sequence[str]) -> int:
    """One training process on an executor: `jobs.train.main`, as under torchrun. The YAML is read where the driver
    has it (shared storage) or, failing that, from the copy Spark shipped into the executor's working directory."""
    returned: list[int] = []
    atexit.register(_exit_before_teardown, returned)  # before torch is imported: runs after torch's own handlers
    from jobs.train import main

    path = config_path if os.path.isfile(config_path) else os.path.basename(config_path)
    returned.append(main([path, *overrides]))
    return returned[0]


def _exit_before_teardown(returned: list[int]) -> None:
    """Once the rank has returned (and TorchDistributor has saved its result), end the process without interpreter
    teardown: a rank seen aborting there ("terminate called without an active exception") skipped torchrun's exit
    barrier, leaving the other node's torchrun waiting 300 s for it. The exit code is the rank's own; a rank that
    raised exits normally (non-zero)."""
    if returned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(returned[0])


def torchrun_log_dir(cfg: PipelineConfig) -> Path:
    """Where TorchDistributor's torchrun on each executor keeps its logs (`PET_LOG_DIR`, set by `dlpipe submit`):
    in the run folder, which the executors share with the driver (the ranks write their checkpoints there), so the
    driver removes it after training; left to itself, torchrun makes a `torchelastic_*` folder per launch in each
    executor's temp folder and never removes it."""
    return cfg.run_dir.resolve() / TORCHRUN_LOGS


def rank_overrides(cfg: PipelineConfig, overrides: Sequence[str]) -> list[str]:
    """The overrides as the ranks need them: a relative run_dir pinned to the driver's absolute one (executors
    run in their own working directories)."""
    pinned = [] if cfg.run_dir.is_absolute() else [f"run_dir={cfg.run_dir.resolve()}"]
    return [*overrides, *pinned]


def run_distributed(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    num_processes: int | None = None,
    *,
    local_mode: bool = False,
    use_gpu: bool | None = None,
    spark=None,
    wait_for_slots_s: float = 120.0,
) -> int:
    """Train with TorchDistributor (default `train.world_size` processes on the executors); return the exit code
    (0 ok, rank 0's code, or 1 when the Spark job failed). Raises DistributorSettingsError, or ConfigError /
    DataError when the config cannot train on the dataset on that many ranks (`jobs.train.check_training`), before
    starting."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from jobs.train import check_training
    from pipelines.dataset import read_manifest
    from pipelines.spark import spark_session

    cfg = load_config(config_path, overrides)
    check_training(cfg, read_manifest(cfg.dataset_dir), num_processes or cfg.train.world_size)  # before any rank
    spark = spark or spark_session(cfg.spark, f"dlpipe-train-{cfg.name}")
    conf = dict(spark.sparkContext.getConf().getAll())
    plan = plan_distributed_training(
        conf, num_processes or cfg.train.world_size, local_mode=local_mode, use_gpu=use_gpu, backend=cfg.train.backend
    )
    if not plan.local_mode:
        require_task_slots(spark, plan.num_processes, wait_for_slots_s)
    config = Path(config_path).resolve()
    spark.sparkContext.addFile(str(config))  # for executors without the driver's filesystem
    log.info(
        "TorchDistributor: %d processes, local_mode=%s, use_gpu=%s, master %s",
        plan.num_processes, plan.local_mode, plan.use_gpu, conf.get("spark.master"),
    )
    distributor = TorchDistributor(num_processes=plan.num_processes, local_mode=plan.local_mode, use_gpu=plan.use_gpu)
    logs = torchrun_log_dir(cfg)
    shared = conf.get(f"spark.executorEnv.{TORCHRUN_LOG_ENV}") == str(logs)  # set by dlpipe submit
    return train_once_more_if_no_rank_started(
        lambda: distributor.run(train_rank, str(config), rank_overrides(cfg, overrides)), logs if shared else None)


def train_once_more_if_no_rank_started(train: Callable[[], object], logs: Path | None) -> int:
    """`train()`'s exit code (0 when it returns None), or 1 when it raised (a rank died: Spark aborts the barrier
    job; torchrun has printed the rank's error). Started once more when the first try failed before any rank started:
    TorchDistributor picks a free port for torchrun's rendezvous and lets it go, and another process can bind it
    before torchrun does (EADDRINUSE on the rendezvous). That is known when torchrun's shared log folder `logs`
    (`PET_LOG_DIR`) holds no `attempt_*` folder, which torchrun makes as it starts the ranks; without `logs`, never
    retried. The folder is removed after each try."""
    from pipelines.spark import error_reason

    tries = 2
    while True:
        tries -= 1
        try:
            return int(train() or 0)
        except Exception as exc:  # noqa: BLE001 - reported here, as torchrun reports a rank's failure
            if not tries or logs is None or any(logs.glob("*/attempt_*")):
                log.error("TorchDistributor training failed: %s", error_reason(exc))
                log.debug("TorchDistributor failure", exc_info=True)
                return 1
            log.warning("TorchDistributor: training failed before any rank started (%s), e.g. its rendezvous port "
                        "was taken before torchrun bound it: starting it once more", error_reason(exc))
        finally:
            if logs is not None:
                shutil.rmtree(logs, ignore_errors=True)


def train_on_cluster(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> dict:
    """The `train` stage runner with TorchDistributor in place of torchrun (a `jobs.run.RUNNERS` entry)."""
    from jobs.run import TrainingFailed
    from jobs.tracking import outage_reported

    with outage_reported(cfg.run_dir):
        code = run_distributed(config_path, overrides, cfg.train.world_size)
    if code:
        raise TrainingFailed(f"TorchDistributor training exited with code {code} (see the rank logs above)")
    return json.loads((cfg.run_dir / "train_result.json").read_text())


@contextmanager
def cluster_training() -> Iterator[None]:
    """Within the block, the pipeline's `train` stage (markers, lock, skipping unchanged) trains via TorchDistributor."""
    from jobs import run

    previous = run.RUNNERS["train"]
    run.RUNNERS["train"] = train_on_cluster
    try:
        yield
    finally:
        run.RUNNERS["train"] = previous
