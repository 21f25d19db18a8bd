"""Atomic outputs: write into a temporary sibling, then swap it into place in one rename; and the locks
that keep two writers of one output (or two runs of one pipeline) apart."""
from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator


class LockHeld(RuntimeError):
    """Another process holds the lock: a run of the same pipeline, or a job writing the same output."""


class OutputLocked(LockHeld):
    """Another job is writing the same output path."""


@contextmanager
def exclusive_lock(path: Path, what: str, error: type[LockHeld] = LockHeld) -> Iterator[None]:
    """Hold an flock on `path` for the block; when another process holds it raise `error` at once (never wait),
    naming `what` and the holder. The kernel releases the lock when its holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise error(f"{what} ({holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def output_lock(target: Path) -> AbstractContextManager[None]:
    """Hold `<parent>/.<name>.lock` while a job writes `target`; a second writer gets OutputLocked at once."""
    target = Path(target).resolve()
    return exclusive_lock(target.with_name(f".{target.name}.lock"), f"output {target} is being written by another job",
                          OutputLocked)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temp directory next to `target`; on success it replaces `target`, on error it is removed.

    Staging folders left by a killed earlier writer are removed first, so callers must hold the pipeline
    lock or `output_lock(target)`: another live writer's staging folder would go too.
    """
    target = Path(target)
    staging = _fresh_staging(target)
    try:
        yield staging
        previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(previous)
        staging.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def scratch_directory(target: Path) -> Iterator[Path]:
    """Yield a temp directory next to `target` for intermediate files, removed when the block ends (even on error).

    Like `atomic_directory`, it first removes the folders a killed earlier run left: hold the pipeline lock.
    """
    scratch = _fresh_staging(Path(target))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fresh_staging(target: Path) -> Path:
    """A new `.<name>.tmp-<id>` path next to `target` (not created), after removing what earlier writers left: their
    staging folders, and replaced outputs (`.<name>.old-<id>`) a writer killed while deleting them did not finish."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(text)
    staging.replace(path)
