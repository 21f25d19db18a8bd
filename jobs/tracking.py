"""Fail fast, before any work, when the MLflow tracking store a stage needs cannot be reached."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking/registry store is unreachable or unusable."""


def require_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Check an http(s) server's /health, or that a sqlite store's folder can be created; raise if not."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {reason}")
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(f"MLflow sqlite store {uri}: cannot create {folder}: {exc}") from None
