"""Progress lines for long Spark work: while a job runs, each running stage's tasks done, every few seconds; and the
dlpipe step each Spark job belongs to.

Spark's own console progress bar redraws one terminal line; a scheduled job's log needs whole lines instead. Each
line names the step (`spark_step`) and the stage as Spark does (`parquet at ...`, `collect at
pipelines/quality.py:54`), e.g. `Spark stage 3 of write dataset (parquet at NativeMethodAccessorImpl.java:0): 5/12
tasks done, 2 running`. The step is also each job's description in the Spark UI and event log.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

from pyspark import SparkContext

log = logging.getLogger("dlpipe.spark")
STOP_WAIT = 10.0  # seconds `stop` waits for a status call in flight
JOB_DESCRIPTION = "spark.job.description"  # the local property SparkContext.setJobDescription sets

_REPORTERS: weakref.WeakKeyDictionary[SparkContext, StageProgress] = weakref.WeakKeyDictionary()
_step: str | None = None  # the step whose Spark jobs run now (the driver runs one step at a time)


@contextmanager
def spark_step(name: str) -> Iterator[None]:
    """Spark jobs started within the block (or by a function this decorates) are step `name` of the job: their
    description in the Spark UI and event log, and the step their progress lines name. Steps nest: the outer
    step's name is back after the inner one. The SparkContext must be running when the step starts."""
    global _step
    context = SparkContext._active_spark_context
    outer_step = _step
    outer = context.getLocalProperty(JOB_DESCRIPTION) if context is not None else None
    _step = name
    if context is not None:
        context.setJobDescription(name)
    try:
        yield
    finally:
        _step = outer_step
        if context is not None and context._jsc is not None:  # not stopped within the block
            context.setLocalProperty(JOB_DESCRIPTION, outer)  # None removes it


class StageProgress:
    """A daemon thread that logs, every `every` seconds, one line per running stage of `context`'s jobs; silent
    while none runs. It ends with `stop()`, at the interpreter's exit, or once the context is stopped."""

    def __init__(self, context: SparkContext, every: float):
        self._context = weakref.ref(context)
        self._tracker = context.statusTracker()
        self._every = every
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlpipe-spark-progress", daemon=True)

    def start(self) -> StageProgress:
        self._thread.start()
        atexit.register(self.stop)  # before the interpreter's shutdown, never while a line is half written
        return self

    def stop(self) -> None:
        """Stop reporting; returns once the thread has ended, or after STOP_WAIT seconds of a JVM that does not answer
        (the thread is a daemon: it never holds the interpreter's exit)."""
        self._stopped.set()
        self._thread.join(STOP_WAIT)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def report(self) -> None:
        """Log one line per running stage: the step it is part of, its tasks done, running and failed (when any) of
        all."""
        step = _step
        for stage_id in sorted(self._tracker.getActiveStageIds()):
            stage = self._tracker.getStageInfo(stage_id)
            if stage is None:  # ended since the ids were read
                continue
            failed = f", {stage.numFailedTasks} failed" if stage.numFailedTasks else ""
            log.info("Spark stage %d%s (%s): %d/%d tasks done, %d running%s", stage_id, f" of {step}" if step else "",
                     stage.name, stage.numCompletedTasks, stage.numTasks, stage.numActiveTasks, failed,
                     extra={"fields": {"spark_stage": stage_id, "spark_step": step,
                                       "tasks_done": stage.numCompletedTasks, "tasks": stage.numTasks,
                                       "tasks_running": stage.numActiveTasks, "tasks_failed": stage.numFailedTasks}})

    def _run(self) -> None:
        while not self._stopped.wait(self._every):
            if self._context_stopped():
                return
            try:
                self.report()
            except Exception as exc:  # noqa: BLE001 - stopped between the check and the report: nothing to report
                log.debug("Spark progress lines end: %s", exc)
                return

    def _context_stopped(self) -> bool:
        context = self._context()
        return context is None or context._jsc is None  # SparkContext.stop clears _jsc


def report_progress(context: SparkContext, every: float) -> StageProgress | None:
    """Start reporting `context`'s running stages every `every` seconds, once per context (a session got again
    keeps its reporter); None when `every` is 0 (`spark.progress_seconds: 0`: no progress lines)."""
    if every <= 0:
        return None
    reporter = _REPORTERS.get(context)
    if reporter is None or not reporter.running:
        reporter = _REPORTERS[context] = StageProgress(context, every).start()
    return reporter
