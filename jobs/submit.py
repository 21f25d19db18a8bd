"""`dlpipe submit`: the spark-submit command that runs a dlpipe stage on a cluster, unchanged.

The project ships itself: `package_project` zips `pipelines/ dl/ jobs/` into `<dist>/dlpipe.zip` (for
`--py-files`, and on executors' PYTHONPATH so that TorchDistributor's torchrun processes import it too)
and writes a two-line driver script beside it. The pipeline YAML goes with `--files`. The driver runs the
same `dlpipe` code as a local run, with `spark.master=<the submitted master>` appended to the overrides,
so the YAML's `spark.master` never overrides the cluster; `train` (and `run`) train through TorchDistributor.

Third-party dependencies (torch, mlflow, pyarrow, ...) must exist on the executors: the same interpreter
path on every node (`python=`, default this one), or a packed virtualenv shipped with `archive=`
(`venv-pack -o dlpipe-env.tar.gz`; executors then run `./environment/bin/python`).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from jobs.config import ConfigError, load_config
from jobs.distributor import TORCHRUN_LOG_ENV, torchrun_log_dir

log = logging.getLogger("dlpipe.submit")

SUBMIT_STAGES = ("etl", "train", "promote", "score", "run")
PACKAGES = ("pipelines", "dl", "jobs")
ZIP_NAME = "dlpipe.zip"
DRIVER_NAME = "dlpipe_driver.py"
ARCHIVE_ALIAS = "environment"  # `--archives env.tar.gz#environment`: unpacked as ./environment on every node
DRIVER_SCRIPT = '''"""spark-submit entry point written by `dlpipe submit`: run one dlpipe stage in this Spark driver."""
import sys

from jobs.submit import driver_main

sys.exit(driver_main(sys.argv[1:]))
'''


class SubmitError(ConfigError):
    """The requested submission cannot work (unknown stage, master or deploy mode, missing settings): exit code 2."""


def project_root() -> Path:
    """The folder holding `pipelines/`, `dl/` and `jobs/` (what gets shipped)."""
    return Path(__file__).resolve().parent.parent


def package_project(dist_dir: str | Path, root: str | Path | None = None) -> tuple[Path, Path]:
    """Write `<dist>/dlpipe.zip` (every .py of pipelines/, dl/, jobs/) and the driver script; return both paths."""
    root = Path(root or project_root())
    dist = Path(dist_dir).resolve()
    dist.mkdir(parents=True, exist_ok=True)
    archive = dist / ZIP_NAME
    staging = dist / f".{ZIP_NAME}.tmp-{os.getpid()}"
    with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as zipped:
        for package in PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                if "__pycache__" not in path.parts:
                    zipped.write(path, path.relative_to(root).as_posix())
    staging.replace(archive)  # concurrent submits never see half a zip
    driver = dist / DRIVER_NAME
    if not driver.is_file() or driver.read_text() != DRIVER_SCRIPT:
        driver.write_text(DRIVER_SCRIPT)
    return archive, driver


def spark_submit_path() -> str:
    """`$SPARK_HOME/bin/spark-submit` when SPARK_HOME is set, else the one inside the pyspark package."""
    home = os.environ.get("SPARK_HOME")
    if home:
        return str(Path(home) / "bin" / "spark-submit")
    import pyspark

    return str(Path(pyspark.__file__).resolve().parent / "bin" / "spark-submit")


def _check_target(master: str, deploy_mode: str, conf: Mapping[str, str]) -> None:
    if not (master.startswith(("spark://", "k8s://", "local")) or master == "yarn"):
        raise SubmitError(f"master {master!r}: expected spark://HOST:PORT, yarn, k8s://https://HOST:PORT or local[N]")
    if deploy_mode not in ("client", "cluster"):
        raise SubmitError(f"deploy mode {deploy_mode!r}: expected 'client' or 'cluster'")
    if deploy_mode == "cluster" and (master.startswith(("spark://", "local"))):
        raise SubmitError(f"{master}: Spark runs Python drivers in cluster deploy mode on YARN and Kubernetes only; "
                          "use --deploy-mode client")
    if master.startswith("k8s://"):
        missing = [key for key in ("spark.kubernetes.container.image",) if key not in conf]
        if deploy_mode == "cluster" and "spark.kubernetes.file.upload.path" not in conf:
            missing.append("spark.kubernetes.file.upload.path")  # where spark-submit uploads the zip and the YAML
        if missing:
            raise SubmitError(f"{master}: set {', '.join(missing)} (--conf KEY=VALUE)")


def build_submit_command(
    stage: str,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    master: str = "local[*]",
    deploy_mode: str = "client",
    extra_conf: Mapping[str, str] | None = None,
    *,
    dist_dir: str | Path = "dist",
    python: str | None = None,
    archive: str | Path | None = None,
    stage_args: Sequence[str] = (),
) -> list[str]:
    """The spark-submit argv that runs `dlpipe STAGE config [overrides]` on `master` (packages the project first).

    `python`: the executors' interpreter (default: this one, at the same path on every node). `archive`: a
    packed virtualenv shipped with `--archives` instead (executors use `./environment/bin/python`).
    `extra_conf`: more `--conf` pairs (executor sizes, YARN queue, Kubernetes image, ...).
    `stage_args`: extra `dlpipe STAGE` options, e.g. ("--from", "promote") for `run`.
    """
    if stage not in SUBMIT_STAGES:
        raise SubmitError(f"stage {stage!r}: dlpipe submit runs one of {', '.join(SUBMIT_STAGES)}")
    conf = dict(extra_conf or {})
    _check_target(master, deploy_mode, conf)
    config = Path(config_path).resolve()
    cfg = load_config(config, overrides)  # a bad config fails here, before anything is submitted
    zipped, driver = package_project(dist_dir)

    if archive is not None:
        executor_python = f"./{ARCHIVE_ALIAS}/bin/python"
        driver_python = executor_python if deploy_mode == "cluster" else (python or sys.executable)
    else:
        executor_python = driver_python = python or sys.executable
    conf.setdefault("spark.pyspark.python", executor_python)
    conf.setdefault("spark.pyspark.driver.python", driver_python)
    # Executors fetch --py-files into their working directory; on PYTHONPATH it also reaches the torchrun
    # processes TorchDistributor starts there (Python workers alone get it on sys.path).
    conf.setdefault("spark.executorEnv.PYTHONPATH", ZIP_NAME)
    if stage in ("train", "run"):
        # A failed barrier stage would otherwise be retried from scratch; train.max_restarts governs retries.
        conf.setdefault("spark.task.maxFailures", "1")
        conf.setdefault("spark.stage.maxConsecutiveAttempts", "1")
        conf.setdefault("spark.dynamicAllocation.enabled", "false")  # barrier mode needs fixed executors
        conf.setdefault(f"spark.executorEnv.{TORCHRUN_LOG_ENV}", str(torchrun_log_dir(cfg)))  # removed after training

    # In cluster mode the driver runs remotely and reads the YAML shipped with --files from its working dir.
    driver_config = config.name if deploy_mode == "cluster" else str(config)
    command = [
        spark_submit_path(), "--master", master, "--deploy-mode", deploy_mode, "--name", f"dlpipe-{cfg.name}-{stage}",
        "--driver-memory", cfg.spark.driver_memory,
    ]
    command += ["--py-files", str(zipped), "--files", str(config)]
    if archive is not None:
        command += ["--archives", f"{Path(archive).resolve()}#{ARCHIVE_ALIAS}"]
    for key, value in conf.items():
        command += ["--conf", f"{key}={value}"]
    command += [str(driver), stage, driver_config, *overrides, f"spark.master={master}", *stage_args]
    return command


def parse_conf(pairs: Sequence[str]) -> dict[str, str]:
    """`--conf KEY=VALUE` arguments -> {KEY: VALUE}; a pair without `=` is a SubmitError."""
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--conf {pair!r}: expected KEY=VALUE")
        conf[key] = value
    return conf


def submit(command: Sequence[str]) -> int:
    """Run a spark-submit command (its output streams through); return its exit code."""
    log.info("submitting %s", " ".join(command))
    return subprocess.run(list(command), check=False).returncode


def driver_main(argv: Sequence[str]) -> int:
    """Inside the spark-submit driver: `STAGE config [overrides] [options]` through the `dlpipe` CLI, same exit
    codes; `train` and `run` train through TorchDistributor on the executors instead of a local torchrun."""
    from jobs import cli
    from jobs.distributor import cluster_training

    argv = list(argv)
    if argv and argv[0] in ("train", "run"):
        with cluster_training():
            return cli.main(argv)
    return cli.main(argv)
