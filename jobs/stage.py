"""Stage bookkeeping shared by every job: logging set-up and one concise summary line per stage.

Logs are text lines by default; `DLPIPE_LOG_FORMAT=json` (or `dlpipe --log-format json`, which sets it for the
torchrun ranks too) writes one JSON object per line for schedulers, the stage summaries' fields included.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_ENV = "DLPIPE_LOG_FORMAT"
LOG_FORMATS = ("text", "json")


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the record's `fields`, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_format() -> str:
    """The configured log format (`DLPIPE_LOG_FORMAT`): text or json."""
    chosen = os.environ.get(LOG_FORMAT_ENV, "text")
    if chosen not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV}={chosen!r}: expected one of {list(LOG_FORMATS)}")
    return chosen


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in the configured format (`log_format`); quiet the chattiest dependencies."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    if log_format() == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLinesFormatter())
    for noisy in ("py4j", "pyspark", "petastorm", "alembic", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def stage(name: str) -> Iterator[dict]:
    """Time a stage; the caller fills the yielded dict with counts, logged as one line at the end."""
    log = logging.getLogger(f"dlpipe.{name}")
    summary: dict = {}
    started = time.perf_counter()
    log.info("started")
    yield summary
    seconds = time.perf_counter() - started
    fields = " ".join(f"{key}={value}" for key, value in summary.items())
    log.info("done in %.1fs %s", seconds, fields, extra={"fields": {"stage": name, "seconds": round(seconds, 3), **summary}})
