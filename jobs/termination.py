"""A scheduler's SIGTERM (timeout, cancel) turned into an exception, so that a stopped job cleans up after itself."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a job ended by SIGTERM
RECHECK_S = 0.1

_requested: list[str] = []  # why the job is stopping, once SIGTERM has arrived
_settled: list[bool] = []  # set once the job has stopped: nothing is raised after that


class Terminated(BaseException):
    """SIGTERM arrived. Raised in the main thread so every `with` block unwinds: MLflow runs end, staging and scratch
    folders go, locks are released, child processes are stopped. A BaseException, like KeyboardInterrupt: no
    `except Exception` swallows it."""


@contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; the previous handlers come back after it.
    Only the main thread can handle signals: in another one the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    _settled.clear()
    before = signal.signal(signal.SIGTERM, _terminate), signal.getsignal(signal.SIGALRM)
    try:
        yield
    finally:
        settle()
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGALRM, before[1])


def stop_requested() -> str | None:
    """Why the job is stopping (SIGTERM arrived), or None."""
    return _requested[0] if _requested else None


def settle() -> None:
    """The job has ended (its failure is being reported): raise nothing more, cancel a pending look (`RECHECK_S`)."""
    _settled.append(True)
    signal.setitimer(signal.ITIMER_REAL, 0)


def _terminate(signum: int, frame) -> None:
    if not _requested:
        _requested.append(f"stopped by {signal.Signals(signum).name}")
        _stop_spark()
    _raise_outside_the_jvm(frame)


def _raise_outside_the_jvm(frame) -> None:
    """Raise `Terminated` now, unless the main thread is inside a call to the JVM (PySpark keeps one connection per
    thread, and a call cut short leaves its answer unread for the next one) or already unwinding from an exception
    (its clean-up, e.g. removing a staging folder, must not be cut short). Then look again in RECHECK_S: Spark is
    stopped, so a call to it returns soon, with an error."""
    if _settled:
        return
    if _in_jvm_call(frame) or sys.exc_info()[1] is not None:
        signal.signal(signal.SIGALRM, lambda _, later: _raise_outside_the_jvm(later))
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    raise Terminated(stop_requested())


def _in_jvm_call(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("py4j"):
            return True
        frame = frame.f_back
    return False


def _stop_spark() -> None:
    """Stop this process's SparkContext, from another thread (the main thread's connection to the JVM may be busy):
    its running jobs are cancelled and its tasks end, and every later call on it fails at once, so the main thread
    gets out of Spark quickly. Clean-up that follows (removing a staging folder) then races no task."""
    pyspark = sys.modules.get("pyspark")
    context = pyspark.SparkContext._active_spark_context if pyspark else None
    if context is None:
        return
    worker = threading.Thread(target=context.stop, name="dlpipe-stop-spark")
    worker.start()
    worker.join()
