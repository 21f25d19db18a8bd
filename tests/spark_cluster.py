"""A real Spark standalone cluster on 127.0.0.1 for tests: one master, N workers, free ports, logs kept.

`standalone_cluster(root)` starts `spark-class ...deploy.master.Master` and `...deploy.worker.Worker`
processes (each in its own process group), waits until every worker is registered with the master, and
stops them all (executors and their Python workers included) when the block ends.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyspark

from ports import HOST, free_port

SPARK_HOME = Path(pyspark.__file__).resolve().parent


def spark_env() -> dict[str, str]:
    """The environment for cluster daemons and spark-submit: this pyspark, bound to 127.0.0.1."""
    return {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": HOST, "SPARK_LOCAL_HOSTNAME": HOST}


@dataclass
class StandaloneCluster:
    """A running master and its workers: where to submit, where the logs are."""

    root: Path
    master_port: int
    ui_port: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.master_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.ui_port}"

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-class"), *args],
            stdout=log, stderr=subprocess.STDOUT, env=spark_env(), cwd=self.root, start_new_session=True,
        )
        log.close()

    def start_master(self) -> None:
        self._start(
            "master", "org.apache.spark.deploy.master.Master",
            "--host", HOST, "--port", str(self.master_port), "--webui-port", str(self.ui_port),
        )

    def start_worker(self, index: int, cores: int, memory: str) -> None:
        work_dir = self.root / f"worker-{index}"
        work_dir.mkdir(exist_ok=True)
        self._start(
            f"worker-{index}", "org.apache.spark.deploy.worker.Worker",
            "--host", HOST, "--port", str(free_port()), "--webui-port", str(free_port()),
            "--cores", str(cores), "--memory", memory, "--work-dir", str(work_dir), self.master_url,
        )

    def state(self) -> dict:
        """The master's status JSON (workers, applications); {} while it is not up yet."""
        try:
            with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return {}

    def wait_for_workers(self, count: int, timeout_s: float = 120) -> None:
        """Block until `count` workers are ALIVE at the master; fail naming the dead process otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"spark {name} exited with {process.returncode}\n{self.logs()}")
            alive = [w for w in self.state().get("workers", []) if w.get("state") == "ALIVE"]
            if len(alive) >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} workers did not register at {self.master_url} in {timeout_s:.0f}s\n{self.logs()}")

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker `index`: its JVM and its process group, i.e. its executors and their Python workers too."""
        _signal_group(self.processes[f"worker-{index}"], signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM every daemon's process group (executors and Python workers too), then SIGKILL stragglers."""
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # the group may outlive its leader (executor JVMs)
            process.wait()

    def logs(self, tail_chars: int = 6000) -> str:
        """The tail of every daemon log and executor stderr/stdout, for a failing test's report."""
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("worker-*/app-*/*/std*")):
            text = path.read_text(errors="replace")
            parts.append(f"----- {path} (last {tail_chars} chars) -----\n{text[-tail_chars:]}")
        return "\n".join(parts)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def standalone_cluster(root: Path, workers: int = 2, cores: int = 1, memory: str = "1g") -> Iterator[StandaloneCluster]:
    """Start a master and `workers` workers on 127.0.0.1 with free ports; stop all of them on exit."""
    root.mkdir(parents=True, exist_ok=True)
    cluster = StandaloneCluster(root, free_port(), free_port())
    try:
        cluster.start_master()
        for index in range(workers):
            cluster.start_worker(index, cores, memory)
        cluster.wait_for_workers(workers)
        yield cluster
    finally:
        cluster.stop()
