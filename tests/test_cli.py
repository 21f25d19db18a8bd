"""The `dlpipe` command as a scheduler sees it: exit codes, one-line reasons, and the whole chain end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient

from jobs.cli import EXIT_CONFIG, EXIT_DATA, main
from jobs.config import load_config
from jobs.run import RunReport
from jobs.sample import write_breast_cancer, write_digits
from jobs.stage import LOG_FORMAT_ENV, configure_logging, stage
from jobs.train import THREADS_VARIABLE, rank_environment

DIGITS = Path(__file__).resolve().parents[1] / "conf" / "digits_cnn.yaml"
BREAST_CANCER = DIGITS.with_name("breast_cancer_anomaly.yaml")


def dlpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed `dlpipe` entry point in a fresh process, as cron or Airflow would."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("sample", "validate", "etl", "train", "score", "run", "demo"):
        assert command in out
    assert "exit codes" in out
    with pytest.raises(SystemExit):
        main(["promote", "--help"])
    assert "both versions are scored on the current test split" in " ".join(capsys.readouterr().out.split())


def test_validate_prints_the_resolved_config(capsys):
    assert main(["validate", str(DIGITS), "train.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out


def test_validate_refuses_a_promotion_gate_that_cannot_judge(capsys):
    """What `dlpipe run` refuses before its ETL, `validate` refuses too (it said 'valid')."""
    assert main(["validate", str(BREAST_CANCER), "promote.metric=test_f1", "promote.mode=null"]) == EXIT_CONFIG
    assert "config error: 'promote.mode': which way is better for promote.metric 'test_f1'" in capsys.readouterr().err
    assert main(["validate", str(BREAST_CANCER), "promote.metric=test_f1", "promote.mode=max"]) == 0


def test_unknown_config_key_exits_with_config_code_and_one_line(tmp_path):
    done = dlpipe("etl", str(DIGITS), "train.epocs=3", cwd=tmp_path)
    assert done.returncode == EXIT_CONFIG
    reason = done.stderr.strip().splitlines()
    assert reason == [f"dlpipe: config error: {DIGITS} (with overrides train.epocs=3): unknown key 'train.epocs'"]


def test_missing_input_folder_exits_with_data_code(tmp_path):
    missing = tmp_path / "no-such-folder"
    done = dlpipe("etl", str(DIGITS), f"source.path={missing}", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == EXIT_DATA
    assert done.stderr.strip().splitlines()[-1] == (
        f"dlpipe: data error: image folder {missing} does not exist (source.path: {missing})"
    )


def test_a_spark_that_cannot_start_exits_with_the_config_code_and_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "etl", str(DIGITS), f"source.path={raw}", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "JAVA_HOME": str(tmp_path)},
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "dlpipe: config error: Spark did not start (spark.master local[*], spark.driver_memory 2g): the JVM's own "
        "error is above; is Java 17 on the PATH or JAVA_HOME?")


def test_json_log_format_writes_one_object_per_line_ending_with_the_failure(tmp_path):
    missing = tmp_path / "no-such-folder"
    done = dlpipe("--log-format", "json", "etl", str(DIGITS), f"source.path={missing}", f"run_dir={tmp_path / 'run'}",
                  cwd=tmp_path)
    assert done.returncode == EXIT_DATA
    ours = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]  # (the JVM logs its own way)
    assert {"time", "level", "logger", "message"} <= set(ours[0])
    assert any(entry["logger"] == "dlpipe.etl" and entry["message"] == "started" for entry in ours)
    assert ours[-1] == {"level": "ERROR", "logger": "dlpipe", "failure": "data error", "exit_code": EXIT_DATA,
                        "message": f"data error: image folder {missing} does not exist (source.path: {missing})"}


def test_stage_summary_fields_reach_the_json_log(monkeypatch, capsys):
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    configure_logging()
    with stage("etl") as summary:
        summary.update(rows_in=10, rows_quarantined=1)
    done = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert done["message"].startswith("done in ") and done["message"].endswith("rows_in=10 rows_quarantined=1")
    assert (done["stage"], done["rows_in"], done["rows_quarantined"]) == ("etl", 10, 1)
    assert done["seconds"] >= 0


def test_an_etl_only_pipeline_runs_its_etl_and_is_refused_training_before_any_stage(tmp_path):
    """A config without a `model` section: `dlpipe run --only etl` runs and reports the ETL and what is left;
    a whole run, or `dlpipe train`, is a config error naming the missing section, the whole run's before the ETL."""
    conf = yaml.safe_load(BREAST_CANCER.read_text())
    for training_only in ("model", "train", "promote", "score"):
        del conf[training_only]
    conf["output"]["files_per_split"] = 1  # fewer than the default train.world_size: no ranks will read them
    write_breast_cancer(tmp_path / "raw")
    conf.update(run_dir=str(tmp_path / "run"), source={**conf["source"], "path": str(tmp_path / "raw")})
    etl_only = tmp_path / "etl_only.yaml"
    etl_only.write_text(yaml.safe_dump(conf))
    refused = ("dlpipe: config error: 'model': the train stage needs a model section (model.kind: one of "
               "autoencoder, cnn, dec, lstm_autoencoder, mlp, rnn); this config has none")

    whole = dlpipe("run", str(etl_only), cwd=tmp_path)
    assert (whole.returncode, whole.stderr.strip().splitlines()[-1]) == (EXIT_CONFIG, refused)
    assert not any((tmp_path / "run").glob("*"))  # refused before the ETL, its MLflow store or the lock
    early = dlpipe("train", str(etl_only), cwd=tmp_path)  # the missing model, not the dataset not made yet
    assert (early.returncode, early.stderr.strip().splitlines()[-1]) == (EXIT_CONFIG, refused)

    etl = dlpipe("run", str(etl_only), "--only", "etl", cwd=tmp_path)
    assert etl.returncode == 0, etl.stderr[-3000:]
    counts = json.loads((tmp_path / "run" / "dataset" / "manifest.json").read_text())["counts"]
    assert counts["rows_clean"] + counts["rows_quarantined"] == 569
    assert etl.stdout.splitlines()[:3] == [
        f"pipeline breast-cancer-anomaly: {counts['rows_clean']} clean rows ({counts['rows_quarantined']} "
        f"quarantined), split train/val/test = {counts['train']}/{counts['val']}/{counts['test']}",
        "not run yet: train, promote, score (this config has no model section)",
        f"dataset:      {tmp_path / 'run' / 'dataset'}",
    ]

    train = dlpipe("train", str(etl_only), cwd=tmp_path)
    assert (train.returncode, train.stderr.strip().splitlines()[-1]) == (EXIT_CONFIG, refused)


