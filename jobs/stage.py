"""Stage bookkeeping shared by every job: logging set-up and one concise summary line per stage."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in one format; quiet the chattiest dependencies."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
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
    fields = " ".join(f"{key}={value}" for key, value in summary.items())
    log.info("done in %.1fs %s", time.perf_counter() - started, fields)
