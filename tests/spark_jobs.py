"""The jobs a SparkSession has run, with their descriptions, as its UI's REST API lists them (what a user sees)."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

from pyspark.sql import SparkSession

from pipelines.spark_progress import spark_step

MARK = "tests: every job before this one is listed"


def described_jobs(spark: SparkSession, timeout: float = 30.0) -> dict[int, str | None]:
    """Job id -> description of every job `spark` has run so far and its UI still lists. A job of this call's own
    marks the end: Spark's listener takes events in order, so once that job is listed as done, so is every earlier
    one."""
    mark = f"{MARK} ({uuid.uuid4().hex})"
    with spark_step(mark):
        spark.range(1).count()
    context = spark.sparkContext
    url = f"{context.uiWebUrl}/api/v1/applications/{context.applicationId}/jobs"
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            jobs = json.load(answer)
        if any(job.get("description") == mark and job["status"] == "SUCCEEDED" for job in jobs):
            return {job["jobId"]: job.get("description") for job in jobs
                    if not (job.get("description") or "").startswith(MARK)}
        if time.monotonic() > deadline:
            raise TimeoutError(f"Spark's UI did not list the job '{mark}' within {timeout} s")
        time.sleep(0.1)


def steps_in_order(jobs: dict[int, str | None], after: int = -1) -> list[str | None]:
    """The descriptions of the jobs after job id `after`, by job id, each run of one description once (an action can
    start more than one job)."""
    ordered = [jobs[job] for job in sorted(jobs) if job > after]
    return [description for i, description in enumerate(ordered) if i == 0 or ordered[i - 1] != description]
