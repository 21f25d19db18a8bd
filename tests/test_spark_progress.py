"""Progress lines for long Spark work (pipelines/spark_progress.py), read from a real local[2] session's jobs."""
from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from jobs.config import SparkConf
from pipelines.spark import spark_session
from pipelines.spark_progress import JOB_DESCRIPTION, StageProgress, report_progress, spark_step
from tests.spark_jobs import described_jobs, steps_in_order

PROGRESS_THREAD = "dlpipe-spark-progress"
LINE = re.compile(r"Spark stage (\d+)(?: of (.+))? \((.+)\): (\d+)/(\d+) tasks done, (\d+) running")


def _slow_count(spark, tasks: int, seconds: float) -> int:
    """A job of one stage of `tasks` tasks, each taking `seconds`."""
    def slow(rows):
        time.sleep(seconds)
        yield from rows
    return spark.sparkContext.parallelize(range(tasks), tasks).mapPartitions(slow).count()


def _progress_threads() -> int:
    return sum(thread.name == PROGRESS_THREAD for thread in threading.enumerate())


def _progress_lines(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "dlpipe.spark"]


def test_a_running_stage_is_logged_with_its_step_and_tasks_done_until_the_reporter_stops(spark, caplog):
    """6 tasks of 0.6 s on 2 cores run ~1.8 s: reported every 0.2 s, the lines name the step and the stage and count
    its tasks done (growing), running and in all (6); after `stop` nothing more is logged."""
    caplog.set_level(logging.INFO, logger="dlpipe.spark")
    report_progress(spark.sparkContext, 30).stop()  # the shared session's own reporter: its lines would mix in
    reporter = StageProgress(spark.sparkContext, every=0.2).start()
    try:
        with spark_step("count slowly"):
            assert _slow_count(spark, tasks=6, seconds=0.6) == 6
    finally:
        reporter.stop()
    assert not reporter.running
    records = _progress_lines(caplog)
    matches = [LINE.fullmatch(record.getMessage()) for record in records]
    assert len(matches) >= 3 and all(matches), [record.getMessage() for record in records]
    assert {m[2] for m in matches} == {"count slowly"}
    assert len({m[1] for m in matches}) == 1 and "count at" in matches[0][3]  # one stage, named as Spark names it
    done = [int(m[4]) for m in matches]
    assert done == sorted(done) and done[0] < 6
    assert {int(m[5]) for m in matches} == {6} and any(int(m[6]) > 0 for m in matches)
    assert records[0].fields == {"spark_stage": int(matches[0][1]), "spark_step": "count slowly",
                                 "tasks_done": done[0], "tasks": 6, "tasks_running": int(matches[0][6]),
                                 "tasks_failed": 0}  # for --log-format json
    _slow_count(spark, tasks=2, seconds=0.5)
    assert len(_progress_lines(caplog)) == len(records)


def test_a_stage_outside_any_step_is_logged_without_one(spark, caplog):
    caplog.set_level(logging.INFO, logger="dlpipe.spark")
    reporter = StageProgress(spark.sparkContext, every=0.2).start()
    try:
        _slow_count(spark, tasks=4, seconds=0.5)
    finally:
        reporter.stop()
    records = _progress_lines(caplog)
    matches = [LINE.fullmatch(record.getMessage()) for record in records]
    assert matches and all(m and m[2] is None for m in matches), [record.getMessage() for record in records]
    assert records[0].fields["spark_step"] is None


def test_a_step_is_the_description_of_its_jobs_and_steps_nest(spark):
    """What the Spark UI (and the event log, and a history server) shows for each job: the step it ran in; the outer
    step's description is back after an inner one, and the description from before the outermost after it, also
    when the step fails."""
    context = spark.sparkContext
    context.setJobDescription("before any step")

    @spark_step("inner")
    def inner_count() -> int:
        assert context.getLocalProperty(JOB_DESCRIPTION) == "inner"
        return spark.range(5).count()

    try:
        before = max(described_jobs(spark), default=-1)
        with spark_step("outer"):
            spark.range(3).count()
            assert inner_count() == 5
            assert context.getLocalProperty(JOB_DESCRIPTION) == "outer"
            spark.range(4).count()
        assert context.getLocalProperty(JOB_DESCRIPTION) == "before any step"
        spark.range(2).count()
        with pytest.raises(ValueError, match="the step failed"), spark_step("failing"):
            raise ValueError("the step failed")
        assert context.getLocalProperty(JOB_DESCRIPTION) == "before any step"
        jobs = described_jobs(spark)
    finally:
        context.setLocalProperty(JOB_DESCRIPTION, None)
    assert steps_in_order(jobs, after=before) == ["outer", "inner", "outer", "before any step"]


def test_one_reporter_per_context_none_with_progress_seconds_0_and_none_left_after_the_context_stops(spark):
    """A session got again keeps its reporter, `spark_session` starts one where none runs, `spark.progress_seconds: 0`
    starts none; a reporter whose context was stopped (SparkContext.stop clears `_jsc`) ends by itself at its next
    tick."""
    assert report_progress(spark.sparkContext, 0) is None
    first = report_progress(spark.sparkContext, 60)
    try:
        assert first is not None and first.running
        assert report_progress(spark.sparkContext, 60) is first
    finally:
        first.stop()
    assert report_progress(spark.sparkContext, 0) is None
    reporting = _progress_threads()
    again = spark_session(SparkConf(master="local[2]", driver_memory="1g", shuffle_partitions=4), "dlpipe-tests")
    assert again is spark and _progress_threads() == reporting + 1  # every stage's session reports (default 30 s)

    class StoppedContext:
        _jsc = None

        def statusTracker(self):
            return None

    context = StoppedContext()
    orphan = StageProgress(context, every=0.05).start()
    deadline = time.monotonic() + 10
    while orphan.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not orphan.running
