"""What every benchmark shares: the machine it ran on, the load on it while it ran, and peak RSS of process trees.

Standard library only at import time (psutil is imported by `PeakRss` alone), so the training benchmark can use
it on a GPU machine without pyspark, mlflow, petastorm or psutil.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata

VERSIONED = ("torch", "pyarrow", "numpy", "pandas", "polars", "pyspark", "mlflow", "petastorm")


def versions() -> dict[str, str]:
    """Python and the installed versions of the libraries the benchmarks measure (absent ones left out)."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> dict:
    """CPU model, usable cores, memory, OS and library versions of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(),
    }


def describe_machine(info: dict) -> str:
    """One line naming a `machine()` record (and its GPU, when the record has one)."""
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    libs = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    return f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']:g} GB{gpu}, {info['os']}; {libs}"


class Sampler:
    """A background thread calling `sample()` every `interval` seconds between `__enter__` and `__exit__`."""

    interval = 0.05

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.sample()
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class PeakRss(Sampler):
    """Peak summed RSS of process `pid` (default: this one) and its children (all descendants when `recursive`).

    With `proportional`, the summed PSS instead: a page shared by several processes counts once. A process tree's
    RSS counts shared pages once per process, e.g. a JVM caught between fork and exec (Hadoop's local file system
    starts `chmod` and the like) shows the whole JVM twice. PSS is dear: the kernel walks every page table entry of
    the process (about 12 ms of CPU per GB), so it is read only when the tree's cheap RSS has grown since the last
    reading, and no more often than keeps it under `budget` of one core; the sampler would otherwise take a third
    of a core from the job it measures.
    """

    def __init__(self, pid: int | None = None, recursive: bool = True, proportional: bool = False,
                 budget: float = 0.05):
        import psutil

        self._error = psutil.Error
        self.process = psutil.Process(pid)
        self.recursive = recursive
        self.proportional = proportional
        self.budget = budget
        self.peak = 0
        self._rss_at_last_reading = 0
        self._next_reading = 0.0

    def sample(self) -> None:
        try:
            procs = [self.process, *self.process.children(recursive=self.recursive)]
        except self._error:
            return
        rss = self._sum(procs, lambda proc: proc.memory_info().rss)
        if not self.proportional:
            self.peak = max(self.peak, rss)
            return
        started = time.monotonic()
        if rss <= self._rss_at_last_reading or started < self._next_reading:
            return
        self.peak = max(self.peak, self._sum(procs, lambda proc: proc.memory_full_info().pss))
        self._rss_at_last_reading = rss
        self._next_reading = started + (time.monotonic() - started) / self.budget

    def _sum(self, procs, reading) -> int:
        total = 0
        for proc in procs:
            try:
                total += reading(proc)
            except self._error:
                pass
        return total


class LoadAverage(Sampler):
    """The 1-minute load average sampled every 5 s over a benchmark: its mean and maximum."""

    interval = 5.0

    def __init__(self):
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "samples": len(self.samples)}