def test_the_report_of_a_partial_run_names_the_stages_left_and_how_to_run_them():
    manifest = {"counts": {"rows_clean": 10, "rows_quarantined": 1, "train": 7, "val": 2, "test": 1}}
    trained = {"summary": {"model_name": "digits-cnn", "model_version": 3, "run_id": "r1", "task": "classification"}}
    text = RunReport(load_config(DIGITS, []), manifest, {"etl": {}, "train": trained}, {}).as_text().splitlines()
    assert text[:3] == [
        "pipeline digits-cnn: 10 clean rows (1 quarantined), split train/val/test = 7/2/1",
        "trained digits-cnn version 3 (MLflow run r1)",
        "not run yet: promote, score (`dlpipe run CONFIG --from promote`)",
    ]
    assert not any(line.startswith(("promotion:", "scored", "predictions:")) for line in text)


@pytest.mark.slow
def test_run_chains_etl_ddp_training_registration_and_scoring(tmp_path):
    """The digits pipeline on the real data, 2 torchrun ranks, a few epochs: every stage really runs."""
    raw = tmp_path / "raw"
    write_digits(raw)
    (raw / "3" / "notes.txt").write_text("not an image")
    run_dir = tmp_path / "run"
    done = dlpipe(
        "run", str(DIGITS), f"source.path={raw}", f"run_dir={run_dir}", "train.epochs=6",
        "train.early_stopping.patience=6", "score.device=cpu", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    manifest = json.loads((run_dir / "dataset" / "manifest.json").read_text())
    assert manifest["counts"]["rows_in"] == 1798
    assert manifest["counts"]["rows_quarantined"] == 1
    assert manifest["quarantine_reasons"] == {"undecodable image: cannot identify image file": 1}

    result = json.loads((run_dir / "train_result.json").read_text())
    predictions = pq.read_table(run_dir / "predictions").to_pandas()
    assert len(predictions) == manifest["counts"]["test"]
    assert set(predictions["model_version"]) == {str(result["model_version"])}
    assert set(predictions["model_run_id"]) == {result["run_id"]}
    accuracy = (predictions["prediction"] == predictions["label"]).mean()
    assert accuracy > 0.9  # six epochs on digits; chance is 0.1
    assert accuracy == pytest.approx(result["test_metrics"]["accuracy"], abs=1e-9)
    assert f"accuracy           {accuracy:.4f}" in done.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    version = client.get_model_version("digits-cnn", str(result["model_version"]))
    assert client.get_model_version_by_alias("digits-cnn", "champion").version == version.version
    run = client.get_run(version.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert run.data.params["train.world_size"] == "2"
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"config.yaml", "manifest.json", "quality.json", "test_confusion.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(version.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/confusion_matrix.png"}
    assert (run.data.tags["system.world_size"], run.data.tags["system.backend"]) == ("2", "gloo")
    assert run.data.tags["system.threads_per_rank"] == rank_environment(2)[THREADS_VARIABLE]
    assert run.data.tags["system.torch"].startswith("2.13.0")

    # Lineage: any prediction row -> model version -> training run -> the raw inputs' content hash.
    row = predictions.iloc[0]
    raw_hash = manifest["source"]["content_hash"]
    scored_with = client.get_model_version(row["model_name"], row["model_version"])
    assert scored_with.tags["dataset_content_hash"] == raw_hash
    assert client.get_run(row["model_run_id"]).data.tags["dataset.content_hash"] == raw_hash
    # ... and the training run -> the ETL run that wrote its dataset (also recorded as the run's input).
    etl_run = client.get_run(run.data.tags["dlpipe.etl_run_id"])
    assert etl_run.data.tags["dlpipe.stage"] == "etl"
    assert etl_run.data.tags["dataset.content_hash"] == raw_hash
    assert etl_run.data.tags["dataset.digest"] == run.data.tags["dataset.digest"]
    assert etl_run.data.metrics["rows_in"] == manifest["counts"]["rows_in"]
    assert etl_run.data.params["split.method"] == "ranked" and "train.epochs" not in etl_run.data.params
    assert {a.path for a in client.list_artifacts(etl_run.info.run_id)} >= {"manifest.json", "quality.json"}
    trained_on = [d.dataset for d in run.inputs.dataset_inputs]
    assert [(d.name, d.digest) for d in trained_on] == [("digits-cnn-dataset", run.data.tags["dataset.digest"])]
    scoring_runs = client.search_runs([run.info.experiment_id], "tags.`dlpipe.stage` = 'score'")
    assert [r.data.tags["model.version"] for r in scoring_runs] == [row["model_version"]]
    assert scoring_runs[0].data.tags["output.path"] == str((run_dir / "predictions").resolve())
    assert scoring_runs[0].data.metrics["rows_out"] == len(predictions)
    assert scoring_runs[0].data.metrics["drift_psi_max"] < 0.25  # the test split looks like the train split

    # The same model on inputs far brighter than anything it was trained on: the drift check stops it.
    test_split = pq.read_table(run_dir / "dataset" / "split=test", columns=["id", "label", "raw_features"])
    flat = test_split.column("raw_features").combine_chunks().flatten()
    brighter = pc.add(pc.multiply(flat, 0.5), 120.0).cast(pa.float32())
    offsets = test_split.column("raw_features").combine_chunks().offsets
    drifted = test_split.set_column(2, "raw_features", pa.ListArray.from_arrays(offsets, brighter))
    pq.write_table(drifted, tmp_path / "drifted.parquet")
    refused = dlpipe(
        "score", str(DIGITS), f"source.path={raw}", f"run_dir={run_dir}", "score.drift.action=fail",
        "--input", str(tmp_path / "drifted.parquet"), "--output", str(tmp_path / "drifted-predictions"), cwd=tmp_path,
    )
    assert refused.returncode == EXIT_DATA
    assert "drifted from training (PSI" in refused.stderr and "> score.drift.threshold 0.25" in refused.stderr
    assert not (tmp_path / "drifted-predictions").exists()
    mlflow.set_tracking_uri(None)
