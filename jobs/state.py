"""Stage bookkeeping for scheduled runs: completion markers with fingerprints, and one lock per pipeline.

A stage is complete only when its marker `<run_dir>/.state/<stage>.json` exists; the marker is written
after the stage's output has been committed (atomically renamed), so a stage killed mid-write leaves
no marker and the next run redoes it. The marker's fingerprint hashes the stage's config sections and
its inputs; an unchanged fingerprint means the stage can be skipped.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import AbstractContextManager
from pathlib import Path

from jobs.config import PipelineConfig
from pipelines.atomic import LockHeld, exclusive_lock, write_text_atomic


class PipelineLocked(LockHeld):
    """Another process is running this pipeline (same run_dir)."""


class StageIncomplete(RuntimeError):
    """A stage's input was never completed (no marker): run the upstream stage first."""


def fingerprint(*parts: object) -> str:
    """A stable sha256 over JSON-serialisable parts (config sections, upstream fingerprints, listings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_listing(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under `root`: a cheap change detector for raw inputs."""
    root = Path(root)
    if root.is_file():
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    listing = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        listing.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return listing


def section_hash(cfg: PipelineConfig, *sections: str) -> str:
    """Fingerprint of the named config sections only (so an unrelated change does not redo a stage)."""
    data = cfg.model_dump(mode="json")
    return fingerprint({name: data[name] for name in sections})


def marker_path(cfg: PipelineConfig, stage: str) -> Path:
    return cfg.run_dir / ".state" / f"{stage}.json"


def read_marker(cfg: PipelineConfig, stage: str) -> dict | None:
    """The completion marker of `stage`, or None when the stage never completed."""
    path = marker_path(cfg, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def require_complete(cfg: PipelineConfig, stage: str, needed_by: str) -> dict:
    """The marker of an upstream stage; StageIncomplete naming both stages when it is missing."""
    marker = read_marker(cfg, stage)
    if marker is None:
        raise StageIncomplete(
            f"{needed_by} needs the {stage} stage's output, which is not marked complete in {cfg.run_dir} "
            f"(run `dlpipe {stage}` or `dlpipe run` first)"
        )
    return marker


def mark_complete(cfg: PipelineConfig, stage: str, stage_fingerprint: str, summary: dict) -> None:
    """Record that `stage` finished with `stage_fingerprint` (call only after its output is committed)."""
    marker = {"stage": stage, "fingerprint": stage_fingerprint, "finished_at": time.time(), "summary": summary}
    write_text_atomic(marker_path(cfg, stage), json.dumps(marker, indent=2, default=str))


def clear_marker(cfg: PipelineConfig, stage: str) -> None:
    """Forget that `stage` completed (its upstream changed, so downstream work must be redone)."""
    marker_path(cfg, stage).unlink(missing_ok=True)


def pipeline_lock(cfg: PipelineConfig) -> AbstractContextManager[None]:
    """Hold `<run_dir>/.lock` for the duration; a second holder gets PipelineLocked at once, never waits."""
    return exclusive_lock(cfg.run_dir / ".lock", f"pipeline {cfg.name} is already running in {cfg.run_dir}",
                          PipelineLocked)
