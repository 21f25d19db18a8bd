"""Recipe: train the pipeline's model with DDP on its Parquet dataset, track the run in MLflow, register the model.

Each process is one rank: `torchrun --nproc-per-node N -m jobs.train conf.yaml [k=v ...]`, or
TorchDistributor calling `main`. `launch` is what `dlpipe train` calls; it starts that torchrun.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext, suppress
from importlib import metadata
from pathlib import Path
from typing import Iterator

import mlflow
import psutil
import torch
from mlflow import MlflowClient

from dl import plots
from dl.augment import ImageAugment
from dl.dec import fit_dec
from dl.distributed import DistContext, distributed, is_master
from dl.models import build_model
from dl.nonfinite import NonFiniteLoss
from dl.serving import log_and_register
from dl.tasks import Task, build_task
from dl.trainer import fit, resumes
from jobs.config import ConfigError, PipelineConfig, load_config
from jobs.lineage import link_training_to_dataset
from jobs.stage import configure_logging, stage
from jobs.tracking import MetricsBuffer, TrackingUnavailable, log_config, record_outage, use_experiment
from pipelines.atomic import write_text_atomic
from pipelines.dataset import read_manifest
from pipelines.errors import DataError
from pipelines.shards import check_shardable, split_dir
from pipelines.split import SPLITS
from pipelines.text import vocabulary_size

log = logging.getLogger("dlpipe.train")

# torchrun shares its rendezvous store with the workers' process group by default; after a restart the new
# workers can read the dead workers' gloo/nccl addresses from it and fail to connect (pytorch issue #135712).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
THREADS_VARIABLE = "OMP_NUM_THREADS"  # each rank's intra-op threads (torch.get_num_threads)


def _run_id_file(cfg: PipelineConfig) -> Path:
    """Where rank 0 keeps the id of the training's MLflow run (a resumed training reopens that run)."""
    return cfg.checkpoint_dir / "mlflow_run_id"


@contextmanager
def tracked_run(cfg: PipelineConfig, manifest: dict) -> Iterator[mlflow.ActiveRun]:
    """Open the training run (creating the experiment when missing); record config, manifest and lineage.

    A resumed training (`train.resume`, or a torchrun restart) reopens the run it resumes, so one run holds every epoch.
    """
    use_experiment(cfg)
    run_id_file = _run_id_file(cfg)
    if resumes(cfg.train, cfg.checkpoint_dir) and run_id_file.is_file():
        with mlflow.start_run(run_id=run_id_file.read_text().strip()) as run:
            yield run
        return
    with mlflow.start_run(run_name=f"train-{cfg.name}") as run:
        write_text_atomic(run_id_file, run.info.run_id)
        log_config(cfg)
        mlflow.set_tags({
            "dlpipe.stage": "train",
            "dataset.path": str(cfg.dataset_dir.resolve()),
            "dataset.content_hash": manifest["source"]["content_hash"],
        })
        mlflow.log_dict(manifest, "manifest.json")
        quality = cfg.dataset_dir / "quality.json"
        if quality.is_file():
            mlflow.log_artifact(str(quality))
        link_training_to_dataset(cfg, manifest)
        yield run


def system_info(ctx: DistContext) -> dict[str, str]:
    """Where and with what the run trained: world size, backend, device and the envelope's versions."""
    info = {"system.world_size": str(ctx.world_size), "system.backend": ctx.backend, "system.device": str(ctx.device),
            "system.threads_per_rank": str(torch.get_num_threads()), "system.python": platform.python_version()}
    if torch.cuda.is_available():
        info["system.gpu"] = torch.cuda.get_device_name(ctx.device)
    for package in ("torch", "pyspark", "pyarrow", "mlflow", "petastorm"):
        info[f"system.{package}"] = metadata.version(package)
    return info


