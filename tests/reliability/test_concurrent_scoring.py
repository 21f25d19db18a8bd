"""Two real `dlpipe score` processes at once, on one model alias in one sqlite registry: to two outputs both
finish complete and correct; to one output the result is one whole job's, and a job that finds the output
locked exits with the lock code and says so."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from jobs.cli import EXIT_LOCKED
from pipelines.atomic import OutputLocked, output_lock
from registry_helpers import expected, network, pipeline_config, raw_rows, register, scaler, tracking, write_dataset

NAME = "concurrent-cnn"
ROWS = {"a": 600, "b": 900}  # two inputs of different sizes and keys: an output shows which job wrote it


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A small CNN registered as `champion`, the pipeline YAML the jobs run with, and two Parquet inputs."""
    root = tmp_path_factory.mktemp("concurrent-scoring")
    cfg = pipeline_config(root, "concurrent-scoring", NAME, score={"batch_size": 64, "drift": {"action": "off"}})
    fitted = scaler()
    with tracking(cfg.tracking_uri):
        experiment = mlflow.create_experiment(cfg.experiment_name, artifact_location=cfg.artifact_location)
        net = network(cfg, fitted, seed=3)
        version = register(cfg, net, fitted, experiment)
        MlflowClient().set_registered_model_alias(NAME, "champion", str(version.version))
    config = root / "pipeline.yaml"
    config.write_text(cfg.to_yaml())
    inputs = {}
    for seed, (name, rows) in enumerate(ROWS.items()):
        raw = raw_rows(rows, seed=seed)
        ids = write_dataset(root / f"input-{name}", raw, files=3, ids=[f"{name}/{i:05d}" for i in range(rows)])
        inputs[name] = SimpleNamespace(path=root / f"input-{name}", raw=raw, ids=ids)
    return SimpleNamespace(cfg=cfg, config=config, root=root, net=net, scaler=fitted, inputs=inputs,
                           version=str(version.version))


def _score(registry, input_name: str, output: Path) -> subprocess.Popen:
    """Start `dlpipe score` on the champion alias (the default model) for one input."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "score", str(registry.config),
         "--input", str(registry.inputs[input_name].path), "--output", str(output)],
        cwd=registry.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(process: subprocess.Popen, timeout_s: float = 900) -> tuple[int, str]:
    """(exit code, stderr) of a finished job; a job still running after `timeout_s` is killed and fails the test."""
    try:
        _, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"{process.args} still running after {timeout_s:.0f}s: {err[-3000:]}")
    return process.returncode, err


def _check_output(registry, output: Path, input_name: str) -> None:
    """`output` holds exactly one job's complete result: every row of the input, scored as torch scores it."""
    source = registry.inputs[input_name]
    assert (output / "_SUCCESS").is_file(), f"{output} has no completion marker"
    table = pq.read_table(output).sort_by("id")
    assert table.column("id").to_pylist() == sorted(source.ids)
    order = np.argsort(source.ids)
    want_class, want_probability = expected(registry.net, registry.scaler, source.raw[order])
    np.testing.assert_array_equal(table.column("prediction").to_numpy(), want_class)
    np.testing.assert_allclose(np.stack(table.column("probability").to_numpy(zero_copy_only=False)),
                               want_probability, rtol=1e-5, atol=1e-6)
    assert set(table.column("model_version").to_pylist()) == {registry.version}
    leftovers = [*output.parent.glob(f".{output.name}.tmp-*"), *output.parent.glob(f".{output.name}.old-*")]
    assert not leftovers, f"staging folders left beside {output}: {leftovers}"


def _score_runs(registry, output: Path) -> list:
    """The finished MLflow score runs that wrote `output`."""
    with tracking(registry.cfg.tracking_uri):
        runs = mlflow.search_runs(experiment_names=[registry.cfg.experiment_name], output_format="list",
                                  filter_string="tags.`dlpipe.stage` = 'score'")
    return [r for r in runs if r.data.tags["output.path"] == str(output.resolve()) and r.info.status == "FINISHED"]


def test_a_second_holder_of_an_output_lock_is_refused_naming_the_output_and_holder(tmp_path):
    target = tmp_path / "predictions"
    with output_lock(target):
        with pytest.raises(OutputLocked, match=rf"output {target} is being written by another job \(pid \d+ since"):
            with output_lock(target):
                pass
    with output_lock(target):  # released: the next job takes it
        pass


@pytest.mark.slow
def test_two_scoring_jobs_to_two_outputs_both_finish_complete(registry):
    outputs = {name: registry.root / f"predictions-{name}" for name in ROWS}
    jobs = {name: _score(registry, name, outputs[name]) for name in ROWS}  # started together
    finished = {name: _finish(job) for name, job in jobs.items()}
    for name, (code, err) in finished.items():
        assert code == 0, f"job {name} exited {code}: {err[-3000:]}"
        _check_output(registry, outputs[name], name)
        assert len(_score_runs(registry, outputs[name])) == 1


@pytest.mark.slow
def test_two_scoring_jobs_to_one_output_leave_one_whole_result_and_a_clear_refusal(registry):
    output = registry.root / "predictions-shared"
    jobs = {name: _score(registry, name, output) for name in ROWS}  # started together, same output
    finished = {name: _finish(job) for name, job in jobs.items()}
    winners = [name for name, (code, _) in finished.items() if code == 0]
    assert winners, f"no job succeeded: {finished}"
    for name, (code, err) in finished.items():
        if code != 0:
            assert code == EXIT_LOCKED, f"job {name} exited {code}: {err[-3000:]}"
            assert err.strip().splitlines()[-1].startswith(
                f"dlpipe: locked: output {output.resolve()} is being written by another job (pid ")
    written = [name for name in winners if pq.read_table(output).num_rows == ROWS[name]]
    assert len(written) == 1, f"{output} holds {pq.read_table(output).num_rows} rows, no winner's {ROWS}"
    _check_output(registry, output, written[0])
    assert len(_score_runs(registry, output)) == len(winners)  # a refused job started no MLflow run


@pytest.mark.slow
def test_a_job_whose_output_is_locked_exits_with_the_lock_code_before_scoring(registry):
    output = registry.root / "predictions-held"
    with output_lock(output):
        code, err = _finish(_score(registry, "a", output))
    assert code == EXIT_LOCKED
    assert err.strip().splitlines()[-1].startswith(f"dlpipe: locked: output {output.resolve()} is being written by")
    assert not output.exists() and not _score_runs(registry, output)
