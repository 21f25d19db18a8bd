"""Scoring loads models only from the configured registry: a file path, a runs:/ URI or another store's URI is
refused before anything is loaded (a pickled pyfunc from elsewhere would run arbitrary code), and a model the
registry does not have is named, with the data exit code, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import EXIT_CONFIG, EXIT_DATA

DIGITS = Path(__file__).resolve().parents[2] / "conf" / "digits_cnn.yaml"


def _score(tmp_path: Path, model: str) -> subprocess.CompletedProcess:
    """`dlpipe score` of `model` in a fresh process, with the pipeline's sqlite registry in `tmp_path/run`."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "score", str(DIGITS), f"run_dir={tmp_path / 'run'}", "--model", model,
         "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("model", ["/tmp/somewhere/model", "runs:/0123abcd/model", "models://other-store@profile/x/1"])
def test_a_model_outside_the_configured_registry_is_refused(tmp_path, model):
    run_dir = tmp_path / "run"
    done = _score(tmp_path, model)
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.strip().splitlines()[-1] == (
        f"dlpipe: config error: model uri {model!r}: expected models:/NAME/VERSION, models:/NAME/latest or "
        f"models:/NAME@alias; models are scored only from the configured registry sqlite:///{run_dir.resolve()}/mlflow.db"
    )
    assert not (tmp_path / "out").exists()


def test_a_model_the_registry_does_not_have_exits_with_the_data_code_naming_it(tmp_path):
    done = _score(tmp_path, "models:/digits-cnn@champion")  # a new registry: nothing trained or promoted yet
    assert done.returncode == EXIT_DATA
    assert done.stderr.strip().splitlines()[-1] == (
        "dlpipe: model not found: models:/digits-cnn@champion: the registry has no model named 'digits-cnn'"
    )
    assert not (tmp_path / "out").exists()
