"""Scoring loads models only from the configured registry: a file path, a runs:/ URI or another store's URI is
refused before anything is loaded (a pickled pyfunc from elsewhere would run arbitrary code)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import EXIT_CONFIG

DIGITS = Path(__file__).resolve().parents[2] / "conf" / "digits_cnn.yaml"


@pytest.mark.parametrize("model", ["/tmp/somewhere/model", "runs:/0123abcd/model", "models://other-store@profile/x/1"])
def test_a_model_outside_the_configured_registry_is_refused(tmp_path, model):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "score", str(DIGITS), f"run_dir={run_dir}", "--model", model,
         "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.strip().splitlines()[-1] == (
        f"dlpipe: config error: model uri {model!r}: expected models:/NAME/VERSION, models:/NAME/latest or "
        f"models:/NAME@alias; models are scored only from the configured registry sqlite:///{run_dir.resolve()}/mlflow.db"
    )
    assert not (tmp_path / "out").exists()