def check_training(cfg: PipelineConfig, manifest: dict, world_size: int | None = None) -> tuple[Task, tuple | None]:
    """(the task, its target statistics) once the config is known to train on this dataset: the task fits the
    dataset's labels and the train settings, the model its feature shape; ConfigError naming the mismatch if not.
    With `world_size`, also ShardingError (a DataError) when a split has fewer row groups than ranks (e.g.
    `train.world_size` raised after the ETL wrote the dataset).

    The launchers run it before any rank starts (a mismatch is a config or data error, not a training failure), and
    each rank again (the trainer checks the shards itself)."""
    model = cfg.require_model("the train stage")
    try:
        task = build_task(model, manifest["classes"], cfg.train.anomaly)
        task.check(cfg.train)
        target_statistics = task.target_statistics(split_dir(cfg.dataset_dir, "train"))
        build_model(model, tuple(manifest["feature_shape"]), task.num_outputs,
                    target_statistics=target_statistics, vocab_size=vocabulary_size(manifest))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for split in SPLITS if world_size else ():
        check_shardable(split_dir(cfg.dataset_dir, split), world_size)
    return task, target_statistics


def train(cfg: PipelineConfig, manifest: dict) -> None:
    """This rank's share of training; rank 0 also tracks the run, registers the model and writes the result."""
    task, target_statistics = check_training(cfg, manifest)
    with distributed(cfg.train.backend, cfg.train.seed) as ctx:
        configure_logging(logging.INFO if is_master() else logging.WARNING)
        network = build_model(cfg.model, tuple(manifest["feature_shape"]), task.num_outputs,
                              target_statistics=target_statistics, vocab_size=vocabulary_size(manifest))
        with stage("train") as summary, tracked_run(cfg, manifest) if is_master() else nullcontext() as run:
            metrics = (MetricsBuffer(cfg.tracking_uri, run.info.run_id, cfg.mlflow.outage_budget_s)
                       if is_master() else None)
            augment = ({"augment": ImageAugment(cfg.train.augment, tuple(manifest["feature_shape"]))}
                       if cfg.train.augment.enabled else {})
            result = (fit_dec if cfg.model.kind == "dec" else fit)(  # DEC: phases on the same engine
                network, cfg.train, cfg.dataset_dir, task, ctx, cfg.checkpoint_dir,
                log_metrics=metrics.log if metrics else None, **augment,
            )
            if not is_master():
                return  # rank 0 alone tracks, registers and reports
            metrics.drain()  # every epoch's metrics are in the run (after any outage) before the rest is logged
            mlflow.set_tags(system_info(ctx))
            mlflow.log_metrics({f"test_{name}": value for name, value in result.test_metrics.items()})
            mlflow.log_figure(plots.learning_curves(result.history), "plots/learning_curves.png")
            if result.test_confusion is not None:
                mlflow.log_dict({"classes": manifest["classes"], "matrix": result.test_confusion}, "test_confusion.json")
            for name, figure in task.figures(result.test_details, manifest["classes"]).items():
                mlflow.log_figure(figure, f"plots/{name}.png")
            if result.serving_state:
                mlflow.log_dict(result.serving_state, "serving_state.json")
            version = log_and_register(network.cpu(), cfg, manifest, result.serving_state)
            headline = {f"test_{name}": round(result.test_metrics[name], 4) for name in task.logged[1:]
                        if name in result.test_metrics}
            summary.update(
                backend=ctx.backend, world_size=ctx.world_size, task=task.kind, epochs=len(result.history),
                best_epoch=result.best_epoch, **headline, model=f"{version.name}/{version.version}",
            )
        write_text_atomic(cfg.run_dir / "train_result.json", json.dumps({
            "run_id": run.info.run_id,
            "model_name": version.name,
            "model_version": int(version.version),
            "model_uri": f"models:/{version.name}/{version.version}",
            "best_epoch": result.best_epoch,
            "task": task.kind,
            "test_metrics": result.test_metrics,
            "serving_state": result.serving_state,
        }, indent=2))


