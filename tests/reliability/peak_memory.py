"""Run a command and record the peak resident memory of every process in its tree (the kernel's VmHWM)."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil


@dataclass
class Measured:
    """A finished command: exit code, output, wall seconds, and per process (pid) its peak RSS and command line."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_mib: dict[int, float] = field(default_factory=dict)
    cmdlines: dict[int, list[str]] = field(default_factory=dict)

    def peak(self, is_wanted: Callable[[list[str]], bool]) -> tuple[float, list[str]]:
        """(peak RSS in MiB, command line) of the largest process whose command line `is_wanted`."""
        pid = max((p for p, cmd in self.cmdlines.items() if is_wanted(cmd)), key=self.peak_mib.__getitem__)
        return self.peak_mib[pid], self.cmdlines[pid]


def _high_water_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(command: list[str], *, cwd: Path, timeout_s: float, env: dict | None = None,
                 poll_s: float = 0.2) -> Measured:
    """Run `command` to completion, polling the peak RSS of it and all its descendants every `poll_s` seconds.

    VmHWM only grows, so the last value read before a process exits is its peak up to that poll.
    """
    out, err = Path(cwd) / ".measured.out", Path(cwd) / ".measured.err"
    started = time.monotonic()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
        measured = Measured(0, "", "", 0.0)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            if time.monotonic() - started > timeout_s:
                process.kill()
                process.wait()
                raise TimeoutError(f"{command} ran past {timeout_s}s; stderr:\n{err.read_text()[-3000:]}")
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for proc in tree:
                peak = _high_water_mib(proc.pid)
                if peak is None:
                    continue
                try:
                    measured.cmdlines[proc.pid] = proc.cmdline()  # read again: spark-class execs java in its process
                except psutil.Error:
                    continue
                measured.peak_mib[proc.pid] = max(peak, measured.peak_mib.get(proc.pid, 0.0))
            time.sleep(poll_s)
    measured.returncode, measured.seconds = process.returncode, time.monotonic() - started
    measured.stdout, measured.stderr = out.read_text(), err.read_text()
    return measured
