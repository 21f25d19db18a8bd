"""A scheduler's SIGTERM (timeout, cancel) or a user's Ctrl-C (SIGINT) turned into an exception, so that a stopped job
cleans up after itself and exits 128 + the signal's number."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a job ended by SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RECHECK_S = 0.1

_requested: list[signal.Signals] = []  # the signal that is stopping the job, once one has arrived
_settled: list[bool] = []  # set once the job has stopped: nothing is raised after that


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived. Raised in the main thread so every `with` block unwinds: MLflow runs end, staging and
    scratch folders go, locks are released, child processes are stopped. A BaseException, like KeyboardInterrupt: no
    `except Exception` swallows it."""


@contextmanager
def raise_on_stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Terminated` in the main thread; the previous handlers come back
    after it. Only the main thread can handle signals: in another one the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    _settled.clear()
    before = {number: signal.getsignal(number) for number in (*STOP_SIGNALS, signal.SIGALRM)}
    for number in STOP_SIGNALS:
        signal.signal(number, _terminate)
    try:
        yield
    finally:
        settle()
        for number, handler in before.items():
            signal.signal(number, handler)


def reclaim_sigint() -> None:
    """Take SIGINT back inside a `raise_on_stop_signals` block: PySpark's SparkContext installs its own handler (it
    calls the JVM from inside the signal handler, which fails while the main thread is in a JVM call)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _terminate:
        signal.signal(signal.SIGINT, _terminate)


def stop_requested() -> str | None:
    """Why the job is stopping (`stopped by SIGTERM`), or None."""
    return f"stopped by {_requested[0].name}" if _requested else None


def stop_exit_code() -> int:
    """The exit code of a job stopped by a signal, as a shell reports it: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + _requested[0] if _requested else EXIT_TERMINATED


def settle() -> None:
    """The job has ended (its failure is being reported): raise nothing more, cancel a pending look (`RECHECK_S`)."""
    _settled.append(True)
    signal.setitimer(signal.ITIMER_REAL, 0)


def _terminate(signum: int, frame) -> None:
    if not _requested:
        _requested.append(signal.Signals(signum))
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