def main(argv: list[str] | None = None) -> int:
    """One rank of `dlpipe train`: argv is `conf.yaml [key.sub=value ...]`; returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    faulthandler.enable()  # a rank killed by a native crash (SIGABRT, SIGSEGV) first prints every thread's stack
    configure_logging()
    if not args:
        log.error("usage: python -m jobs.train conf.yaml [key.sub=value ...]")
        return 2
    try:
        cfg = load_config(args[0], args[1:])
        train(cfg, read_manifest(cfg.dataset_dir))
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    except DataError as exc:
        log.error("data error: %s", exc)
        return 3
    except NonFiniteLoss as exc:
        log.error("training failed: %s", exc)
        return 4
    except TrackingUnavailable as exc:
        log.error("tracking unavailable: %s", exc)
        record_outage(cfg.run_dir, exc)
        return 5
    return 0


def launch(cfg_path: str | Path, overrides: list[str] | tuple[str, ...] = (), world_size: int = 1) -> int:
    """Run `jobs.train` on `world_size` local ranks under torchrun, restarted up to `train.max_restarts` times
    from the last checkpoint; the exit code is non-zero if a rank failed for good. ConfigError or DataError before
    starting when the config cannot train on the dataset on `world_size` ranks (`check_training`)."""
    cfg = load_config(cfg_path, overrides)
    check_training(cfg, read_manifest(cfg.dataset_dir), world_size)  # before any rank starts
    # torchrun's per-rank folders (left in /tmp by default, one set per launch) go in one removed afterwards
    with tempfile.TemporaryDirectory(prefix="dlpipe-torchrun-") as rank_dirs:
        command = [
            sys.executable, "-m", "jobs.torchrun", "--standalone", f"--nproc-per-node={world_size}",
            f"--max-restarts={cfg.train.max_restarts}", f"--log-dir={rank_dirs}", "-m", "jobs.train", str(cfg_path),
            *overrides,
        ]
        log.info("launching %s", " ".join(command))
        torchrun = subprocess.Popen(command, env=rank_environment(world_size))
        try:
            return torchrun.wait()
        except BaseException:  # the launcher is stopping (SIGTERM, Ctrl-C): its ranks must not go on without it
            _stop(torchrun)
            _end_killed_run(cfg)
            raise


def rank_environment(world_size: int) -> dict[str, str]:
    """The environment torchrun starts `world_size` local ranks with: this one, TORCHRUN_ENV, and each rank's share of
    the cores this process may use as its intra-op threads (OMP_NUM_THREADS, at least 1) unless the environment sets
    it. torchrun alone gives each of several ranks one thread (and prints a warning), leaving a big host idle."""
    env = {**os.environ, **TORCHRUN_ENV}
    if world_size > 1:  # one rank: torch's own default, the host's cores
        env.setdefault(THREADS_VARIABLE, str(max(1, len(os.sched_getaffinity(0)) // world_size)))
    return env


def _stop(torchrun: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Stop torchrun and its ranks: SIGTERM (torchrun passes it on to the ranks and waits for them), then SIGKILL
    for whatever is left after `grace_s`. The ranks run in sessions of their own, so they are found first."""
    try:
        ranks = psutil.Process(torchrun.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    torchrun.terminate()
    try:
        torchrun.wait(grace_s)
    except subprocess.TimeoutExpired:
        torchrun.kill()
        torchrun.wait()
    for rank in ranks:
        with suppress(psutil.NoSuchProcess):
            rank.kill()


def _end_killed_run(cfg: PipelineConfig) -> None:
    """Mark the training's MLflow run KILLED if a stopped rank 0 left it RUNNING (best effort: never raises)."""
    run_id_file = _run_id_file(cfg)
    try:
        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        run_id = run_id_file.read_text().strip()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # no run yet, or tracking unreachable: the stop itself matters more
        log.warning("could not mark the training run in %s as KILLED: %s", run_id_file, exc)


if __name__ == "__main__":
    sys.exit(main())
